"""Does the extraction's layer choice agree with steering on questions it never saw?

For each trait and seed, ``persona extract TRAIT --seed S`` with every other default (quick
budget, offline judge; reused from ``--vector-dir/sS`` when there, rollouts cached in its
``.cache``). Then:

1. the held-out steering grid of ``benchmarks/fidelity.py`` at every candidate layer of the
   sweep, at -2 and +2, greedy, on ``--held-out`` questions: ``optimistic`` read by VADER
   sentiment on ``tests/data/held_out_questions.txt``, every other trait by the offline judge
   before any fit on its evaluation and extraction questions 11-20 (see fidelity.py). Per
   layer, the spread is the effect at +2 minus the effect at -2; the best layer has the
   largest spread;
2. the steering sweep rerun on the cached rollouts with other settings (``--variants``:
   coefficient c and number of sweep questions q), each giving the layer it would choose;
3. per setting, the chosen layer's spread as a share of the best layer's (the goal: >= 90%),
   with the gap's standard error over the held-out questions (the per-question spread of the
   best layer minus the chosen one's), and the cosine of two seeds' vectors at the chosen layer.

The grid of each vector is cached beside it (``TRAIT.grid-qN.json``), so a rerun only redoes
what is missing. Usage::

    python benchmarks/layer_choice.py --vector-dir runs/layers --seeds 0,1,2 [--section NAME]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from _common import ROOT, command_line, machine_lines, md_table, write_section
from fidelity import held_out_setup, steering_grid

sys.path.insert(0, str(ROOT))
from persona_lens.core.models import LoadedModel, load_model
from persona_lens.core.vectors import PersonaVector
from persona_lens.extraction import extract as extraction
from persona_lens.traits.definitions import load_trait

COEFFICIENT = 2.0  # what the held-out grid steers with (a user's typical coefficient)
_QUICK = extraction.BUDGETS["quick"]
_TOKENS = f"t{_QUICK.sweep_new_tokens}" if _QUICK.sweep_new_tokens else ""
DEFAULT = (
    f"c{extraction.ExtractionOptions().sweep_coefficient():g}q{_QUICK.eval_questions}{_TOKENS}"
)


def parse_variants(text: str) -> dict[str, tuple[float, int, int | None]]:
    """``c4q4,c2q8t48`` -> {"c4q4": (4.0, 4, None), "c2q8t48": (2.0, 8, 48)} (None: the
    budget's sweep token cap)."""
    out = {}
    for name in text.split(","):
        c, rest = name.removeprefix("c").split("q")
        q, _, t = rest.partition("t")
        out[name] = (float(c), int(q), int(t) if t else None)
    return out


def vector_for(loaded: LoadedModel, trait: str, seed: int, folder: Path) -> Path:
    path = folder / f"{trait}.safetensors"
    if not path.is_file():
        print(f"extracting {trait} seed {seed}", file=sys.stderr, flush=True)
        options = extraction.ExtractionOptions(seed=seed)
        result = extraction.extract(loaded, load_trait(trait), options, cache_dir=folder / ".cache")
        result.vector.save(path)
    return path


def held_out_grid(loaded: LoadedModel, path: Path, layers: list[int], count: int) -> dict[str, Any]:
    """Per layer, the answers' scores at -2 and +2 on ``count`` held-out questions (each row in
    question order) and the change of the mean, cached beside the vector."""
    cache = path.with_suffix(f".grid-q{count}.json")
    if cache.is_file():
        return dict(json.loads(cache.read_text()))
    vector = PersonaVector.load(path)
    kind = "sentiment" if vector.trait == "optimistic" else "judge"
    measure, questions = held_out_setup(kind, vector.trait, count)
    grid = steering_grid(
        loaded,
        vector,
        layers,
        (-COEFFICIENT, COEFFICIENT),
        questions,
        measure=measure,
        max_new_tokens=48,
        batch_size=len(questions) * (2 * len(layers) + 1),
    )
    record = {
        "questions": questions,
        "unsteered": grid.unsteered,
        "effects": {f"{layer}:{c:+g}": v for (layer, c), v in grid.effects.items()},
        "scores": {
            f"{key[0]}:{key[1]:+g}" if key else "unsteered": v for key, v in grid.scores.items()
        },
    }
    cache.write_text(json.dumps(record, indent=1))
    return record


def gap(grid: dict[str, Any], best: int, chosen: int) -> tuple[float, float]:
    """Mean and standard error over the questions of the best layer's spread minus the chosen
    layer's (both +2 minus -2, per question)."""
    rows = grid["scores"]

    def spread(layer: int) -> list[float]:
        return [p - m for p, m in zip(rows[f"{layer}:+2"], rows[f"{layer}:-2"], strict=True)]

    diffs = [b - c for b, c in zip(spread(best), spread(chosen), strict=True)]
    return statistics.mean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5


def sweep_choice(
    loaded: LoadedModel,
    trait: str,
    seed: int,
    folder: Path,
    name: str,
    setting: tuple[float, int, int | None],
) -> int:
    """The layer the sweep picks with setting ``name`` (coefficient, questions, token cap), from
    the cached rollouts (choices cached in ``TRAIT.sweeps.json`` beside the vector)."""
    if name == DEFAULT:  # the vector's own choice
        layer = PersonaVector.load(folder / f"{trait}.safetensors").best_layer
        assert layer is not None
        return layer
    cache = folder / f"{trait}.sweeps.json"
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    if name not in known:
        known[name] = _sweep(loaded, trait, seed, folder, *setting)
        cache.write_text(json.dumps(known, indent=1))
    return int(known[name])


def _sweep(
    loaded: LoadedModel,
    trait: str,
    seed: int,
    folder: Path,
    coefficient: float,
    questions: int,
    tokens: int | None,
) -> int:
    quick = extraction.BUDGETS["quick"]
    extraction.BUDGETS["quick"] = dataclasses.replace(
        quick, eval_questions=questions, sweep_new_tokens=tokens or quick.sweep_new_tokens
    )
    try:
        options = extraction.ExtractionOptions(seed=seed, steer_coefficient=coefficient)
        result = extraction.extract(loaded, load_trait(trait), options, cache_dir=folder / ".cache")
    finally:
        extraction.BUDGETS["quick"] = quick
    layer = result.vector.best_layer
    assert layer is not None
    return layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vector-dir", type=Path, required=True)
    parser.add_argument("--traits", default="optimistic,evil,sycophantic")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default="c4q4,c2q4,c2q8,c4q8")
    parser.add_argument("--held-out", type=int, default=20, help="held-out questions per grid")
    parser.add_argument("--section", help="write the tables into this RESULTS.md section")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model("embedded")
    traits = args.traits.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = parse_variants(args.variants)
    layers = extraction.candidate_layers(loaded.layout.num_layers, 5)
    rows: list[list[Any]] = []
    shares: dict[str, list[float]] = {name: [] for name in variants}
    within_noise: dict[str, list[bool]] = {name: [] for name in variants}
    cosines: dict[tuple[str, str], list[float]] = {}
    for trait in traits:
        chosen_by: dict[str, dict[int, int]] = {name: {} for name in variants}
        paths = {}
        for seed in seeds:
            folder = args.vector_dir / f"s{seed}"
            paths[seed] = vector_for(loaded, trait, seed, folder)
            grid = held_out_grid(loaded, paths[seed], layers, args.held_out)
            spread = {k: grid["effects"][f"{k}:+2"] - grid["effects"][f"{k}:-2"] for k in layers}
            best = max(layers, key=lambda k: spread[k])
            cells = []
            for name, setting in variants.items():
                layer = sweep_choice(loaded, trait, seed, folder, name, setting)
                chosen_by[name][seed] = layer
                share = spread[layer] / spread[best] if spread[best] > 0 else float("nan")
                shares[name].append(share)
                mean_gap, error = gap(grid, best, layer)
                within_noise[name].append(share >= 0.9 or mean_gap <= 2 * error)
                cells.append(f"{layer} ({share:.0%}; gap {mean_gap:.2g} ± {error:.2g})")
                print(trait, seed, name, layer, f"{share:.2f}", file=sys.stderr, flush=True)
            effects = grid["effects"]
            rows.append(
                [
                    trait,
                    seed,
                    *(f"{effects[f'{k}:-2']:+.2f} / {effects[f'{k}:+2']:+.2f}" for k in layers),
                    best,
                    *cells,
                ]
            )
        vectors = {s: PersonaVector.load(p) for s, p in paths.items()}
        for name in variants:
            for a, b in itertools.combinations(seeds, 2):
                layer = chosen_by[name][a]  # the first seed's chosen layer
                cos = torch.nn.functional.cosine_similarity(
                    vectors[a].at(layer), vectors[b].at(layer), dim=0
                )
                cosines.setdefault((trait, name), []).append(float(cos))
    summary = [
        [
            name,
            f"{statistics.median(values):.0%}",
            f"{min(values):.0%}",
            f"{sum(v >= 0.9 for v in values)}/{len(values)}",
            f"{sum(within_noise[name])}/{len(values)}",
            *(f"{statistics.median(cosines[(t, name)]):.2f}" for t in traits),
        ]
        for name, values in shares.items()
    ]
    text = "\n".join(
        [
            "### Layer choice against held-out steering (embedded, defaults but the seed)",
            "",
            f"- command: `{command_line()}`",
            *machine_lines(loaded.device),
            f"- candidate layers {layers}; held-out grid at {-COEFFICIENT:g} / "
            f"+{COEFFICIENT:g}, greedy, 48 tokens, no system prompt: optimistic by VADER "
            f"compound (-1..1) on {args.held_out} held-out questions, the others by the unfit "
            f"offline judge (0..100) on {args.held_out} of their evaluation and extraction "
            "questions 11-20; cells: change of the mean against the unsteered answers; settings "
            f"cXqY[tZ]: sweep coefficient X on Y sweep questions [answers of at most Z tokens, "
            f"else the rollouts' {_QUICK.max_new_tokens}] (the defaults now: {DEFAULT}); gap: "
            "the best layer's spread minus the chosen one's, mean ± standard error over the "
            "questions",
            "",
            md_table(
                [
                    "trait",
                    "seed",
                    *(f"layer {k}: -2 / +2" for k in layers),
                    "best",
                    *(f"{name}: chosen (share of best)" for name in variants),
                ],
                rows,
            ),
            "",
            md_table(
                [
                    "setting",
                    "median share of best",
                    "min",
                    "within 10%",
                    "within 10% or 2 SE",
                    *(f"two-seed cosine, {t}" for t in traits),
                ],
                summary,
            ),
        ]
    )
    print(text, flush=True)
    if args.section:
        write_section(args.section, text)


if __name__ == "__main__":
    main()
