"""Cost of a training step with training-time interventions vs a plain LoRA step (persona-lens).

One LoRA adapter (the paper's rsLoRA r 32, alpha 64, all linear layers) on the model, one fixed
batch of rows from the synthetic ``evil`` II dataset, and for every configuration the same
step: ``SteeredTrainer.training_step`` (forward with the configuration's hooks, loss on the
assistant tokens, backward) + AdamW step + ``zero_grad``. Configurations:

- plain LoRA step (no intervention);
- preventative steering at one layer (``--prevent VEC:COEF@L``);
- preventative steering at all layers (layer-incremental vectors, ``@all``);
- CAFT-style ablation at one layer (``--ablate VEC@L``);
- projection penalty at one layer (``--regularize``): one extra no-grad forward with the
  adapter disabled, so it is expected to cost more; reported for comparison, not in the goal.

Goal: the steering and ablation steps within 3% of the plain step (CPU-time ratio). The
vector is random with the norms of a real one (the cost does not depend on its values).
All configurations run in every round, in rotating order; medians of per-round ratios.

Examples::

    python benchmarks/bench_train.py                    # embedded, CPU fp32, writes RESULTS.md
    python benchmarks/bench_train.py --repeats 7 --steps 3 --batch-size 2
    python benchmarks/bench_train.py --device cuda --dtype bf16 --results /tmp/r.md
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from _common import (
    Sample,
    bench_parser,
    bench_subject,
    command_line,
    interleaved,
    machine_lines,
    md_table,
    median,
    paired_ratio,
    timed,
    write_section,
)

from persona_lens.core.architecture import find_blocks
from persona_lens.core.vectors import PersonaVector
from persona_lens.screening.synthetic import synthetic_dataset
from persona_lens.training.adapters import lora_attached
from persona_lens.training.config import TrainConfig
from persona_lens.training.data import IGNORE, PadCollator, read_dataset, tokenize_all
from persona_lens.training.interventions import Intervention

CONFIGS = {
    "plain": "plain LoRA step",
    "prevent_1": "preventative steering, 1 layer",
    "prevent_all": "preventative steering, all layers (incremental)",
    "ablate_1": "ablation (CAFT), 1 layer",
    "regularize_1": "projection penalty, 1 layer (+1 no-grad forward)",
}
GOAL = ("prevent_1", "prevent_all", "ablate_1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = bench_parser(__doc__)
    p.set_defaults(batch_size=2)
    p.add_argument("--steps", type=int, default=2, help="training steps per timed run")
    p.add_argument("--layer", type=int, default=15, help="the one-layer interventions' layer")
    p.add_argument("--coefficient", type=float, default=2.0)
    return p.parse_args(argv)


def _vector(num_layers: int, hidden: int, seed: int = 0) -> PersonaVector:
    """A random [L+1, d] vector whose row norms grow with depth like an extracted one's."""
    rows = torch.randn(num_layers + 1, hidden, generator=torch.Generator().manual_seed(seed))
    norms = torch.linspace(1.0, 40.0, num_layers + 1).unsqueeze(-1)
    return PersonaVector(rows / rows.norm(dim=-1, keepdim=True) * norms, "random")


