"""Extraction wall time vs its lower bound (the bare generation of the same rollouts).

Three ways to get the rollouts of ``persona extract --budget B`` (judge ``none`` so only the
model's work is timed; the same prompts, batches, sampling and seeds in each):

- ``bound``: plain HF ``generate`` of the rollout batches - no activations at all;
- ``persona-lens``: the extraction rollouts, activations captured while generating;
- ``generate-then-forward``: plain ``generate``, then a batched forward over prompt+response
  to read the activations (the usual two-pass approach).

Usage: ``python benchmarks/bench_extract.py [--budget quick] [--repeats 3]``.
Writes the ``extract`` section of RESULTS.md. Goal (issue): within 15% of the bound.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import (
    command_line,
    machine_lines,
    md_table,
    median,
    pct,
    write_section,
)
from persona_lens.architecture import find_blocks
from persona_lens.capture import capture_forward
from persona_lens.extract import BUDGETS
from persona_lens.generation import eos_token_ids, render_chat
from persona_lens.models import load_model, model_fingerprint
from persona_lens.rollouts import RolloutSettings, _messages, plan, run_rollouts
from persona_lens.traits import load_trait


def _batches(settings: RolloutSettings, trait: object) -> list[list[str]]:
    items = plan(settings)
    return [
        [_render(trait, item) for item in items[i : i + settings.batch_size]]
        for i in range(0, len(items), settings.batch_size)
    ]


def _render(trait: object, item: object) -> str:
    system, question = _messages(trait, item)  # type: ignore[arg-type]
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return render_chat(_TOKENIZER, messages)


_TOKENIZER: object = None


def main() -> None:
    global _TOKENIZER
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budget", default="quick", choices=sorted(BUDGETS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=20)
    args = parser.parse_args()

    lm = load_model("embedded")
    model, tok = lm.model, lm.tokenizer
    _TOKENIZER = tok
    layout = find_blocks(model)
    trait = load_trait("optimistic")
    budget = BUDGETS[args.budget]
    settings = RolloutSettings(
        budget.pairs,
        budget.questions,
        budget.samples,
        budget.max_new_tokens,
        1.0,
        args.batch_size,
        0,
    )
    batches = _batches(settings, trait)
    eos = eos_token_ids(model, tok)
    fingerprint = model_fingerprint(model, tok)

    def sample(i: int, texts: list[str]) -> tuple[Any, torch.Tensor]:
        """Plain HF sampling of one rollout batch, seeded as the extraction seeds it."""
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        torch.manual_seed(settings.seed * 100_003 + i)
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=settings.max_new_tokens + 1,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=None,
                pad_token_id=tok.pad_token_id,
                eos_token_id=eos,
            )
        return enc, out

    def bound() -> tuple[float, int]:
        tokens, start = 0, time.perf_counter()
        for i, texts in enumerate(batches):
            enc, out = sample(i, texts)
            tokens += int(out.shape[0] * (out.shape[1] - enc["input_ids"].shape[1]))
        return time.perf_counter() - start, tokens

    def two_pass() -> tuple[float, int]:
        tokens, start = 0, time.perf_counter()
        for i, texts in enumerate(batches):
            enc, out = sample(i, texts)
            prompt_len = enc["input_ids"].shape[1]
            mask = torch.cat([enc["attention_mask"], torch.ones_like(out[:, prompt_len:])], 1)
            response = torch.zeros_like(out, dtype=torch.bool)
            response[:, prompt_len:] = True
            capture_forward(model, out, mask, response, layout=layout)
            tokens += int(out.shape[0] * (out.shape[1] - prompt_len))
        return time.perf_counter() - start, tokens

    def ours() -> tuple[float, int]:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            rollouts = run_rollouts(
                model, tok, layout, trait, settings, Path(tmp), fingerprint=fingerprint
            )
            return time.perf_counter() - start, sum(r.num_tokens for r in rollouts)

    runs: dict[str, list[float]] = {"bound": [], "persona-lens": [], "generate-then-forward": []}
    functions = {"bound": bound, "persona-lens": ours, "generate-then-forward": two_pass}
    bound()  # warm-up
    for repeat in range(args.repeats):
        names = list(functions)
        names = names[repeat % 3 :] + names[: repeat % 3]
        for name in names:
            seconds, _ = functions[name]()
            runs[name].append(seconds)
            print(f"{name}: {seconds:.2f} s", flush=True)

    base = median(runs["bound"])
    rows = [[name, f"{median(v):.2f}", pct(base / median(v))] for name, v in runs.items()]
    body = "\n".join(
        [
            f"## Extraction rollouts vs the bare generation bound (`--budget {args.budget}`)",
            "",
            f"Command: `{command_line()}`",
            "",
            *machine_lines(lm.device),
            "",
            f"{len(plan(settings))} rollouts in batches of {args.batch_size}, sampled, "
            f"{settings.max_new_tokens} new tokens max, all {layout.num_layers + 1} layer "
            f"positions captured; median of {args.repeats} interleaved runs.",
            "",
            md_table(["way", "seconds", "vs bound"], rows),
            "",
            "`persona-lens` captures response/prompt means of every layer while generating; "
            "`generate-then-forward` reads them with a second batched forward pass. Goal: within "
            "15% of the bound.",
        ]
    )
    write_section("extract", body)


if __name__ == "__main__":
    main()
