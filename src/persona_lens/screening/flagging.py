"""Ranks, percentiles and flags from the scores of a whole dataset.

A sample is flagged for a trait when its score is above the trait's threshold: a number given
(``--threshold``), the ``percentile``-th percentile of the scores of a reference dataset
(``--threshold-from``; the paper calibrates at the 95th percentile of a chat dataset); or it is
among the top ``filter_top`` percent by rank (``--filter-top``). Rank 1 is the highest score;
ties are broken by row number, so every ordering is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from persona_lens.core.errors import InputError
from persona_lens.interop.prompts_io import parse_number


@dataclass(frozen=True)
class FlagRule:
    """At most one of ``threshold`` (one number for every trait, or one per trait),
    ``filter_top`` (percent, in (0, 100)) or ``reference`` (thresholds from a reference
    dataset at ``percentile``)."""

    threshold: float | Mapping[str, float] | None = None
    filter_top: float | None = None
    reference: bool = False
    percentile: float = 95.0

    def __post_init__(self) -> None:
        given = [self.threshold is not None, self.filter_top is not None, self.reference]
        if sum(given) > 1:
            raise InputError("give one of --threshold, --filter-top and --threshold-from")
        values = (
            self.threshold.values() if isinstance(self.threshold, Mapping) else [self.threshold]
        )
        for value in values:
            if value is not None and (
                not isinstance(value, int | float)
                or isinstance(value, bool)
                or not math.isfinite(value)
            ):
                raise InputError(f"threshold {value!r} is not a finite number")
        if self.filter_top is not None and not 0 < self.filter_top < 100:
            raise InputError(f"--filter-top {self.filter_top:g} is outside (0, 100)")
        if not 0 <= self.percentile <= 100:
            raise InputError(f"--percentile {self.percentile:g} is outside [0, 100]")

    @property
    def active(self) -> bool:
        return self.threshold is not None or self.filter_top is not None or self.reference

    def threshold_for(self, trait: str, traits: Sequence[str]) -> float | None:
        """The fixed threshold of ``trait`` (None when thresholds come from elsewhere)."""
        if isinstance(self.threshold, Mapping):
            unknown = set(self.threshold) - set(traits)
            if unknown:
                raise InputError(
                    f"--threshold for {', '.join(sorted(unknown))}, which no vector screens "
                    f"(vectors: {', '.join(traits)})"
                )
            if trait not in self.threshold:
                raise InputError(f"--threshold gives no value for {trait!r}")
            return float(self.threshold[trait])
        return None if self.threshold is None else float(self.threshold)


def parse_thresholds(values: Sequence[str]) -> float | dict[str, float] | None:
    """``--threshold X`` (every trait) or ``--threshold TRAIT=X`` (repeatable)."""
    if not values:
        return None
    if len(values) == 1 and "=" not in values[0]:
        return parse_number(values[0].strip(), "--threshold")
    out: dict[str, float] = {}
    for value in values:
        trait, sep, number = value.partition("=")
        if not sep or not trait.strip():
            raise InputError(
                f"--threshold {value!r}: give one number, or TRAIT=NUMBER for each vector"
            )
        out[trait.strip()] = parse_number(number.strip(), f"--threshold {trait.strip()}")
    return out


def ranks(scores: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Rank of each score, 1 = highest; equal scores rank by row number."""
    order = np.lexsort((rows, -scores))
    out = np.empty(len(scores), dtype=np.int64)
    out[order] = np.arange(1, len(scores) + 1)
    return out


def percentiles(scores: np.ndarray) -> np.ndarray:
    """Percent of the dataset's scores at or below each score (0-100]."""
    ordered = np.sort(scores)
    return 100.0 * np.searchsorted(ordered, scores, side="right") / max(len(scores), 1)


def flag(
    scores: np.ndarray, rank: np.ndarray, threshold: float | None, filter_top: float | None
) -> tuple[np.ndarray, float | None]:
    """Flags for one trait and the threshold they mean: the top ``filter_top`` percent by rank
    (threshold = the lowest flagged score), else every score above ``threshold``."""
    if filter_top is not None:
        flags = rank <= math.ceil(len(scores) * filter_top / 100.0)
        return flags, float(scores[flags].min()) if flags.any() else None
    if threshold is None:
        return np.zeros(len(scores), dtype=bool), None
    return scores > threshold, threshold


def reference_threshold(scores: np.ndarray, percentile: float) -> float:
    """The ``percentile``-th percentile of a reference dataset's scores."""
    if len(scores) == 0:
        raise InputError("the reference dataset has no usable rows")
    return float(np.percentile(scores, percentile))
