"""Overhead of steering, monitoring and capture during generation (persona-lens).

Three measurements on one model, all configurations interleaved, medians over repeats:

a. plain HF ``model.generate`` vs ``persona_lens.core.generation.generate`` without steering, with
   one vector at one layer, with all-layer steering (``layers="all"``) and with 3 vectors at
   once -> tokens/s and ratio to plain generate (goal: steering overhead under 3%);
b. capture during generation (``capture_layers=None``: all L+1 positions, prompt stats and
   response mean) vs generate-then-forward (generate, then one batched forward over
   prompt + response with ``capture_forward``) -> wall-time ratio;
c. per-token monitoring with 1 and 3 monitors vs no monitor (goal: under 3%).

Every run generates exactly ``--max-new-tokens`` per prompt: greedy decoding with steering
changes the text and could stop at an EOS earlier, so EOS is masked until the limit
(``min_new_tokens``), see ``_common.FixedLengthGenerate``. Capturing runs (capture, monitors)
generate one token more than asked, by design (the last response token must be fed back to
be captured); tokens/s counts every generated token, the wall-time columns show the cost of
the same 64-token responses.

Examples::

    python benchmarks/bench_overhead.py                      # embedded, CPU fp32, writes RESULTS.md
    python benchmarks/bench_overhead.py --model random:thin30 --parts a,c   # launch-bound proxy
    python benchmarks/bench_overhead.py --device cuda --dtype bf16 --results /tmp/r.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable
from typing import Any

import torch
from _common import (
    PROMPTS,
    FixedLengthGenerate,
    Sample,
    Subject,
    bench_parser,
    bench_subject,
    command_line,
    fmt,
    hf_generate,
    interleaved,
    machine_lines,
    md_table,
    median,
    paired_ratio,
    pct,
    timed,
    write_section,
)
from torch import nn

from persona_lens.core import steering
from persona_lens.core.architecture import BlockLayout, find_blocks
from persona_lens.core.capture import ActivationCapture, Monitor, capture_forward
from persona_lens.core.generation import Generation, generate
from persona_lens.core.steering import SteeringSpec, steering_vector

PARTS = ("a", "b", "c", "d")
CONFIGS_BY_PART = {
    "a": ["hf_generate", "pl_generate", "steer_1", "steer_all", "steer_3"],
    "b": ["pl_generate", "capture_all"],
    "c": ["pl_generate", "monitor_1", "monitor_3"],
    "d": [],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = bench_parser(__doc__)
    p.add_argument("--prompts", type=int, default=16, help="number of prompts (cycled)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--warmup-tokens", type=int, default=8, help="tokens per warm-up run")
    p.add_argument(
        "--parts",
        default="a,b,c,d",
        help="comma list of a, b, c, d (d: host cost of the hooks per step, on a stub)",
    )
    return p.parse_args(argv)


# --- the configurations -------------------------------------------------------------------
class Bench:
    def __init__(self, subject: Subject, args: argparse.Namespace) -> None:
        self.s = subject
        self.args = args
        self.layout = find_blocks(subject.model)
        n = self.layout.num_layers
        self.prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
        gen = torch.Generator().manual_seed(0)
        vectors = [torch.randn(n + 1, self.layout.hidden_size, generator=gen) for _ in range(3)]
        vectors = [v / v.norm(dim=-1, keepdim=True) for v in vectors]
        self.vectors = [steering_vector(v, f"v{i}") for i, v in enumerate(vectors)]
        self.mid = max(1, n // 2)
        self.three = sorted({max(1, n // 3), self.mid, max(1, (2 * n) // 3)})
        while len(self.three) < 3:  # tiny models: fall back to any distinct layers
            self.three = sorted({*self.three, len(self.three) + 1})[:3]
        coef = 4.0
        self.specs: dict[str, list[SteeringSpec]] = {
            "steer_1": [SteeringSpec(self.vectors[0], coef, self.mid)],
            "steer_all": [SteeringSpec(self.vectors[0], coef, "all")],
            "steer_3": [
                SteeringSpec(v, coef, layer)
                for v, layer in zip(self.vectors, self.three, strict=True)
            ],
        }
        self.monitors: dict[str, list[Monitor]] = {
            "monitor_1": [Monitor("m0", vectors[0][self.mid], self.mid)],
            "monitor_3": [
                Monitor(f"m{i}", v[layer], layer)
                for i, (v, layer) in enumerate(zip(vectors, self.three, strict=True))
            ],
        }
        self.counter = FixedLengthGenerate(subject.model)
        self.max_new_tokens = args.max_new_tokens
        self.last: dict[str, Any] = {}

    def hf_generate(self) -> None:
        hf_generate(
            self.s.model,
            self.s.tokenizer,
            self.prompts,
            self.args.batch_size,
            self.max_new_tokens,
        )

    def pl(self, name: str) -> list[Generation]:
        return generate(
            self.s.model,
            self.s.tokenizer,
            self.prompts,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.args.batch_size,
            seed=0,
            steering=self.specs.get(name, []),
            monitors=self.monitors.get(name, []),
            capture_layers=None if name == "capture_all" else (),
        )

    def forward_capture(self, gens: list[Generation]) -> list[torch.Tensor]:
        """Generate-then-forward's second step: one batched forward per batch, all layers."""
        tok, means = self.s.tokenizer, []
        for start in range(0, len(gens), self.args.batch_size):
            chunk = gens[start : start + self.args.batch_size]
            prompts = [tok(g.prompt_text, add_special_tokens=False)["input_ids"] for g in chunk]
            seqs = [p + g.response_ids for p, g in zip(prompts, chunk, strict=True)]
            width = max(map(len, seqs))
            ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
            attn = torch.zeros(len(seqs), width, dtype=torch.long)
            resp = torch.zeros(len(seqs), width, dtype=torch.bool)
            for row, (p, seq) in enumerate(zip(prompts, seqs, strict=True)):
                ids[row, width - len(seq) :] = torch.tensor(seq)
                attn[row, width - len(seq) :] = 1
                resp[row, width - len(seq) + len(p) :] = True
            dev = self.s.device
            result = capture_forward(
                self.s.model, ids.to(dev), attn.to(dev), resp.to(dev), layout=self.layout
            )
            assert result.response_mean is not None
            means.append(result.response_mean)
        return means

    def runner(self, name: str) -> Callable[[], Sample]:
        def run() -> Sample:
            if name == "hf_generate":
                sample, result = timed(self.hf_generate, self.s.device)
            else:
                sample, result = timed(lambda: self.pl(name), self.s.device)
            sample.tokens = self.counter.take()
            if name == "pl_generate" and "b" in self.args.parts:
                fwd, means = timed(lambda: self.forward_capture(result), self.s.device)
                sample.extra["forward"] = fwd.wall
                sample.extra["forward_cpu"] = fwd.cpu
                self.last["forward_means"] = means
            if name == "capture_all":
                self.last["capture_gens"] = result
            return sample

        return run

    def run(self, configs: list[str]) -> dict[str, list[Sample]]:
        runners = {name: self.runner(name) for name in configs}
        with self.counter:
            if self.args.warmup:
                self.max_new_tokens = self.args.warmup_tokens
                interleaved(runners, repeats=0, warmup=self.args.warmup)
            self.max_new_tokens = self.args.max_new_tokens
            return interleaved(runners, repeats=self.args.repeats, warmup=0)

    def capture_agreement(self) -> float | None:
        """Max relative difference of response means: during generation vs a second pass."""
        gens, means = self.last.get("capture_gens"), self.last.get("forward_means")
        if not gens or not means:
            return None
        during = torch.stack([g.response_mean for g in gens])
        after = torch.cat(means)
        scale = after.norm(dim=-1).clamp_min(1e-6)
        return float(((during - after).norm(dim=-1) / scale).max())