def main(argv: list[str] | None = None) -> None:
    from transformers import TrainingArguments

    from persona_lens.training.trainer import SteeredTrainer

    args = parse_args(argv)
    subject = bench_subject(args)
    layout = find_blocks(subject.model)
    vector = _vector(layout.num_layers, layout.hidden_size)
    dataset = read_dataset(synthetic_dataset("evil", "ii"))
    examples = tokenize_all(subject.tokenizer, dataset, 256)[: args.batch_size]
    pad = int(subject.tokenizer.pad_token_id or 0)
    batch = PadCollator(pad)([e.features() for e in examples])
    batch = {k: v.to(subject.device) for k, v in batch.items()}
    items = {
        "plain": (),
        "prevent_1": (Intervention("prevent", vector, args.coefficient, args.layer),),
        "prevent_all": (Intervention("prevent", vector, args.coefficient, "all"),),
        "ablate_1": (Intervention("ablate", vector, 1.0, args.layer),),
        "regularize_1": (Intervention("regularize", vector, 0.01, args.layer),),
    }
    config = TrainConfig()
    scratch = tempfile.TemporaryDirectory(prefix="bench-train-")
    with scratch, lora_attached(subject.model, config) as peft_model:
        optimizer = torch.optim.AdamW(
            [p for p in peft_model.parameters() if p.requires_grad], lr=config.learning_rate
        )
        targs = TrainingArguments(
            output_dir=scratch.name,
            report_to="none",
            use_cpu=subject.device.type == "cpu",
            bf16=subject.dtype == torch.bfloat16,
            per_device_train_batch_size=args.batch_size,
        )
        trainers = {
            name: SteeredTrainer(model=peft_model, args=targs, interventions=i, layout=layout)
            for name, i in items.items()
        }
        tokens = int((batch["labels"][:, 1:] != IGNORE).sum())

        def runner(trainer: SteeredTrainer) -> Callable[[], Sample]:
            trainer.current_gradient_accumulation_steps = 1

            def run() -> None:
                for _ in range(args.steps):
                    trainer.training_step(peft_model, dict(batch), tokens)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

            return lambda: timed(run, subject.device)[0]

        samples = interleaved(
            {n: runner(t) for n, t in trainers.items()}, args.repeats, args.warmup
        )
    report(args, subject, samples, tokens, layout.num_layers)


def report(
    args: argparse.Namespace,
    subject: Any,
    samples: dict[str, list[Sample]],
    tokens: int,
    num_layers: int,
) -> None:
    plain = samples["plain"]
    headers = ["configuration", "CPU ms/step", "ratio (wall)", "ratio (CPU)", "overhead (CPU)"]
    headers.append("within 3%")
    headers = ["configuration", "CPU ms/step", "ratio (wall)", "ratio (CPU)", "overhead (CPU)"]
    headers.append("within 3%")
    rows = []
    for name, label in CONFIGS.items():
        ours = samples[name]
        cpu_ratio = paired_ratio(ours, plain, "cpu")
        wall_ratio = paired_ratio(ours, plain, "wall")
        ms = 1000 * median([s.cpu for s in ours]) / args.steps
        goal = ("yes" if cpu_ratio <= 1.03 else "no") if name in GOAL else ""
        rows.append([label, f"{ms:.0f}", f"{wall_ratio:.3f}", f"{cpu_ratio:.3f}",
                     f"{100 * (cpu_ratio - 1):+.1f}%", goal])  # fmt: skip
    name = args.section or f"train {subject.label.split()[0]} {subject.device.type}"
    dtype = str(subject.dtype).split(".")[-1]
    body = [
        f"### Training step: {subject.label}, {subject.device.type} {dtype}",
        "",
        f"- command: `{command_line()}`",
        *machine_lines(subject.device),
        f"- workload: rsLoRA r 32, alpha 64, all linear layers; batch of {args.batch_size} rows "
        f"of the synthetic evil II set ({tokens} assistant tokens); a timed run = {args.steps} "
        "training steps (forward + backward + AdamW step); "
        f"{args.repeats} interleaved repeats after {args.warmup} warm-up round(s); medians",
        f"- one-layer interventions at layer {args.layer}; all layers = 1..{num_layers}; "
        f"steering coefficient {args.coefficient:g}",
        "",
        md_table(headers, rows),
        "",
        "Ratios are time ratios to the plain LoRA step (> 1: slower), medians of per-round "
        "ratios (each round runs every configuration once, in rotating order). The hooks are "
        "attached and removed around every training forward, so their cost is included.",
    ]
    text = "\n".join(body)
    print(text)
    if args.json:
        raw = {k: [s.__dict__ for s in v] for k, v in samples.items()}
        args.json.write_text(json.dumps(raw, indent=2))
    if not args.no_write:
        write_section(name, text, args.results)


if __name__ == "__main__":
    main()
