"""The quick budget's trade-off: how many rollouts until two seeds agree.

Samples one pool of rollouts per seed (every instruction pair, the hf backend), then takes
nested subsets (the first Q extraction questions and the first S samples of each) and reports
the cosine of two seeds' mean-difference vectors, per rollout count: the median over layer
positions 1..L and the value at each candidate steering layer (with three or more seeds, the
median over every pair of seeds). ``--judge offline`` filters each subset the way extraction
does (cross-fitted judge, extraction's default thresholds: coherent positives above 50,
negatives below) before the mean difference; ``--judge none`` keeps every rollout. It also
reports, per instruction pair and side, the mean VADER sentiment of the rollouts (does each
negative prompt elicit the opposite of the trait?).

Usage: ``python benchmarks/quick_budget.py [--trait optimistic] [--questions 8] [--samples 3]
[--max-new-tokens 32] [--seeds 2] [--judge none] [--cache DIR] [--section NAME]``. The pool is
cached in ``--cache`` (rerun to resume).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import ROOT, command_line, machine_lines, md_table, write_section

from persona_lens.core.models import load_model
from persona_lens.extraction.backends import load_backend
from persona_lens.extraction.extract import (
    ExtractionOptions,
    candidate_layers,
    filter_rollouts,
    score_rollouts,
)
from persona_lens.extraction.rollouts import Rollout, RolloutSettings, run_rollouts
from persona_lens.judges.specs import load_judge
from persona_lens.traits.definitions import load_trait

sys.path.insert(0, str(ROOT))
from tests.sentiment import sentiment


def mean_difference(rollouts: list[Rollout]) -> torch.Tensor:
    pos = torch.stack([r.response_mean for r in rollouts if r.item.side == "pos"]).mean(0)
    neg = torch.stack([r.response_mean for r in rollouts if r.item.side == "neg"]).mean(0)
    return pos - neg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trait", default="optimistic")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=120)
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument(
        "--seeds",
        type=int,
        default=2,
        help="1: one pool only, agreement of disjoint halves of it (samples, then questions)",
    )
    parser.add_argument("--judge", default="none", help="none | offline: filter each subset")
    parser.add_argument("--section", help="write the tables into this RESULTS.md section")
    args = parser.parse_args()

    loaded = load_model("embedded")
    backend = load_backend("hf", loaded, loaded.layout)
    trait = load_trait(args.trait)
    cache = args.cache or Path(tempfile.mkdtemp(prefix="quick-budget-"))
    pools, seconds = {}, {}
    for seed in range(args.seeds):
        settings = RolloutSettings(
            pairs=len(trait.instructions),
            questions=args.questions,
            samples=args.samples,
            max_new_tokens=args.max_new_tokens,
            temperature=1.0,
            batch_size=args.batch_size,
            seed=seed,
        )
        started = time.perf_counter()
        pools[seed] = run_rollouts(backend, trait, settings, cache, fingerprint=loaded.fingerprint)
        seconds[seed] = time.perf_counter() - started
        print(f"seed {seed}: {len(pools[seed])} rollouts, {seconds[seed]:.0f} s", flush=True)

    layers = candidate_layers(loaded.layout.num_layers, 5)
    pairs = len(trait.instructions)
    judge = None if args.judge == "none" else load_judge(args.judge)
    defaults = ExtractionOptions()  # extraction's filter thresholds
    rows = []

    def kept(rollouts: list[Rollout]) -> list[Rollout]:
        """The rollouts extraction would average: all of them, or the judge-filtered ones."""
        if judge is None:
            return rollouts
        scored = score_rollouts(judge, trait, rollouts)
        filter_rollouts(scored, defaults.threshold, defaults.min_coherence, judged=True)
        return [s.rollout for s in scored if s.kept]

    def row(label: str, count: int, *groups: list[Rollout]) -> None:
        vectors = [mean_difference(kept(g))[1:] for g in groups]
        cos = (
            torch.stack(
                [
                    torch.nn.functional.cosine_similarity(a, b, dim=-1)
                    for a, b in itertools.combinations(vectors, 2)
                ]
            )
            .median(0)
            .values
        )
        rows.append(
            [str(count), label, f"{cos.median():.3f}", *(f"{cos[k - 1]:.3f}" for k in layers)]
        )
        print(rows[-1], flush=True)

    if args.seeds >= 2:
        compared = "seed 0 vs 1" if args.seeds == 2 else f"median of the {args.seeds} seeds' pairs"
        for questions in sorted({max(1, args.questions // 2), args.questions}):
            for samples in range(1, args.samples + 1):
                subsets = [
                    [r for r in pools[k] if r.item.question < questions and r.item.sample < samples]
                    for k in range(args.seeds)
                ]
                count = 2 * pairs * questions * samples
                row(f"{compared}, {questions} questions x {samples} samples", count, *subsets)
    else:
        pool = pools[0]
        for a, b in itertools.combinations(range(args.samples), 2):
            row(
                f"sample {a} vs sample {b} of seed 0 ({args.questions} questions)",
                2 * pairs * args.questions,
                [r for r in pool if r.item.sample == a],
                [r for r in pool if r.item.sample == b],
            )
        row(
            f"even vs odd questions of seed 0 ({args.samples} samples; other questions)",
            pairs * args.questions * args.samples,
            [r for r in pool if r.item.question % 2 == 0],
            [r for r in pool if r.item.question % 2 == 1],
        )
    rows.sort(key=lambda r: int(r[0]))

    scores = sentiment([r.response for r in pools[0]])
    by_pair = []
    for pair in range(len(trait.instructions)):
        cells = []
        for side in ("pos", "neg"):
            values = [
                s
                for s, r in zip(scores, pools[0], strict=True)
                if r.item.pair == pair and r.item.side == side
            ]
            cells.append(f"{statistics.mean(values):+.2f}")
        by_pair.append([str(pair), *cells])
    lengths = {
        side: statistics.mean(r.num_tokens for r in pools[0] if r.item.side == side)
        for side in ("pos", "neg")
    }

    body = [
        "### Quick budget: agreement of independent vectors by rollout count"
        + ("" if judge is None else f" ({args.trait}, {args.judge} judge)"),
        "",
        f"- command: `{command_line()}`",
        *machine_lines(loaded.device),
        f"- trait `{args.trait}`, every instruction pair, hf backend, temperature 1.0, at most "
        f"{args.max_new_tokens} new tokens, "
        + ("no judge (all rollouts)" if judge is None else f"filtered by the {args.judge} judge")
        + "; nested subsets of one "
        f"pool per seed of {len(pools[0])} rollouts (batch {args.batch_size}); "
        + ", ".join(
            f"seed {k}: " + ("read from the cache" if v < 5 else f"generated in {v:.0f} s")
            for k, v in seconds.items()
        ),
        "",
        "Cosine of two independent response-mean difference vectors (median over positions "
        "1..L, then at the candidate steering layers):",
        "",
        md_table(
            ["rollouts per vector", "vectors compared", "median", *(f"layer {k}" for k in layers)],
            rows,
        ),
        "",
        "Mean VADER compound sentiment of the seed-0 rollouts per instruction pair "
        f"(mean length: pos {lengths['pos']:.1f}, neg {lengths['neg']:.1f} tokens):",
        "",
        md_table(["pair", "pos", "neg"], by_pair),
    ]
    text = "\n".join(body)
    print(text, flush=True)
    if args.section:
        write_section(args.section, text)


if __name__ == "__main__":
    main()
