"""Does an extracted vector steer? Measured on questions no extraction sees.

For each vector file (or a fresh ``persona extract`` run with ``--extract TRAIT``), the embedded
model answers held-out questions, greedy, no system prompt, unsteered and steered at every
(layer, coefficient) of a grid: all conditions in one batched ``generate`` call, each block of
rows with its own per-row coefficients. The table gives the change of the mean score against
the unsteered answers, so +2 should raise it and -2 lower it. Two measures (``--measure``):

- ``sentiment`` (for ``optimistic``): VADER's compound sentiment (vaderSentiment from PyPI,
  -1..1, written by nobody here, used nowhere in the pipeline) on ``tests/data/
  held_out_questions.txt``;
- ``judge`` (any trait): the offline judge's trait score (0..100) *before* any fit, so it
  depends on the trait's system prompts only, never on an extraction's rollouts, on the
  trait's evaluation questions 11-20 (the quick and standard sweeps use the first 4 and 10),
  then, past 10 questions, its extraction questions 11-20 (quick and standard extract from the
  first 10; only the paper budget uses them).

Usage::

    python benchmarks/fidelity.py vectors/optimistic.safetensors [--layers 8,12,16,20,24]
    python benchmarks/fidelity.py --extract optimistic --seed 1 [--budget quick] [--judge offline]
    python benchmarks/fidelity.py vectors/evil.safetensors --measure judge
    ... [--section NAME]   # also write the table into RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from _common import ROOT, command_line, machine_lines, md_table, write_section

sys.path.insert(0, str(ROOT))
from persona_lens.core.generation import generate
from persona_lens.core.models import LoadedModel, load_model
from persona_lens.core.steering import SteeringSpec
from persona_lens.core.vectors import PersonaVector
from persona_lens.judges.base import JudgeItem
from persona_lens.judges.specs import load_judge
from persona_lens.traits.definitions import load_trait
from tests.sentiment import held_out_questions, sentiment

Measure = Callable[[Sequence[str], Sequence[str]], list[float]]
"""Scores answers (questions, answers) -> one number each."""

HELD_OUT = slice(10, 20)  # evaluation and extraction questions no quick/standard run uses


def judge_measure(trait: str) -> Measure:
    """The offline judge's trait score before any fit (prior from the trait's system prompts)."""
    definition = load_trait(trait)

    def measure(questions: Sequence[str], answers: Sequence[str]) -> list[float]:
        judge = load_judge("offline")  # fresh: never fit on an extraction's rollouts
        items = [JudgeItem(q, a) for q, a in zip(questions, answers, strict=True)]
        scores = judge.score_trait(definition, items)
        return [50.0 if s.score is None else s.score for s in scores]  # None: refused

    return measure


def sentiment_measure(questions: Sequence[str], answers: Sequence[str]) -> list[float]:
    """VADER compound sentiment of each answer."""
    return sentiment(answers)


def held_out_setup(kind: str, trait: str, questions: int) -> tuple[Measure, list[str]]:
    """The measure and the first ``questions`` held-out questions of ``--measure KIND``."""
    if kind == "sentiment":
        return sentiment_measure, held_out_questions(questions)
    definition = load_trait(trait)
    pool = [*definition.evaluation_questions[HELD_OUT], *definition.extraction_questions[HELD_OUT]]
    return judge_measure(trait), pool[:questions]


@dataclass(frozen=True)
class Grid:
    """A steering grid's result: per condition (layer, coefficient), or None for the unsteered
    rows, each answer's score in question order; and the steered answers."""

    scores: dict[tuple[int, float] | None, list[float]]
    texts: dict[tuple[int, float], list[str]]

    @property
    def unsteered(self) -> float:
        """The unsteered answers' mean score."""
        return statistics.mean(self.scores[None])

    @property
    def effects(self) -> dict[tuple[int, float], float]:
        """Per condition, the change of the mean score against the unsteered answers."""
        base = self.unsteered
        return {c: statistics.mean(v) - base for c, v in self.scores.items() if c is not None}


