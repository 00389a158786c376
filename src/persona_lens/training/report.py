"""Plots of a training run and of a finetuning shift (PNG, Agg backend, written atomically)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from persona_lens.core.files import atomic_write


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, ax: Any, path: Path) -> Path:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def plot_loss_curve(record: dict[str, Any], path: Path) -> Path:
    """Training loss per optimiser step (the steered loss the optimiser saw), the projection
    penalty where there is one, and the held-out losses without steering as lines."""
    plt = _pyplot()
    curve = record.get("loss_curve", [])
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    steps = [c["step"] for c in curve]
    ax.plot(steps, [c["loss"] for c in curve], marker=".", label="training loss")
    if any("penalty" in c for c in curve):
        ax.plot(
            [c["step"] for c in curve if "penalty" in c],
            [c["penalty"] for c in curve if "penalty" in c],
            marker=".",
            label="projection penalty",
        )
    held = record.get("heldout_loss") or {}
    for key, style, who in (("base", ":", "base model"), ("tuned", "--", "fine-tuned")):
        if held.get(key) is not None:
            label = f"held-out loss, {who} (no steering)"
            ax.axhline(held[key], linestyle=style, color="gray", label=label)
    kinds = ", ".join(
        f"{i['kind']} {i['trait']} {i['coefficient']:g}" for i in record.get("interventions", [])
    )
    ax.set(xlabel="optimiser step", ylabel="loss", title=f"training: {kinds or 'plain LoRA'}")
    return _save(plt, fig, ax, path)


def plot_shift(per_layer: Sequence[float], at_layer: int | None, title: str, path: Path) -> Path:
    """The finetuning shift per layer position, the vector's layer marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    layers = list(range(len(per_layer)))
    ax.plot(layers, list(per_layer), marker="o", markersize=3, label="finetuning shift")
    ax.axhline(0, color="gray", linewidth=0.8)
    if at_layer is not None:
        ax.axvline(at_layer, color="tab:red", linestyle="--", label=f"vector layer {at_layer}")
    ax.set(xlabel="layer position", ylabel="projection of the activation shift", title=title)
    return _save(plt, fig, ax, path)
