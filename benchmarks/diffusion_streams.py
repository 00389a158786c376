"""Which stream of a block-diffusion model carries a contrastive persona direction?

A tiny random DiffusionGemma (the zoo's configuration, with the embedded tokenizer's
vocabulary: 4.1M parameters) answers a trait's extraction questions under its positive and
negative system prompts (the quick budget: 5 pairs x 4 questions x 2 samples per side). The
same seeded rollouts are read on each stream:

- ``encoder``: the committed tokens, as the encoder caches them (the response average);
- ``decoder``: the last denoising step of each canvas, at the response positions;
- ``both``: the mean of the two.

For each, the held-out separation (Cohen's d of projections on the rollouts of the other
half of the questions, ``extraction.extract.held_out_separation``) per layer, and the same
with the pos/neg labels shuffled (a control: what noise gives). Random weights: this checks
the plumbing, it says nothing about trained models.

Usage: ``python benchmarks/diffusion_streams.py [--trait evil] [--shuffles 20]``.
Writes the ``diffusion streams`` section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import replace

import torch
from _common import ROOT, command_line, machine_lines, md_table, offline_tokenizer, write_section

from persona_lens.core.architecture import find_blocks
from persona_lens.core.generation import generate
from persona_lens.extraction.extract import BUDGETS, ScoredRollout, held_out_separation
from persona_lens.extraction.rollouts import Rollout, RolloutSettings, plan
from persona_lens.judges.base import JudgeScore
from persona_lens.traits.definitions import load_trait

sys.path.insert(0, str(ROOT))
from tests import zoo


def _rollouts(model, tokenizer, layout, trait, settings) -> list[Rollout]:  # type: ignore[no-untyped-def]
    items = plan(settings)
    out = []
    for start in range(0, len(items), settings.batch_size):
        batch = items[start : start + settings.batch_size]
        prompts = []
        for item in batch:
            pair = trait.instructions[item.pair]
            system = pair.pos if item.side == "pos" else pair.neg
            question = trait.extraction_questions[item.question]
            prompts.append(
                [{"role": "system", "content": system}, {"role": "user", "content": question}]
            )
        generations = generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens=settings.max_new_tokens,
            batch_size=len(prompts),
            do_sample=True,
            seed=settings.seed + start,
            capture_layers=None,
            layout=layout,
        )
        for item, prompt, g in zip(batch, prompts, generations, strict=True):
            assert g.response_mean is not None and g.prompt_mean is not None
            assert g.prompt_last is not None
            out.append(
                Rollout(
                    item,
                    prompt[0]["content"],
                    prompt[1]["content"],
                    g.response,
                    g.response_mean,
                    g.prompt_mean,
                    g.prompt_last,
                    len(g.response_ids),
                )
            )
    return out


def _separation(rollouts: list[Rollout]) -> torch.Tensor:
    none = JudgeScore(score=None)
    return held_out_separation([ScoredRollout(r, none, none, kept=True) for r in rollouts])


def _shuffled(rollouts: list[Rollout], rng: random.Random) -> list[Rollout]:
    """The same rollouts with pos/neg labels permuted within each question."""
    out = []
    for question in sorted({r.item.question for r in rollouts}):
        group = [r for r in rollouts if r.item.question == question]
        sides = [r.item.side for r in group]
        rng.shuffle(sides)
        out += [replace(r, item=replace(r.item, side=s)) for r, s in zip(group, sides, strict=True)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trait", default="evil")
    parser.add_argument("--budget", default="quick", choices=sorted(BUDGETS))
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--shuffles", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer = offline_tokenizer()
    ids = (tokenizer.pad_token_id, tokenizer.bos_token_id or 0, tokenizer.eos_token_id)
    model = zoo.build_diffusion_gemma(len(tokenizer), token_ids=ids)
    budget = BUDGETS[args.budget]
    trait = load_trait(args.trait)
    settings = RolloutSettings(
        pairs=min(budget.pairs, len(trait.instructions)),
        questions=min(budget.questions, len(trait.extraction_questions)),
        samples=budget.samples,
        max_new_tokens=args.max_new_tokens,
        temperature=1.0,
        batch_size=40,
        seed=0,
    )
    streams = find_blocks(model).streams
    read: dict[str, list[Rollout]] = {}
    started = time.perf_counter()
    for stream in streams:
        layout = find_blocks(model, stream.path)
        read[stream.name] = _rollouts(model, tokenizer, layout, trait, settings)
    seconds = time.perf_counter() - started
    same = all(
        a.response == b.response for a, b in zip(read["encoder"], read["decoder"], strict=True)
    )
    read["both"] = [
        replace(a, response_mean=(a.response_mean + b.response_mean) / 2)
        for a, b in zip(read["encoder"], read["decoder"], strict=True)
    ]
    rng = random.Random(0)
    rows = []
    num_layers = len(streams[0].blocks)
    for name, rollouts in read.items():
        d = _separation(rollouts)[1:]
        control = torch.stack(
            [_separation(_shuffled(rollouts, rng))[1:].abs() for _ in range(args.shuffles)]
        )
        p95 = control.quantile(0.95, dim=0)
        best = int(d.abs().argmax())
        rows.append(
            [
                name,
                " ".join(f"{v:+.2f}" for v in d.tolist()),
                f"{float(d.abs().mean()):.2f}",
                f"{best + 1} ({float(d[best]):+.2f})",
                " ".join(f"{v:.2f}" for v in p95.tolist()),
            ]
        )
    tokens = sum(len(r.response) > 0 for r in read["encoder"])
    body = "\n".join(
        [
            "### Block diffusion: which stream separates a contrastive vector",
            "",
            f"Tiny random DiffusionGemma ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
            f"parameters, {num_layers} layers, canvas {model.config.canvas_length}, "
            f"{model.generation_config.max_denoising_steps} denoising steps), trait "
            f"`{args.trait}`, {len(read['encoder'])} rollouts ({args.budget} budget counts, "
            f"{args.max_new_tokens} new tokens; {tokens} non-empty), the same seeded rollouts "
            f"read on each stream (identical texts: {same}); {seconds:.0f} s for both runs.",
            "Held-out separation (Cohen's d) at layers 1..L; control: 95th percentile of |d| "
            f"over {args.shuffles} label shuffles within each question. Random weights: "
            "plumbing only, nothing about trained models.",
            "",
            md_table(
                ["stream", "d per layer", "mean abs d", "best layer", "control p95 per layer"],
                rows,
            ),
            "",
            f"Command: `{command_line()}`",
            "",
            *machine_lines(torch.device("cpu")),
        ]
    )
    print(body)
    if not args.no_write:
        write_section("diffusion streams", body)


if __name__ == "__main__":
    main()