def steering_grid(
    loaded: LoadedModel,
    vector: PersonaVector,
    layers: Sequence[int],
    coefficients: Sequence[float],
    questions: Sequence[str],
    *,
    measure: Measure = sentiment_measure,
    max_new_tokens: int = 48,
    batch_size: int = 64,
) -> Grid:
    """Unsteered and steered answers at each (layer, coefficient), scored by ``measure``."""
    conditions = [(layer, coef) for layer in layers for coef in coefficients]
    block = len(questions)
    prompts = [q for _ in range(len(conditions) + 1) for q in questions]  # block 0: unsteered
    specs = []
    for index, (layer, coef) in enumerate(conditions, start=1):
        values = [coef if row // block == index else 0.0 for row in range(len(prompts))]
        specs.append(SteeringSpec(vector, values, layer))
    answers = generate(
        loaded.model,
        loaded.tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        steering=specs,
        layout=loaded.layout,
    )
    scores = measure(prompts, [a.response for a in answers])
    keys: list[tuple[int, float] | None] = [None, *conditions]  # block i holds keys[i]
    rows = {key: scores[i * block : (i + 1) * block] for i, key in enumerate(keys)}
    texts = {
        c: [a.response for a in answers[i * block : (i + 1) * block]]
        for i, c in enumerate(keys)
        if c is not None
    }
    return Grid(rows, texts)


def _extract(args: argparse.Namespace) -> Path:
    from typer.testing import CliRunner

    from persona_lens.cli import app

    out = args.out or Path(tempfile.mkdtemp(prefix="fidelity-"))
    arguments = ["extract", args.extract, "--budget", args.budget, "--judge", args.judge]
    arguments += ["--seed", str(args.seed), "--batch-size", str(args.extract_batch_size)]
    result = CliRunner().invoke(app, [*arguments, "--out", str(out)])
    if result.exit_code != 0:
        raise SystemExit(result.output)
    return Path(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("vectors", nargs="*", type=Path)
    parser.add_argument("--extract", help="extract this trait first (defaults but the seed)")
    parser.add_argument("--budget", default="quick")
    parser.add_argument("--judge", default="offline")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, help="extraction output folder (its .cache resumes)")
    parser.add_argument("--extract-batch-size", type=int, default=40)
    parser.add_argument("--layers", default="8,12,16,20,24")
    parser.add_argument("--coefficients", default="-4,-2,2,4")
    parser.add_argument("--measure", choices=("sentiment", "judge"), default="sentiment")
    parser.add_argument(
        "--questions", type=int, help="held-out questions used (default: 12 sentiment, 10 judge)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--section", help="write the tables into this RESULTS.md section")
    parser.add_argument("--json", type=Path, help="write the numbers (and answers) here")
    args = parser.parse_args()

    loaded = load_model("embedded")
    paths = list(args.vectors)
    seconds: dict[str, float] = {}
    if args.extract:
        started = time.perf_counter()
        paths.append(_extract(args))
        seconds["extract"] = time.perf_counter() - started
    layers = [int(x) for x in args.layers.split(",")]
    coefficients = [float(x) for x in args.coefficients.split(",")]
    count = args.questions or (12 if args.measure == "sentiment" else 10)
    title = "VADER sentiment" if args.measure == "sentiment" else "the offline judge (unfit)"
    body = [f"### Fidelity: steering measured by {title}", "", f"- command: `{command_line()}`"]
    body += machine_lines(loaded.device)
    if args.measure == "sentiment":
        body.append(
            f"- the first {count} held-out questions (tests/data/held_out_questions.txt), "
            f"greedy, no system prompt, {args.max_new_tokens} new tokens; cells: change of mean "
            "VADER compound (-1..1) against the unsteered answers"
        )
    else:
        body.append(
            f"- {count} held-out questions per trait (evaluation 11-20, then extraction 11-20; "
            "no quick or standard run uses them), "
            f"greedy, no system prompt, {args.max_new_tokens} new tokens; cells: change of the "
            "mean offline-judge trait score (0..100, the judge's prior: never fit on rollouts) "
            "against the unsteered answers"
        )
    record = {}
    for path in paths:
        vector = PersonaVector.load(path)
        measure, questions = held_out_setup(args.measure, vector.trait, count)
        if vector.best_layer is not None and vector.best_layer not in layers:
            layers_here = sorted([*layers, vector.best_layer])
        else:
            layers_here = layers
        started = time.perf_counter()
        grid = steering_grid(
            loaded,
            vector,
            layers_here,
            coefficients,
            questions,
            measure=measure,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
        )
        seconds["grid"] = time.perf_counter() - started
        base, effects, texts = grid.unsteered, grid.effects, grid.texts
        norms = vector.norms()
        rows = [
            [
                f"{layer}{' (chosen)' if layer == vector.best_layer else ''}",
                *(f"{effects[(layer, c)]:+.2f}" for c in coefficients),
                f"{float(norms[layer]):.1f}",
            ]
            for layer in layers_here
        ]
        meta = vector.metadata
        body += [
            "",
            f"`{vector.trait}` (budget {meta.get('budget')}, judge {meta.get('judge')}, seed "
            f"{meta.get('seed')}, best layer {vector.best_layer}: {meta.get('layer_criterion')}); "
            f"unsteered mean {base:+.2f}; "
            + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()),
            "",
            md_table(
                ["layer", *(f"{c:+g}" for c in coefficients), "vector norm"],
                rows,
            ),
        ]
        record[str(path)] = {
            "best_layer": vector.best_layer,
            "unsteered": base,
            "effects": {f"{k[0]}:{k[1]:+g}": v for k, v in effects.items()},
            "answers": {f"{k[0]}:{k[1]:+g}": v for k, v in texts.items()},
        }
    text = "\n".join(body)
    print(text, flush=True)
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))
    if args.section:
        write_section(args.section, text)


if __name__ == "__main__":
    main()