class HookStub(nn.Module):
    """An embedding and L identity blocks: its forward costs only module calls, so timing it
    with persona-lens hooks attached isolates their host cost per decoding step."""

    def __init__(self, layout: BlockLayout, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, layout.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(nn.Identity() for _ in range(layout.num_layers))
        self.stub_layout = BlockLayout(
            "layers",
            tuple(self.layers),
            "stub",
            layout.hidden_size,
            ("other",) * layout.num_layers,
        )

    def forward(
        self, input_ids: torch.Tensor, attention_mask: Any = None, cache: Any = None
    ) -> torch.Tensor:
        hidden = self.embed(input_ids)
        for block in self.layers:
            hidden = block(hidden)
        return hidden


STUB_CONFIGS = ["bare", "steer_1", "steer_all", "steer_3", "monitor_1", "monitor_3", "capture_all"]


def host_overhead(bench: Bench, rounds: int = 15, steps: int = 64) -> dict[str, list[float]]:
    """Median host time per decoding step of the stub, with each configuration's hooks."""
    s, batch = bench.s, min(bench.args.batch_size, len(bench.prompts))
    stub = HookStub(bench.layout, s.device, s.dtype).eval()
    layout = stub.stub_layout
    eos = 2
    prompt = torch.randint(3, 64, (batch, 40), device=s.device)
    mask = torch.ones_like(prompt)
    tokens = [torch.full((batch, 1), 5, device=s.device) for _ in range(steps)]
    tokens[steps // 2][0, 0] = eos  # one row ends halfway, as in real batches

    def one(name: str) -> float:
        with torch.no_grad(), contextlib.ExitStack() as stack:
            capture = None
            if name in bench.specs:
                stack.enter_context(steering.steer(stub, bench.specs[name], layout=layout))
            if name.startswith(("monitor", "capture")):
                capture = ActivationCapture(
                    stub,
                    layout,
                    layers=None if name == "capture_all" else (),
                    monitors=bench.monitors.get(name, []),
                    eos_token_ids=[eos],
                    prompt_stats=name == "capture_all",
                    response_mean=name == "capture_all",
                )
                capture.begin(max_response_tokens=steps)
                capture.attach()
            stub(input_ids=prompt, attention_mask=mask)
            cache = object()
            sample, _ = timed(
                lambda: [stub(input_ids=t, attention_mask=mask, cache=cache) for t in tokens],
                s.device,
            )
            if capture is not None:
                capture.remove()
                capture.result()
        return sample.wall / steps

    names = list(STUB_CONFIGS)
    times: dict[str, list[float]] = {}
    for rnd in range(rounds + 1):  # round 0 warms up
        for name in names[rnd % len(names) :] + names[: rnd % len(names)]:
            per_step = one(name)
            if rnd:
                times.setdefault(name, []).append(per_step)
    return times


def host_report(bench: Bench, times: dict[str, list[float]], step_seconds: float | None) -> str:
    s = bench.s
    bare = median(times["bare"])
    rows = []
    for key, values in sorted(times.items(), key=lambda kv: kv[0] != "bare"):
        extra = median(values) - bare
        share = f"{extra / step_seconds * 100:+.2f}%" if step_seconds and key != "bare" else ""
        rows.append(
            [
                _label(key) if key != "bare" else "no hooks (L identity blocks)",
                fmt(median(values) * 1e6, 0),
                fmt(extra * 1e6, 0) if key != "bare" else "",
                share,
            ]
        )
    ref = (
        f"{step_seconds * 1e3:.2f} ms, the median CPU time per step of `pl_generate` above"
        if step_seconds
        else "not measured (part a off)"
    )
    return "\n".join(
        [
            "",
            f"Host cost of the hooks per decoding step (part d): a stub with the model's "
            f"{bench.layout.num_layers} blocks replaced by identities, batch "
            f"{min(bench.args.batch_size, len(bench.prompts))}, d={bench.layout.hidden_size}, "
            f"{s.device.type} {str(s.dtype).removeprefix('torch.')}, 64 steps x 15 rounds, "
            "medians; "
            f"the share is relative to the real model's decoding step ({ref}).",
            "",
            md_table(["hooks", "us/step", "+us/step", "share of a real step"], rows),
        ]
    )


# --- report -------------------------------------------------------------------------------
LABELS = {
    "hf_generate": "plain HF `model.generate`",
    "pl_generate": "persona-lens `generate`, no steering",
    "steer_1": "steering: 1 vector, 1 layer",
    "steer_all": "steering: 1 vector, all layers",
    "steer_3": "steering: 3 vectors, 3 layers",
    "monitor_1": "1 monitor (per-token projection)",
    "monitor_3": "3 monitors",
    "capture_all": "capture during generation, all layers",
}


def _label(name: str) -> str:
    return LABELS.get(name, name)


def report_header(bench: Bench, args: argparse.Namespace) -> list[str]:
    s, n = bench.s, bench.layout.num_layers
    return [
        f"### Overhead: {s.label}, {s.device.type} {str(s.dtype).removeprefix('torch.')}",
        "",
        f"- command: `{command_line()}`",
        *machine_lines(s.device),
        f"- model: {s.label}, {n} blocks, d={bench.layout.hidden_size}, "
        f"{s.params / 1e6:.0f}M parameters",
        f"- workload: {len(bench.prompts)} chat prompts, batch {args.batch_size}, greedy, seed 0, "
        f"{args.max_new_tokens} new tokens per prompt (EOS masked so every configuration "
        f"generates the same count); {args.repeats} interleaved repeats after "
        f"{args.warmup} warm-up round(s) of {args.warmup_tokens} tokens; medians",
        f"- steering layers: one = {bench.mid}, three = {bench.three}, all = 1..{n} "
        f"(layer-incremental); monitors at the same layers",
        "",
    ]


def report(bench: Bench, samples: dict[str, list[Sample]], args: argparse.Namespace) -> str:
    lines = report_header(bench, args)
    if not samples:
        return "\n".join(lines)
    base = "hf_generate" if "hf_generate" in samples else "pl_generate"
    rows = []
    batches = -(-len(bench.prompts) // args.batch_size)
    for name, runs in samples.items():
        ref = samples[base]
        ratio = paired_ratio(runs, ref) if name != base else 1.0
        cpu_ratio = paired_ratio(runs, ref, "cpu_tps") if name != base else 1.0
        steps = runs[0].tokens / len(bench.prompts) * batches
        extra = median([(r.cpu - b.cpu) / steps * 1e3 for r, b in zip(runs, ref, strict=True)])
        rows.append(
            [
                _label(name),
                runs[0].tokens,
                fmt(median([r.wall for r in runs]), 2),
                fmt(median([r.cpu for r in runs]), 2),
                fmt(median([r.tps for r in runs]), 1),
                fmt(ratio),
                fmt(cpu_ratio),
                pct(cpu_ratio),
                fmt(extra, 2) if name != base else "",
            ]
        )
    lines.append(
        md_table(
            [
                "configuration",
                "tokens/run",
                "wall s",
                "CPU s",
                "tokens/s",
                "ratio (wall)",
                "ratio (CPU)",
                "overhead (CPU)",
                "+CPU ms/step",
            ],
            rows,
        )
    )
    lines += [
        "",
        f"Ratios are throughput ratios to `{base}`, medians of per-round ratios (each "
        "round runs every configuration once). `ratio (wall)` uses tokens per wall second, "
        "`ratio (CPU)` tokens per CPU second of this process, which other processes on a "
        "shared machine disturb far less; `overhead (CPU)` = 1/ratio (CPU) - 1; "
        "`+CPU ms/step` is the extra CPU time per decoding step. Capturing runs generate "
        "one extra token per prompt (the last response token must be fed back to be "
        "captured); tokens/s counts it.",
    ]
    if "pl_generate" in samples and "capture_all" in samples:
        plain = samples["pl_generate"]
        two_pass = [r.wall + r.extra.get("forward", 0.0) for r in plain]
        during = [r.wall for r in samples["capture_all"]]
        ratio = median([d / t for d, t in zip(during, two_pass, strict=True)])
        fwd = median([r.extra.get("forward", 0.0) for r in plain])
        agree = bench.capture_agreement()
        lines += [
            "",
            md_table(
                ["capture of all layers", "median wall s"],
                [
                    [
                        "generate, then one forward with `capture_forward`",
                        f"{fmt(median(two_pass), 2)} ({fmt(median([r.wall for r in plain]), 2)} + "
                        f"{fmt(fwd, 2)} forward)",
                    ],
                    ["capture during generation (`capture_layers=None`)", fmt(median(during), 2)],
                    ["ratio during / generate-then-forward", fmt(ratio)],
                ],
            ),
            "",
            "Both give the same response means (max relative difference "
            f"{'n/a' if agree is None else f'{agree:.1e}'}, last round).",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not parts or any(p not in PARTS for p in parts):
        raise SystemExit(f"--parts takes a comma list of {PARTS}")
    args.parts = parts
    configs: list[str] = []
    for part in parts:
        configs += [c for c in CONFIGS_BY_PART[part] if c not in configs]
    subject = bench_subject(args)
    bench = Bench(subject, args)
    print(f"{subject.label} on {subject.device}: {configs}", file=sys.stderr)
    samples = bench.run(configs) if configs else {}
    text = report(bench, samples, args)
    if "d" in parts:
        times = host_overhead(bench)
        step = None
        if "pl_generate" in samples:
            runs = samples["pl_generate"]
            batches = -(-len(bench.prompts) // args.batch_size)
            # host-bound CPU runs: CPU time per step; on a GPU, wall time per step
            key = "cpu" if subject.device.type == "cpu" else "wall"
            steps = runs[0].tokens / len(bench.prompts) * batches
            step = median([getattr(r, key) for r in runs]) / steps
        text += "\n" + host_report(bench, times, step)
    print(text)
    if args.json:
        raw = {k: [vars(s) for s in v] for k, v in samples.items()}
        args.json.write_text(
            json.dumps(
                {
                    "args": vars(args) | {"results": str(args.results), "json": str(args.json)},
                    "samples": raw,
                },
                indent=1,
            )
        )
    if not args.no_write:
        dtype = str(subject.dtype).removeprefix("torch.")
        name = args.section or f"overhead {args.model} {subject.device.type} {dtype}"
        write_section(name, text, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
