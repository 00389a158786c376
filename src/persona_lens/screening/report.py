"""The screening report: Markdown plus one PNG histogram per trait, threshold marked.

Per trait: the dataset-level mean score (the paper's dataset-level ΔP), the histogram of the
sample scores, and the top 10 flagged samples (or the top 10 by score when nothing is flagged),
truncated. Then the skipped-row counts by reason.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from persona_lens.core.files import atomic_write, atomic_write_text
from persona_lens.screening.results import ScreenSummary, TraitSummary

_SCORE_LABEL = {"delta_p": "ΔP", "projection": "projection"}
_MODE_TEXT = {
    "diff": "projection difference ΔP = (a_l(x, y) - a_l(x, y')) · v̂, y' the model's greedy answer",
    "response": "response projection a_l(x, y) · v̂ (no base response)",
    "prompt-last": "ΔP approximated with the last prompt token: a_l(x, y) · v̂ - h_l(x)[-1] · v̂",
}


def file_stem(name: str) -> str:
    return re.sub(r"[^\w.\-]", "_", name)


def write_report(
    directory: Path,
    summary: ScreenSummary,
    scores: Mapping[str, np.ndarray],
    top: Mapping[str, Sequence[dict[str, Any]]],
    command: str = "",
) -> Path:
    """Write ``report.md`` and ``<trait>.png`` into ``directory``; returns the Markdown path."""
    directory.mkdir(parents=True, exist_ok=True)
    for trait in summary.traits:
        histogram(directory / f"{file_stem(trait.name)}.png", trait, scores[trait.name])
    lines = _header(summary, command)
    lines += ["", "## Traits", ""]
    lines += _trait_table(summary.traits)
    for trait in summary.traits:
        lines += ["", f"### {trait.name}", "", f"![{trait.name}]({file_stem(trait.name)}.png)", ""]
        lines += _top_table(trait, top.get(trait.name, ()))
    lines += ["", "## Skipped rows", ""]
    if summary.skipped:
        lines += ["| reason | rows |", "|---|---|"]
        lines += [
            f"| {kind} | {count} |" for kind, count in sorted(summary.skipped_by_kind.items())
        ]
        lines += ["", f"Row numbers and details: `{summary.skip_log}`."]
    else:
        lines += ["None."]
    path = directory / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _header(summary: ScreenSummary, command: str) -> list[str]:
    lines = [
        "# Screening report",
        "",
        f"- data: `{summary.data}` ({summary.format}): {summary.rows} rows, "
        f"{summary.screened} screened, {summary.skipped} skipped, "
        f"{summary.multi_turn} multi-turn (screened on their last assistant turn)",
        f"- model: `{summary.model}`; mode `{summary.mode}`: {_MODE_TEXT[summary.mode]}",
        f"- flagging: {summary.flag_rule}; {summary.flagged} rows flagged for at least one trait",
    ]
    if summary.truncated:
        lines.append(f"- {summary.truncated} dataset responses were cut to the token limit")
    if summary.base_fallbacks:
        lines.append(
            f"- {summary.base_fallbacks} base responses were empty; their base term is the "
            "last prompt token's projection"
        )
    if summary.reference:
        ref = summary.reference
        lines.append(f"- reference: `{ref['data']}`, {ref['screened']} rows screened")
    resumed = f", {summary.resumed_shards} of {summary.shards} shards from an earlier run"
    lines.append(
        f"- time: {summary.seconds:.1f} s, {summary.workers} worker(s)"
        + (resumed if summary.resumed_shards else "")
    )
    if command:
        lines.append(f"- command: `{command}`")
    lines.append(f"- written: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    return lines


def _trait_table(traits: Sequence[TraitSummary]) -> list[str]:
    rows = ["| trait | layer | score | dataset mean | std | median | threshold | flagged |"]
    rows.append("|---|---|---|---|---|---|---|---|")
    for t in traits:
        threshold = "-" if t.threshold is None else f"{t.threshold:+.4f}"
        rows.append(
            f"| {t.name} | {t.layer} | {t.score_key} | {t.mean:+.4f} | {t.std:.4f} | "
            f"{t.median:+.4f} | {threshold} | {t.flagged} |"
        )
    return rows


def _cell(text: str, limit: int) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _top_table(trait: TraitSummary, top: Sequence[dict[str, Any]]) -> list[str]:
    if not top:
        return ["No samples."]
    title = "Top 10 flagged samples" if trait.flagged else "Top 10 samples by score (none flagged)"
    rows = [title + ":", "", "| rank | row | score | percentile | prompt | response |"]
    rows.append("|---|---|---|---|---|---|")
    for item in top:
        rows.append(
            f"| {item['rank']} | {item['row']} | {item['score']:+.4f} | "
            f"{item['percentile']:.1f} | {_cell(item['prompt'], 120)} | "
            f"{_cell(item['response'], 200)} |"
        )
    return rows


def histogram(path: Path, trait: TraitSummary, scores: np.ndarray) -> Path:
    """A histogram of the sample scores with the threshold (red) and the mean (black) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = _SCORE_LABEL.get(trait.score_key, trait.score_key)
    figure, axes = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    axes.hist(scores, bins=min(50, max(10, len(scores) // 10)), color="#6a8caf")
    axes.axvline(trait.mean, color="black", linestyle=":", label=f"mean {trait.mean:+.3f}")
    if trait.threshold is not None:
        axes.axvline(
            trait.threshold,
            color="#c0392b",
            linestyle="--",
            label=f"threshold {trait.threshold:+.3f} ({trait.flagged} flagged)",
        )
    axes.set_xlabel(f"{label} at layer {trait.layer}")
    axes.set_ylabel("samples")
    axes.set_title(f"{trait.name}: {len(scores)} samples")
    axes.legend(loc="upper right", fontsize=8)
    figure.tight_layout()

    def write(tmp: str) -> None:
        figure.savefig(tmp, format="png")

    try:
        atomic_write(path, write)
    finally:
        plt.close(figure)
    return path
