"""The finetuning shift after plain, preventative, CAFT and regularised fine-tuning (the
paper's section 5 in miniature), per trait, on the embedded model.

For each trait of the synthetic datasets (evil, sycophantic, optimistic): extract its vector
(quick budget, no judge: the best held-out separating layer), then fine-tune LoRA adapters
with the same preset, seed and steps on

- the Normal set and the II set (plain);
- the II set with preventative steering at the vector's layer (``--coefficient``) and at
  all layers (layer-incremental vectors, ``--coefficient-all``);
- the II set with the direction ablated at the vector's layer (CAFT);
- the II set with the projection penalty at the vector's layer (``--weight``);
- the II set with preventative steering along a random direction with the vector's norms
  (control);

and report the finetuning shift at the vector's layer, the training loss (first step -> last
fifth of the steps, with steering where there is some) and the held-out loss without
steering (base -> fine-tuned). Writes one section of RESULTS.md per run of the script.

Examples::

    python benchmarks/training_shift.py                         # evil, cpu-small preset
    python benchmarks/training_shift.py --traits evil,sycophantic,optimistic
    python benchmarks/training_shift.py --vectors DIR           # DIR/TRAIT.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import RESULTS, command_line, machine_lines, md_table, write_section

from persona_lens.core.models import LoadedModel, load_model
from persona_lens.core.vectors import PersonaVector
from persona_lens.extraction.extract import ExtractionOptions, extract
from persona_lens.screening.synthetic import SYNTHETIC_TRAITS, synthetic_dataset
from persona_lens.training.adapters import adapter_applied
from persona_lens.training.config import preset_config
from persona_lens.training.interventions import Intervention
from persona_lens.training.run import train
from persona_lens.training.shift import mean_prompt_last, shift_between
from persona_lens.traits.definitions import load_trait


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--traits", default="evil", help=f"comma-separated, of {SYNTHETIC_TRAITS}")
    p.add_argument("--preset", default="cpu-small")
    p.add_argument("--coefficient", type=float, default=3.0, help="prevent, one layer")
    p.add_argument("--coefficient-all", type=float, default=1.0, help="prevent, all layers")
    p.add_argument("--weight", type=float, default=0.001, help="projection penalty weight")
    p.add_argument("--vectors", type=Path, default=None, help="folder of TRAIT.safetensors")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--json", type=Path, default=None, help="also dump every number here")
    p.add_argument("--no-write", action="store_true")
    return p.parse_args(argv)


def _vector(lm: LoadedModel, trait: str, folder: Path | None, scratch: Path) -> PersonaVector:
    if folder is not None and (folder / f"{trait}.safetensors").is_file():
        return PersonaVector.load(folder / f"{trait}.safetensors")
    options = ExtractionOptions(budget="quick", judge="none")
    return extract(lm, load_trait(trait), options, cache_dir=scratch / "rollouts").vector


def _random_like(vector: PersonaVector) -> PersonaVector:
    rows = torch.randn(vector.vectors.shape, generator=torch.Generator().manual_seed(0))
    rows = rows / rows.norm(dim=-1, keepdim=True) * vector.norms().unsqueeze(-1)
    return PersonaVector(rows, "random", dict(vector.metadata))


def run_trait(
    lm: LoadedModel, trait: str, vector: PersonaVector, args: argparse.Namespace, scratch: Path
) -> list[dict[str, Any]]:
    questions = load_trait(trait).evaluation_questions
    config = preset_config(args.preset)
    base = mean_prompt_last(lm, questions)
    plan = [
        ("plain, Normal", "normal", []),
        ("plain, II", "ii", []),
        (f"II + prevent {args.coefficient:g} @best", "ii",
         [Intervention("prevent", vector, args.coefficient)]),
        (f"II + prevent {args.coefficient_all:g} @all", "ii",
         [Intervention("prevent", vector, args.coefficient_all, "all")]),
        ("II + CAFT (ablate @best)", "ii", [Intervention("ablate", vector, 1.0)]),
        (f"II + regularize {args.weight:g} @best", "ii",
         [Intervention("regularize", vector, args.weight)]),
        (f"II + prevent {args.coefficient:g} @best, random direction", "ii",
         [Intervention("prevent", _random_like(vector), args.coefficient)]),
    ]  # fmt: skip
    rows = []
    for index, (label, version, items) in enumerate(plan):
        out = scratch / f"{trait}-{index}"
        started = time.process_time()
        record = train(
            lm, synthetic_dataset(trait, version), out, config=config, interventions=items
        ).record
        with adapter_applied(lm, out):
            tuned = mean_prompt_last(lm, questions)
        shift = shift_between(base, tuned, vector)
        row = {
            "trait": trait,
            "run": label,
            "layer": shift.layer,
            "shift": shift.at_layer,
            "change_norm": shift.shift_norm[shift.layer or 0],
            "first_loss": record["first_loss"],
            "final_loss": record["final_loss"],
            "heldout_base": record["heldout_loss"]["base"],
            "heldout_tuned": record["heldout_loss"]["tuned"],
            "steps": record["steps"],
            "curve": [c["loss"] for c in record["loss_curve"]],
            "cpu_s": time.process_time() - started,
        }
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    lm = load_model("embedded")
    traits = [t for t in args.traits.split(",") if t]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="training-shift-") as tmp:
        scratch = Path(tmp)
        for trait in traits:
            vector = _vector(lm, trait, args.vectors, scratch)
            rows += run_trait(lm, trait, vector, args, scratch)
    config = preset_config(args.preset)
    table = md_table(
        ["trait", "run", "shift at layer", "\\|change\\| at layer", "train loss first -> last",
         "held-out loss base -> tuned (no steering)"],
        [[r["trait"], r["run"], f"{r['shift']:+.2f} (L{r['layer']})", f"{r['change_norm']:.1f}",
          f"{r['first_loss']:.3f} -> {r['final_loss']:.3f}",
          f"{r['heldout_base']:.3f} -> {r['heldout_tuned']:.3f}"] for r in rows],
    )  # fmt: skip
    body = "\n".join(
        [
            "### Finetuning shift: plain, preventative, CAFT, regularised (embedded, cpu)",
            "",
            f"- command: `{command_line()}`",
            *machine_lines(torch.device("cpu")),
            f"- preset {args.preset}: rsLoRA r {config.lora_rank}, alpha {config.lora_alpha:g}, "
            f"lr {config.learning_rate:g}, {config.max_steps} steps x batch {config.batch_size}"
            f" x accumulation {config.grad_accum}, seed {config.seed}, held-out {config.holdout:g}"
            " of the rows; vectors: quick budget, no judge",
            "",
            table,
            "",
            md_table(
                ["trait", "run", "training loss per step"],
                [[r["trait"], r["run"], " ".join(f"{v:.2f}" for v in r["curve"])] for r in rows],
            ),
            "",
            "Shift: mean last-prompt-token activation over the trait's 20 evaluation questions, "
            "fine-tuned minus base, on the unit vector at its layer; |change|: the norm of that "
            "mean difference (for scale). Training loss with the run's steering on; held-out "
            "loss on the held-out rows without any steering.",
        ]
    )
    print(body)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if not args.no_write:
        write_section(f"training shift {','.join(traits)}", body, args.results)


if __name__ == "__main__":
    main()
