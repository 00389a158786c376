"""``persona demo``: the whole idea on the embedded model, in a couple of minutes on a CPU.

1. load the model and show its layout;
2. generate answers under a trait-eliciting and a trait-suppressing system prompt, capturing
   response-average activations during generation;
3. take the per-layer mean difference as the trait's vector;
4. answer new questions unsteered, steered towards and away from the trait - all in one
   batch with per-request coefficients - and monitor each answer's projection;
5. screen a few samples of the shipped synthetic dataset (helpful answers vs strongly
   trait-eliciting ones to the same questions) by their projection difference.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from platformdirs import user_cache_dir
from rich.console import Console
from rich.table import Table

from persona_lens.core.capture import Monitor
from persona_lens.core.generation import generate
from persona_lens.core.models import LoadedModel, load_model
from persona_lens.core.steering import SteeringSpec
from persona_lens.core.vectors import PersonaVector
from persona_lens.screening.screen import screen
from persona_lens.screening.synthetic import SYNTHETIC_TRAITS, synthetic_dataset
from persona_lens.traits.definitions import load_trait


def run_demo(
    *,
    model_spec: str,
    trait_name: str,
    num_questions: int,
    max_new_tokens: int,
    coefficient: float,
    out: Path | None,
    console: Console,
) -> Path:
    started = time.perf_counter()
    trait = load_trait(trait_name)  # a bad name fails before the model loads
    with console.status(f"loading {model_spec} ..."):
        loaded = load_model(model_spec)
    layout = loaded.layout
    info = layout.describe()
    console.print(
        f"[bold]{model_spec}[/bold]: {info['family']}, {info['num_layers']} blocks at "
        f"{info['block_path']}, d={info['hidden_size']}, layout {info['layout']} "
        f"({time.perf_counter() - started:.1f} s to load)"
    )

    pair = trait.instructions[0]
    questions = list(trait.extraction_questions[:num_questions])
    prompts = [
        [{"role": "system", "content": s}, {"role": "user", "content": q}]
        for s in (pair.pos, pair.neg)
        for q in questions
    ]
    console.print(
        f"\n[bold]1. Extract[/bold] '{trait.name}': {len(prompts)} rollouts, "
        "activations captured while generating"
    )
    t0 = time.perf_counter()
    with console.status("generating contrastive rollouts ..."):
        rollouts = generate(
            loaded.model,
            loaded.tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            capture_layers=None,
            layout=layout,
        )
    means = torch.stack([g.response_mean for g in rollouts if g.response_mean is not None])
    n = len(questions)
    diff = means[:n].mean(0) - means[n:].mean(0)
    layer = _separating_layer(means[:n], means[n:], diff)
    vector = PersonaVector(
        diff,
        trait.name,
        {
            "description": trait.description,
            "model": model_spec,
            "model_fingerprint": loaded.fingerprint,
            "method": "mean_diff/response_avg",
            "best_layer": str(layer),
            "num_pos": str(n),
            "num_neg": str(n),
            "judge": "none",
            "generator": "builtin",
        },
    )
    console.print(
        f"   vector [L+1={vector.num_layers + 1}, d={vector.hidden_size}] in "
        f"{time.perf_counter() - t0:.1f} s; steering layer {layer} "
        f"(norm {vector.norms()[layer]:.2f})"
    )

    console.print(
        f"\n[bold]2. Steer and monitor[/bold] at layer {layer}: one batch, "
        "a different coefficient per request"
    )
    evaluation = list(trait.evaluation_questions[:2])
    coefficients = [c for _ in evaluation for c in (0.0, coefficient, -coefficient)]
    steer_prompts = [q for q in evaluation for _ in range(3)]
    t0 = time.perf_counter()
    with console.status("generating steered answers ..."):
        answers = generate(
            loaded.model,
            loaded.tokenizer,
            steer_prompts,
            max_new_tokens=max_new_tokens,
            steering=[SteeringSpec(vector, coefficients, layer)],
            monitors=[Monitor(trait.name, vector.at(layer), layer)],
            layout=layout,
        )
    table = Table(show_lines=True)
    table.add_column("question", max_width=28)
    table.add_column("coef", justify="right")
    table.add_column(f"{trait.name} projection", justify="right")
    table.add_column("answer")
    for question, coef, answer in zip(steer_prompts, coefficients, answers, strict=True):
        projection = answer.response_projections[trait.name]
        table.add_row(question, f"{coef:+.1f}", f"{projection:+.2f}", answer.response.strip())
    console.print(table)
    console.print(f"   {len(answers)} answers in {time.perf_counter() - t0:.1f} s")

    _screen_step(loaded, vector, max_new_tokens, console)

    path = out or Path(user_cache_dir("persona-lens")) / "demo" / f"{trait.name}.safetensors"
    vector.save(path)
    console.print(f"\nvector saved; total {time.perf_counter() - started:.1f} s")
    return path


def _screen_step(
    loaded: LoadedModel, vector: PersonaVector, max_new_tokens: int, console: Console
) -> None:
    """Step 3: the projection difference of Normal vs strongly eliciting (II) answers."""
    if vector.trait not in SYNTHETIC_TRAITS:
        console.print(f"\n(no synthetic dataset for '{vector.trait}': screening step skipped)")
        return
    count = 6
    records = [
        {**json.loads(line), "version": version}
        for version in ("normal", "ii")
        for line in synthetic_dataset(vector.trait, version).read_text().splitlines()[:count]
    ]
    console.print(
        f"\n[bold]3. Screen training data[/bold]: {count} questions of the synthetic "
        f"'{vector.trait}' dataset, each with a helpful (Normal) and a strongly eliciting (II) "
        "answer; ΔP = answer's projection - the model's own answer's"
    )
    t0 = time.perf_counter()
    with console.status("screening ..."):
        result = screen(
            records, vector, model=loaded, max_new_tokens=min(max_new_tokens, 32), filter_top=25.0
        )
    name = result.summary.traits[0].name
    table = Table()
    for column in ("rank", "version", "ΔP", "flagged", "answer"):
        table.add_column(column, justify="right" if column in ("rank", "ΔP") else "left")
    for record in result.records:
        values = record["screening"]["traits"][name]
        answer = record["messages"][-1]["content"]
        table.add_row(
            str(values["rank"]),
            record["version"],
            f"{values['delta_p']:+.3f}",
            "yes" if values["flagged"] else "",
            answer if len(answer) < 70 else answer[:69] + "…",
        )
    console.print(table)
    means = {
        version: sum(
            r["screening"]["traits"][name]["delta_p"]
            for r in result.records
            if r["version"] == version
        )
        / count
        for version in ("normal", "ii")
    }
    console.print(
        f"   dataset-level ΔP: Normal {means['normal']:+.3f}, II {means['ii']:+.3f} "
        f"({time.perf_counter() - t0:.1f} s; `persona screen` does this for whole datasets)"
    )


def _separating_layer(pos: torch.Tensor, neg: torch.Tensor, diff: torch.Tensor) -> int:
    """Judge-free layer choice: where projections of pos and neg rollouts separate most
    (difference of means over pooled std), among the middle layers."""
    unit = diff / diff.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    p = torch.einsum("nld,ld->nl", pos, unit)
    q = torch.einsum("nld,ld->nl", neg, unit)
    score = (p.mean(0) - q.mean(0)) / (torch.cat([p, q]).std(0) + 1e-6)
    num_layers = diff.shape[0] - 1
    low, high = max(1, num_layers // 4), max(2, (3 * num_layers) // 4)
    return int(low + score[low : high + 1].argmax())
