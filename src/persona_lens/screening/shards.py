"""One shard, start to finish: read its rows, turn them into samples, score them, and write the
lines stored for it (the same function runs in this process and in a Ray worker)."""

from __future__ import annotations

import json
import math
from typing import Any

from persona_lens.interop.prompts_io import json_safe
from persona_lens.screening.samples import Sample, SkippedRow, to_sample
from persona_lens.screening.scoring import SampleScore, Scorer
from persona_lens.screening.sources import Shard, ShardReader


def score_shard(reader: ShardReader, shard: Shard, scorer: Scorer) -> list[str]:
    """The stored lines of one shard, in row order: a scored row keeps its input record."""
    entries: dict[int, dict[str, Any]] = {}
    samples: list[Sample] = []
    records: dict[int, dict[str, Any]] = {}
    for raw in reader.read(shard):
        parsed = raw.skipped or to_sample(raw.record, raw.row)
        if isinstance(parsed, SkippedRow):
            entries[raw.row] = _skipped(parsed)
        else:
            samples.append(parsed)
            assert raw.record is not None
            records[raw.row] = raw.record
    by_row = {s.row: s for s in samples}
    for result in scorer.score(samples) if samples else []:
        if isinstance(result, SkippedRow):
            entries[result.row] = _skipped(result)
        elif not all(math.isfinite(v) for v in result.scores.values()):
            entries[result.row] = _skipped(SkippedRow(result.row, "non-finite score"))
        else:
            entries[result.row] = _scored(result, by_row[result.row], records[result.row])
    return [
        json.dumps(json_safe(entries[row]), ensure_ascii=False, allow_nan=False, default=str)
        for row in sorted(entries)
    ]


def _skipped(skip: SkippedRow) -> dict[str, Any]:
    return {"row": skip.row, "skipped": skip.kind, "detail": skip.detail}


def _scored(score: SampleScore, sample: Sample, record: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "row": score.row,
        "record": record,
        "multi_turn": sample.multi_turn,
        "scores": score.scores,
        "response_projection": score.response_projection,
        "response_tokens": score.response_tokens,
        "truncated": score.truncated,
    }
    if score.base_projection:
        entry["base_projection"] = score.base_projection
    if score.base_response is not None:
        entry["base_response"] = score.base_response
        entry["base_fallback"] = score.base_fallback
    return entry
