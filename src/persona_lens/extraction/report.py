"""The extraction report: Markdown beside the vector, with a PNG of per-layer curves."""

from __future__ import annotations

from pathlib import Path

from persona_lens.core.files import atomic_write, atomic_write_text
from persona_lens.extraction.extract import ExtractionResult, ScoredRollout, summary


def write_report(result: ExtractionResult, vector_path: Path, command: str) -> Path:
    """Write ``<trait>.report.md`` and ``<trait>.report.png`` next to the vector file."""
    stem = vector_path.with_suffix("")
    png = Path(f"{stem}.report.png")
    _plot(result, png)
    md = Path(f"{stem}.report.md")
    atomic_write_text(md, _markdown(result, vector_path, png, command))
    return md


def _plot(result: ExtractionResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norms = result.vector.norms().tolist()
    layers = list(range(len(norms)))
    columns = 3 if result.sweep else 2
    fig, axes = plt.subplots(1, columns, figsize=(4.2 * columns, 3.4))
    axes[0].plot(layers, norms, marker=".")
    axes[0].set(title="vector norm per layer", xlabel="layer position")
    axes[1].plot(layers, result.separation.tolist(), marker=".", color="tab:green")
    axes[1].set(title="held-out separation (Cohen's d)", xlabel="layer position")
    best = result.vector.best_layer
    if result.sweep:
        sweep_layers = sorted(result.sweep)
        for label, values, marker in (
            ("trait at +c", [result.sweep[k].plus for k in sweep_layers], "^"),
            ("trait at -c", [result.sweep[k].minus for k in sweep_layers], "v"),
            ("coherence", [result.sweep[k].coherence for k in sweep_layers], "s"),
        ):
            axes[2].plot(sweep_layers, values, marker=marker, label=label)
        axes[2].set(title="steering sweep (judged)", xlabel="steered layer", ylim=(0, 100))
        axes[2].legend()
    for ax in axes:
        if best is not None:
            ax.axvline(best, color="tab:red", linestyle="--", linewidth=1)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result.vector.trait}: best layer {best}")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def _layer_table(result: ExtractionResult) -> list[str]:
    """Per candidate layer, the numbers the choice compared (and the separation beside them)."""
    best = result.vector.best_layer
    norms = result.vector.norms()
    if result.sweep:
        lines = [
            "| layer | trait at +c | trait at -c | effect (+c minus -c) | coherence (lower) "
            "| held-out separation | norm |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for layer in sorted(result.sweep):
            point = result.sweep[layer]
            mark = " (chosen)" if layer == best else ""
            lines.append(
                f"| {layer}{mark} | {point.plus:.1f} | {point.minus:.1f} | {point.effect:+.1f} "
                f"| {point.coherence:.1f} | {float(result.separation[layer]):.2f} "
                f"| {float(norms[layer]):.1f} |"
            )
        return lines
    lines = ["| layer | held-out separation | norm |", "| --- | --- | --- |"]
    for layer in result.candidates:
        mark = " (chosen)" if layer == best else ""
        lines.append(
            f"| {layer}{mark} | {float(result.separation[layer]):.2f} | {float(norms[layer]):.1f} |"
        )
    return lines


def _example(s: ScoredRollout) -> str:
    trait = "REFUSAL" if s.trait.refusal else _fmt(s.trait.score)
    text = " ".join(s.rollout.response.split())[:300]
    return (
        f"- **{s.rollout.item.side}** (trait {trait}, coherence {_fmt(s.coherence.score)}, "
        f"{s.reason}) *{s.rollout.question}*\n  > {text}"
    )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _markdown(result: ExtractionResult, vector_path: Path, png: Path, command: str) -> str:
    info = summary(result)
    meta = result.vector.metadata
    lines = [
        f"# Persona vector: {result.vector.trait}",
        "",
        f"- description: {meta.get('description', '')}",
        f"- model: `{meta.get('model')}` (fingerprint `{meta.get('model_fingerprint')}`)",
        f"- vector: `{vector_path.name}` [L+1={result.vector.num_layers + 1}, "
        f"d={result.vector.hidden_size}], method `{meta.get('method')}`",
        f"- best layer: **{info['best_layer']}** - {info['layer_criterion']}",
        f"- held-out separation at the best layer: {info['separation_at_best_layer']:.2f}",
        f"- reading layer (screening): {meta.get('read_layer')} - the candidate layer with "
        "the largest held-out separation",
        f"- judge: `{meta.get('judge')}`, trait definition: `{meta.get('generator')}`, "
        f"budget `{meta.get('budget')}`, seed {meta.get('seed')}",
        f"- command: `{command}`",
        "- time: " + ", ".join(f"{k} {v} s" for k, v in info["timings_s"].items()),
        "",
        f"![per-layer curves]({png.name})",
        "",
        "## Filtering",
        "",
        "| side | kept | reasons |",
        "| --- | --- | --- |",
    ]
    for side in ("pos", "neg"):
        reasons = ", ".join(
            f"{why}: {n}" for why, n in sorted(info["filter_reasons"][side].items())
        )
        lines.append(f"| {side} | {info['kept'][side]} | {reasons} |")
    lines += ["", "## Layer choice", "", f"Criterion: {info['layer_criterion']}.", ""]
    lines += _layer_table(result)
    lines += ["", "## Example rollouts", ""]
    for side in ("pos", "neg"):
        examples = [s for s in result.rollouts if s.rollout.item.side == side][:3]
        lines += [_example(s) for s in examples]
    return "\n".join(lines) + "\n"
