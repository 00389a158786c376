"""Steering and monitoring overhead on a block-diffusion model, per denoising step.

A random DiffusionGemma (``micro``: the zoo's model with its 128-token vocabulary; ``tiny``:
the same with the embedded tokenizer's vocabulary; ``larger``: d=256, 8 layers, canvas 32)
generates for a batch of chat prompts; every configuration runs the same canvases and
denoising steps (no end token, and the random model never meets the adaptive stop: checked
by counting decoder forwards once, outside the timed runs):

- plain HF ``model.generate``;
- steering: one vector at one layer, and ``layers="all"`` (both streams, every step);
- monitoring: one trait (per-token projections on the committed tokens and the projection at
  every denoising step), which adds one encoder forward over the last canvas;
- capture for extraction: every layer position's response mean and prompt statistics.

Each configuration's CPU time (process time, robust to other jobs waiting for the CPU; wall
times are shown too) over interleaved repeats; medians; overhead = paired ratio to plain, and
extra CPU ms per denoising step. The machine is shared: read differences of a few percent as
noise unless they repeat.

Usage::

    python benchmarks/bench_diffusion.py                       # micro, tiny (4.1M), larger (22M)
    python benchmarks/bench_diffusion.py --presets tiny --repeats 3 --no-write
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from _common import (
    PROMPTS,
    ROOT,
    Sample,
    bench_parser,
    chat_text,
    command_line,
    fmt,
    interleaved,
    machine_lines,
    md_table,
    median,
    offline_tokenizer,
    paired_ratio,
    pct,
    timed,
    write_section,
)

from persona_lens.core.architecture import find_blocks
from persona_lens.core.capture import Monitor
from persona_lens.core.diffusion.capture import DiffusionCapture
from persona_lens.core.diffusion.generation import encode_last_canvas
from persona_lens.core.models import prepare_tokenizer
from persona_lens.core.steering import SteeringSpec, steer, steering_vector

sys.path.insert(0, str(ROOT))
from tests import zoo
from tests.tiny import tiny_tokenizer

PRESETS: dict[str, dict[str, int]] = {
    # the zoo's model with its 128-token vocabulary: forwards cost little, so the hooks' host
    # cost per step shows (a launch-bound proxy)
    "micro": {"hidden_size": 64, "num_layers": 4, "canvas_length": 8, "denoising_steps": 4},
    "tiny": {"hidden_size": 64, "num_layers": 4, "canvas_length": 8, "denoising_steps": 4},
    "larger": {"hidden_size": 256, "num_layers": 8, "canvas_length": 32, "denoising_steps": 8},
}
NEW_TOKENS = {"micro": 32, "tiny": 32, "larger": 64}
BATCH = {"micro": 8, "tiny": 8, "larger": 4}  # prompts per batch (--batch-size overrides)


def _count_steps(model: torch.nn.Module, run: Callable[[], Any]) -> int:
    calls = []
    handle = model.get_decoder().register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        run()
    finally:
        handle.remove()
    return len(calls)


def bench(preset: str, args: Any, tokenizer: Any) -> str:
    if preset == "micro":
        tokenizer = prepare_tokenizer(tiny_tokenizer(zoo.VOCAB_SIZE))
    ids = (tokenizer.pad_token_id, tokenizer.bos_token_id or 0, tokenizer.eos_token_id)
    model = zoo.build_diffusion_gemma(len(tokenizer), token_ids=ids, **PRESETS[preset])
    layout = find_blocks(model)
    texts = [chat_text(tokenizer, p) for p in PROMPTS[: args.batch_size or BATCH[preset]]]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    new_tokens = NEW_TOKENS[preset]
    rows = torch.randn(layout.num_layers + 1, layout.hidden_size, generator=torch.Generator())
    vector = steering_vector(rows)
    middle = layout.num_layers // 2
    monitor = Monitor("m", rows[middle], middle)

    def hf() -> Any:
        torch.manual_seed(0)
        with torch.no_grad():
            return model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                max_new_tokens=new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=None,
                return_dict_in_generate=True,
            )

    @contextlib.contextmanager
    def capturing(**kwargs: Any) -> Iterator[Callable[[Any], None]]:
        capture = DiffusionCapture(model, layout, eos_token_ids=[], **kwargs)
        capture.begin(prompt_mask=batch["attention_mask"], max_response_tokens=new_tokens)
        with capture:
            yield lambda out: encode_last_canvas(
                layout, out.sequences, out.cache, batch["attention_mask"]
            )
        capture.result()

    def steered(layers: Any) -> Callable[[], Any]:
        def run() -> Any:
            with steer(model, SteeringSpec(vector, 1.0, layers)):
                return hf()

        return run

    def captured(**kwargs: Any) -> Callable[[], Any]:
        def run() -> Any:
            with capturing(**kwargs) as finish, torch.no_grad():
                out = hf()
                finish(out)
            return out

        return run

    configs = {
        "plain HF `model.generate`": hf,
        "steering: 1 vector, 1 layer": steered(middle),
        "steering: all layers, both streams": steered("all"),
        "monitor: 1 trait (tokens + every step)": captured(
            layers=(), monitors=[monitor], prompt_stats=False, response_mean=False
        ),
        "capture: all layers (extraction)": captured(layers=None),
    }
    steps = {name: _count_steps(model, run) for name, run in configs.items()}
    assert len(set(steps.values())) == 1, f"configurations ran different step counts: {steps}"
    step_count = next(iter(steps.values()))

    def runner(fn: Callable[[], Any]) -> Callable[[], Sample]:
        def go() -> Sample:
            sample, _ = timed(fn, torch.device("cpu"))
            sample.tokens = new_tokens * len(texts)
            return sample

        return go

    samples = interleaved({k: runner(v) for k, v in configs.items()}, args.repeats, args.warmup)
    base = samples["plain HF `model.generate`"]
    table = []
    for name, values in samples.items():
        cpu = median([s.cpu for s in values])
        ratio = paired_ratio(values, base, key="cpu_tps")
        extra = median(
            [(s.cpu - b.cpu) * 1000 / step_count for s, b in zip(values, base, strict=True)]
        )
        table.append(
            [
                name,
                fmt(median([s.wall for s in values]), 2),
                fmt(cpu, 2),
                fmt(ratio),
                pct(ratio),
                fmt(extra, 2) if values is not base else "",
            ]
        )
    params = sum(p.numel() for p in model.parameters())
    config = PRESETS[preset]
    return "\n".join(
        [
            f"### Block diffusion overhead: random DiffusionGemma `{preset}`, cpu float32",
            "",
            f"- command: `{command_line()}`",
            *machine_lines(torch.device("cpu")),
            f"- model: {params / 1e6:.1f}M parameters, {config['num_layers']} layers, "
            f"d={config['hidden_size']}, canvas {config['canvas_length']}, "
            f"{config['denoising_steps']} denoising steps per canvas",
            f"- workload: {len(texts)} chat prompts in one batch, {new_tokens} new tokens each "
            f"({new_tokens // config['canvas_length']} canvases, {step_count} decoder forwards "
            f"per run in every configuration), seeded; {args.repeats} interleaved repeats "
            f"after {args.warmup} warm-up round(s); medians; CPU = process time",
            "",
            md_table(
                [
                    "configuration",
                    "wall s",
                    "CPU s",
                    "ratio (CPU)",
                    "overhead (CPU)",
                    "+CPU ms/denoising step",
                ],
                table,
            ),
        ]
    )


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--presets", default="micro,tiny,larger")
    parser.set_defaults(batch_size=0, repeats=5)
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    tokenizer = offline_tokenizer()
    for preset in args.presets.split(","):
        body = bench(preset, args, tokenizer)
        print(body)
        if not args.no_write:
            write_section(f"diffusion overhead {preset}", body, args.results)


if __name__ == "__main__":
    main()
