"""What a screening run returns: the summary (dataset-level numbers per trait, counts) and the
ranked records."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TraitSummary:
    """One vector's dataset-level numbers: the mean score is the paper's dataset-level ΔP."""

    name: str
    layer: int
    score_key: str  # delta_p | projection
    mean: float
    std: float
    median: float
    threshold: float | None
    flagged: int


@dataclass
class ScreenSummary:
    """Counts and per-trait numbers of one run (``to_dict`` for JSON)."""

    data: str
    format: str
    model: str
    mode: str
    rows: int  # rows read (blank JSONL lines are not rows)
    screened: int
    skipped: int
    skipped_by_kind: dict[str, int]
    multi_turn: int
    truncated: int  # responses cut to max_response_tokens
    base_fallbacks: int  # diff: empty y', base term from the last prompt token
    traits: list[TraitSummary]
    flagged: int  # rows flagged for at least one trait
    flag_rule: str
    shards: int
    resumed_shards: int
    seconds: float
    workers: int = 1  # Ray workers (1 for a local run)
    out: str | None = None
    skip_log: str | None = None
    clean: str | None = None
    clean_rows: int | None = None
    report: str | None = None
    reference: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def trait(self, name: str) -> TraitSummary:
        for trait in self.traits:
            if trait.name == name:
                return trait
        raise KeyError(name)


@dataclass
class ScreenResult:
    """The summary and the ranked records (every input field plus ``screening``)."""

    summary: ScreenSummary
    out: Path | None
    _records: list[dict[str, Any]] | None = None

    @property
    def records(self) -> list[dict[str, Any]]:
        """Every ranked record, in memory (for a large output, use :meth:`iter_records`)."""
        if self._records is None:
            self._records = list(self.iter_records())
        return self._records

    def iter_records(self) -> Iterator[dict[str, Any]]:
        if self._records is not None:
            yield from self._records
            return
        assert self.out is not None
        with self.out.open(encoding="utf-8") as handle:
            for line in handle:
                yield json.loads(line)
