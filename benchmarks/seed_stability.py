"""How much an extracted vector depends on the sampling seed, per budget.

For each budget, the rollouts of ``persona extract`` (trait ``optimistic``, judge ``none``: the
response-mean difference over all rollouts) are sampled with seeds 0 and 1; the cosine
similarity of the two vectors at each layer position 1..L says how much of the direction is
signal and how much is sampling noise.

Usage: ``python benchmarks/seed_stability.py [--budgets quick,standard] [--backend vllm]``.
Writes the ``seed stability`` section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _common import command_line, machine_lines, md_table, write_section
from bench_extract import _vector

from persona_lens.core.architecture import find_blocks
from persona_lens.core.models import load_model, model_fingerprint
from persona_lens.extraction.backends import BACKENDS, load_backend
from persona_lens.extraction.extract import BUDGETS
from persona_lens.extraction.rollouts import RolloutSettings, run_rollouts
from persona_lens.traits.definitions import load_trait


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budgets", default="quick,standard")
    parser.add_argument("--backend", default="hf", choices=BACKENDS)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--trait", default="optimistic")
    args = parser.parse_args()

    lm = load_model("embedded")
    layout = find_blocks(lm.model)
    backend = load_backend(args.backend, lm, layout)
    trait = load_trait(args.trait)
    fingerprint = model_fingerprint(lm.model, lm.tokenizer)
    rows = []
    for name in args.budgets.split(","):
        budget = BUDGETS[name]
        vectors, seconds, count = [], 0.0, 0
        for seed in (0, 1):
            settings = RolloutSettings(
                pairs=min(budget.pairs, len(trait.instructions)),
                questions=min(budget.questions, len(trait.extraction_questions)),
                samples=budget.samples,
                max_new_tokens=budget.max_new_tokens,
                temperature=1.0,
                batch_size=args.batch_size,
                seed=seed,
            )
            started = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                rollouts = run_rollouts(
                    backend, trait, settings, Path(tmp), fingerprint=fingerprint
                )
            seconds += time.perf_counter() - started
            count = len(rollouts)
            vectors.append(_vector(rollouts))
        cos = torch.nn.functional.cosine_similarity(vectors[0][1:], vectors[1][1:], dim=-1)
        middle = (len(cos) + 1) // 2
        rows.append(
            [
                name,
                str(count),
                str(budget.max_new_tokens),
                f"{cos.median():.3f}",
                f"{cos.min():.3f}",
                f"{cos[middle - 1]:.3f}",
                f"{cos.max():.3f}",
                f"{seconds / 2:.0f}",
            ]
        )
        print(rows[-1], flush=True)
    body = "\n".join(
        [
            "## Seed stability of extracted vectors",
            "",
            f"Command: `{command_line()}`",
            "",
            *machine_lines(lm.device),
            f"- model: {lm.name}; trait `{args.trait}`; backend `{args.backend}`; judge none "
            "(all rollouts), temperature 1.0",
            "",
            "Cosine similarity of the response-mean difference vectors from seeds 0 and 1, over "
            "layer positions 1..L:",
            "",
            md_table(
                [
                    "budget",
                    "rollouts",
                    "max tokens",
                    "median",
                    "min",
                    "middle layer",
                    "max",
                    "s per seed",
                ],
                rows,
            ),
        ]
    )
    write_section("seed stability", body)


if __name__ == "__main__":
    main()
