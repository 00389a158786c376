"""``persona train``: LoRA fine-tuning with preventative steering, ablation or a projection
penalty during training, resumable after a kill."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from persona_lens.cli.app import ModelOption, app, console
from persona_lens.cli.generate import load_checked_model, load_vector_files

if TYPE_CHECKING:
    from persona_lens.training.trainer import Progress as ProgressFn


@contextmanager
def training_progress() -> Iterator[ProgressFn]:
    """A rich bar over optimiser steps, with the last logged training loss; it appears when
    training starts, so a refusal before that prints nothing but its one line."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    progress = Progress(*columns, console=console, transient=False)
    task = progress.add_task("training", total=None, start=False)

    def report(step: int, total: int, loss: float | None) -> None:
        if not progress.live.is_started:
            progress.start()
            progress.start_task(task)
        text = "training" if loss is None else f"training (loss {loss:.3f})"
        progress.update(task, description=text, completed=step, total=total or None)

    try:
        yield report
    finally:
        if progress.live.is_started:
            progress.stop()


@contextmanager
def quiet_loading() -> Iterator[None]:
    """No per-weight progress bar from transformers while the model loads."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


@app.command()
def train(
    data: Annotated[
        Path,
        typer.Argument(
            help="JSONL (messages format), CSV (prompt, response), Parquet, or a folder saved "
            "with datasets' save_to_disk."
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder (adapter, train.json, loss.png).")
    ],
    model: ModelOption = "embedded",
    prevent: Annotated[
        list[str] | None,
        typer.Option(
            help="VEC:COEF, VEC:COEF@LAYER or VEC:COEF@all: add COEF x vector during training "
            "forwards (default layer: the vector's best_layer; @all: the layer-incremental "
            "vectors at every block). Repeatable.",
        ),
    ] = None,
    ablate: Annotated[
        list[str] | None,
        typer.Option(
            help="VEC, VEC@LAYER or VEC@all: project the unit direction out during training "
            "forwards (CAFT). Repeatable."
        ),
    ] = None,
    regularize: Annotated[
        list[str] | None,
        typer.Option(
            help="VEC:WEIGHT or VEC:WEIGHT@LAYER: a loss term on the change of the projection "
            "onto the direction vs the base model (the paper's baseline)."
        ),
    ] = None,
    preset: Annotated[
        str, typer.Option(help="paper (the paper's defaults) | cpu-small (embedded on a CPU).")
    ] = "paper",
    epochs: Annotated[float | None, typer.Option(help="Passes over the data.")] = None,
    max_steps: Annotated[
        int | None, typer.Option(help="Optimiser steps (overrides --epochs).")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate.")] = None,
    lora_rank: Annotated[int | None, typer.Option(help="LoRA rank r.")] = None,
    lora_alpha: Annotated[float | None, typer.Option(help="LoRA alpha.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Rows per device per step.")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Gradient accumulation steps.")] = None,
    max_length: Annotated[
        int | None, typer.Option(help="Tokens per conversation (longer ones are cut).")
    ] = None,
    holdout: Annotated[
        float | None, typer.Option(help="Fraction of rows held out for the held-out loss.")
    ] = None,
    save_steps: Annotated[
        int | None, typer.Option(help="Checkpoint every N optimiser steps.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed (LoRA init, data order).")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue a killed run from its last checkpoint.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing --out folder.")
    ] = False,
) -> None:
    """Fine-tune a LoRA adapter (peft + transformers' Trainer; loss on assistant tokens only).

    --prevent steers toward the trait during training forwards only, so the optimiser has no
    need to move the weights along it (the paper's preventative steering); the adapter is
    used without steering. --ablate projects the direction out (CAFT); --regularize adds the
    paper's projection-penalty baseline. Runs under `accelerate launch` unchanged.

    Output folder: the adapter (loads with peft.PeftModel.from_pretrained), train.json (data
    hash, vectors, coefficients, layers, steps, seed, losses, versions), training_config.json
    and loss.png. Nothing is written there until the run has finished.

    Examples:\n
      persona train data.jsonl --out runs/plain\n
      persona train evil_ii.jsonl --prevent evil.safetensors:4 --out runs/prevent\n
      persona train evil_ii.jsonl --prevent evil.safetensors:1@all --preset cpu-small
      --out runs/prevent-all\n
      persona train data.jsonl --ablate evil.safetensors@12 --out runs/caft --resume\n
      accelerate launch --multi_gpu --num_processes 2 -m persona_lens.cli train data.jsonl
      --out runs/ddp   (2 GPUs, or 2 CPU processes over gloo on a machine without one)
    """
    from persona_lens.training.config import preset_config
    from persona_lens.training.workdir import check_out

    config = preset_config(
        preset,
        epochs=epochs,
        max_steps=max_steps,
        learning_rate=lr,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_length=max_length,
        holdout=holdout,
        save_steps=save_steps,
        seed=seed,
    )
    check_out(out, resume=resume, overwrite=overwrite)  # before anything heavy is imported
    from persona_lens.training.data import read_dataset
    from persona_lens.training.interventions import (
        Intervention,
        check_interventions,
        parse_intervention,
    )
    from persona_lens.training.run import train as run_train

    parsed = [
        (kind, *parse_intervention(kind, text))
        for kind, values in (("prevent", prevent), ("ablate", ablate), ("regularize", regularize))
        for text in values or ()
    ]
    dataset = read_dataset(data)
    vectors = load_vector_files([path for _, path, _, _ in parsed])
    with quiet_loading():
        loaded, _ = load_checked_model(model, vectors)
    interventions = [
        Intervention(kind, vectors[path], coef, layers, str(path))  # type: ignore[arg-type]
        for kind, path, coef, layers in parsed
    ]
    check_interventions(interventions, loaded.layout, loaded.fingerprint)
    with training_progress() as report:
        result = run_train(
            loaded,
            dataset,
            out,
            config=config,
            interventions=interventions,
            resume=resume,
            overwrite=overwrite,
            progress=report,
            model_spec=model,
        )
    if not result.main_process:
        return
    record = result.record
    held = record.get("heldout_loss") or {}
    parts = [
        f"{record['steps']} steps",
        f"loss {_fmt(record.get('first_loss'))} -> {_fmt(record.get('final_loss'))}",
    ]
    if held.get("tuned") is not None:
        parts.append(f"held-out loss {_fmt(held.get('base'))} -> {_fmt(held['tuned'])}")
    console.print("trained: " + ", ".join(parts))
    print(result.out)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
