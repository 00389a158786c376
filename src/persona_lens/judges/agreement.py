"""Agreement of a judge with hand-labelled responses: accuracy of ``score > 50`` against the
pos/neg label, and Spearman correlation with the hand scores, per trait and overall.

Labelled rows are JSON objects with ``trait``, ``question``, ``response``, ``label``
(``pos``/``neg``) and ``score`` (0-100), e.g. ``tests/data/labelled_responses.jsonl``.
Overall figures pool every row (accuracy over all rows; Spearman over all rows' scores).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

Row = dict[str, Any]
# (trait name, rows to score) -> one 0-100 score (or None) per row
Scorer = Callable[[str, Sequence[Row]], list[float | None]]


def load_labelled(path: str | Path) -> list[Row]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def ranks(values: Sequence[float]) -> torch.Tensor:
    """Ranks 1..n, ties sharing their average rank."""
    x = torch.tensor(list(values), dtype=torch.float64)
    order = torch.argsort(x, stable=True)
    r = torch.empty_like(x)
    r[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    for value in torch.unique(x):
        tied = x == value
        if int(tied.sum()) > 1:
            r[tied] = r[tied].mean()
    return r


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    if len(a) < 2:
        return float("nan")
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denom) if denom > 0 else float("nan")


def _summary(rows: Sequence[Row], scores: Sequence[float | None]) -> dict[str, float]:
    pairs = [(r, s) for r, s in zip(rows, scores, strict=True) if s is not None]
    if not pairs:
        return {"n": 0, "scored": 0, "accuracy": float("nan"), "spearman": float("nan")}
    correct = sum((s > 50.0) == (r["label"] == "pos") for r, s in pairs)
    return {
        "n": len(rows),
        "scored": len(pairs),
        "accuracy": correct / len(pairs),
        "spearman": spearman([s for _, s in pairs], [float(r["score"]) for r, _ in pairs]),
    }


def agreement(rows: Sequence[Row], scorer: Scorer) -> dict[str, dict[str, float]]:
    """Score each trait's rows with ``scorer`` and summarise, per trait and ``overall``."""
    traits = sorted({r["trait"] for r in rows})
    out: dict[str, dict[str, float]] = {}
    all_rows: list[Row] = []
    all_scores: list[float | None] = []
    for trait in traits:
        subset = [r for r in rows if r["trait"] == trait]
        scores = scorer(trait, subset)
        out[trait] = _summary(subset, scores)
        all_rows.extend(subset)
        all_scores.extend(scores)
    out["overall"] = _summary(all_rows, all_scores)
    return out


def leave_one_question_out(
    rows: Sequence[Row], score_fold: Callable[[Sequence[Row], Sequence[Row]], list[float | None]]
) -> list[float | None]:
    """Cross-validated scores: each question's rows are scored by ``score_fold(train, test)``
    with the rows of every other question (of the same set) as ``train``."""
    scores: list[float | None] = [None] * len(rows)
    for question in dict.fromkeys(r["question"] for r in rows):
        test = [i for i, r in enumerate(rows) if r["question"] == question]
        train = [r for r in rows if r["question"] != question]
        for i, s in zip(test, score_fold(train, [rows[i] for i in test]), strict=True):
            scores[i] = s
    return scores
