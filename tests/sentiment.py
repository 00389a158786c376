"""An independent measure of optimism for real-model tests and benchmarks: VADER's compound
sentiment (the vaderSentiment lexicon from PyPI, written by nobody here and used nowhere in the
pipeline), read on answers to held-out questions that no extraction sees."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

QUESTIONS = Path(__file__).resolve().parent / "data" / "held_out_questions.txt"


def held_out_questions(limit: int | None = None) -> list[str]:
    """Our own questions that invite an outlook, in no trait definition of the library."""
    lines = [q.strip() for q in QUESTIONS.read_text(encoding="utf-8").splitlines() if q.strip()]
    return lines[:limit] if limit else lines


def sentiment(texts: Sequence[str]) -> list[float]:
    """VADER compound score of each text, -1 (negative) .. 1 (positive)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return [float(analyzer.polarity_scores(t)["compound"]) for t in texts]


def block_means(values: Sequence[float], block: int) -> list[float]:
    """Means of consecutive blocks of ``block`` values (one block per steering condition)."""
    return [sum(values[i : i + block]) / block for i in range(0, len(values), block)]
