"""A trait forming while a block-diffusion model denoises: projection against denoising step.

Each monitored trait gets a panel; each prompt a line through every denoising step of every
committed canvas (canvases one after the other, boundaries dashed). The values are a
generation's ``denoising_projections``: at each step, the trait's projection on the decoder,
averaged over the canvas positions that end up as response tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from persona_lens.core.errors import InputError
from persona_lens.core.files import atomic_write

Series = Sequence[Sequence[float]]  # one list of per-step values per committed canvas


def plot_denoising(
    rows: Sequence[Mapping[str, Series]],
    path: str | Path,
    *,
    labels: Sequence[str] | None = None,
    title: str = "trait projection while denoising",
) -> Path:
    """Write a PNG of ``rows`` (one mapping trait -> per-canvas series per prompt)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traits = sorted({name for row in rows for name in row})
    if not traits:
        raise InputError("no denoising projections to plot (monitor a trait on a diffusion model)")
    labels = list(labels) if labels is not None else [f"prompt {i + 1}" for i in range(len(rows))]
    fig, axes = plt.subplots(len(traits), 1, figsize=(8, 2.8 * len(traits)), squeeze=False)
    for ax, trait in zip(axes[:, 0], traits, strict=True):
        boundaries: set[int] = set()
        for label, row in zip(labels, rows, strict=True):
            xs, ys, offset = [], [], 0
            for canvas in row.get(trait, ()):
                xs += [offset + step + 1 for step in range(len(canvas))]
                ys += list(canvas)
                offset += len(canvas)
                boundaries.add(offset)
            if xs:
                ax.plot(xs, ys, marker=".", linewidth=1, label=label)
        for boundary in sorted(boundaries)[:-1]:
            ax.axvline(boundary + 0.5, color="grey", linestyle="--", linewidth=0.6)
        ax.set_title(f"{trait}: projection per denoising step (dashed: next canvas)", fontsize=9)
        ax.set_xlabel("denoising step (canvases in order)")
        ax.set_ylabel("projection")
        if len(rows) <= 10:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return out
