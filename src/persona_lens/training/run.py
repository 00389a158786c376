"""``train()``: LoRA fine-tuning with interventions, resumable, written all at once.

Everything is checked before anything is written. The run works in ``.DIR.partial`` beside
``DIR`` (the run's identity, Trainer checkpoints, then the finished files); only when the
adapter, ``train.json``, the training config and the loss curve are all written is that folder
renamed to ``DIR``, so a failure or kill -9 never leaves a half-written ``DIR``. ``resume=True``
continues a killed run from its last complete checkpoint, after checking that the data, model,
settings and interventions are the same.

Under ``accelerate launch`` every process runs this function; the main process prepares the
work folder and writes the outputs, the others wait for it.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from persona_lens.core.files import atomic_write_text
from persona_lens.core.models import LoadedModel
from persona_lens.core.version import __version__
from persona_lens.training.adapters import RECORD, lora_attached
from persona_lens.training.config import TrainConfig
from persona_lens.training.data import (
    IGNORE,
    Dataset,
    Example,
    ExampleSet,
    PadCollator,
    read_dataset,
    split_holdout,
    tokenize_all,
)
from persona_lens.training.interventions import Intervention, check_interventions
from persona_lens.training.report import plot_loss_curve
from persona_lens.training.trainer import (
    CheckpointMarker,
    Progress,
    ProgressCallback,
    SteeredTrainer,
)
from persona_lens.training.workdir import (
    check_out,
    last_complete_checkpoint,
    partial_dir,
    prepare_work,
    publish,
)

FORMAT = "persona-lens-train/1"
CONFIG_FILE = "training_config.json"
LOSS_PLOT = "loss.png"


@dataclass(frozen=True)
class TrainResult:
    """Where the adapter went and its training record (``train.json``)."""

    out: Path
    record: dict[str, Any]
    main_process: bool = True  # False on the other processes of a distributed run


def train(
    loaded: LoadedModel,
    data: str | Path | Dataset,
    out: str | Path,
    *,
    config: TrainConfig | None = None,
    interventions: Sequence[Intervention] = (),
    resume: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
    callbacks: Sequence[Any] = (),
    model_spec: str | None = None,
) -> TrainResult:
    """Fine-tune a LoRA adapter on ``data`` with ``interventions`` during training forwards.

    The model is restored when this returns (the adapter is saved, then taken off).
    ``callbacks`` are extra ``transformers.TrainerCallback`` objects.
    """
    from accelerate import PartialState
    from transformers import set_seed

    config = (config or TrainConfig()).check()
    out = Path(out)
    work = partial_dir(out)
    # the same device choice as the TrainingArguments below: the first PartialState decides
    # the distributed set-up (on a CPU, several processes talk over gloo)
    state = PartialState(cpu=loaded.device.type == "cpu")
    check_out(out, resume=resume, overwrite=overwrite)
    dataset = data if isinstance(data, Dataset) else read_dataset(data)
    examples = tokenize_all(loaded.tokenizer, dataset, config.max_length)
    train_rows, held_rows = split_holdout(examples, config.holdout, config.seed)
    layout = loaded.layout
    items = tuple(interventions)
    check_interventions(items, layout, loaded.fingerprint)
    identity = {
        "format": FORMAT,
        "model": model_spec or loaded.spec,
        "model_fingerprint": loaded.fingerprint,
        "data_hash": dataset.data_hash,
        "config": config.to_json(),
        "interventions": [i.describe(layout.num_layers) for i in items],
        "world_size": state.num_processes,
    }
    checkpoint = None
    if state.is_main_process:
        checkpoint = prepare_work(work, identity, resume=resume, overwrite=overwrite)
    state.wait_for_everyone()
    if not state.is_main_process:
        checkpoint = last_complete_checkpoint(work / "checkpoints") if resume else None
    started = time.time()
    set_seed(config.seed)  # the LoRA initialisation draws from the global generator
    with lora_attached(loaded.model, config) as peft_model:
        trainer = _trainer(
            loaded, peft_model, config, items, train_rows, work, progress, callbacks, state
        )
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        state.wait_for_everyone()
        record: dict[str, Any] = {}
        if state.is_main_process:
            record = _finish(loaded, peft_model, trainer, dataset, identity, train_rows, held_rows)
            record["resumed_from_step"] = int(checkpoint.name.split("-")[1]) if checkpoint else None
            record["duration_s"] = round(time.time() - started, 1)
            _write_outputs(work / "final", peft_model, trainer, record)
            publish(work, out)
        state.wait_for_everyone()
    if not state.is_main_process:
        record = json.loads((out / RECORD).read_text(encoding="utf-8"))
    return TrainResult(out, record, state.is_main_process)


# --- the Trainer ----------------------------------------------------------------------------------
def _trainer(
    loaded: LoadedModel,
    peft_model: Any,
    config: TrainConfig,
    interventions: tuple[Intervention, ...],
    rows: list[Example],
    work: Path,
    progress: Progress | None,
    callbacks: Sequence[Any],
    state: Any,
) -> SteeredTrainer:
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    on_gpu = loaded.device.type == "cuda"
    args = TrainingArguments(
        output_dir=str(work / "checkpoints"),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        lr_scheduler_type=config.scheduler,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        logging_steps=1,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,
        seed=config.seed,
        data_seed=config.seed,
        train_sampling_strategy="sequential",  # the order split_holdout shuffled, on any world size
        report_to="none",
        disable_tqdm=True,
        log_level="error",  # not one line per checkpoint rotation
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=not on_gpu and loaded.device.type != "mps",
        bf16=on_gpu and loaded.dtype == torch.bfloat16,
        fp16=on_gpu and loaded.dtype == torch.float16,
        ddp_find_unused_parameters=False,
    )
    extra = [CheckpointMarker(), *callbacks]
    if progress is not None and state.is_main_process:
        extra.insert(0, ProgressCallback(progress))
    pad_id = loaded.tokenizer.pad_token_id
    trainer = SteeredTrainer(
        model=peft_model,
        args=args,
        train_dataset=ExampleSet(rows),
        data_collator=PadCollator(int(pad_id if pad_id is not None else 0)),
        callbacks=extra,
        interventions=interventions,
        layout=loaded.layout,
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log line to stdout
    return trainer


# --- the outputs ----------------------------------------------------------------------------------
def heldout_loss(
    model: torch.nn.Module, examples: Sequence[Example], pad_id: int, batch_size: int = 8
) -> float | None:
    """Mean cross-entropy per assistant token over ``examples``, no steering, no gradients."""
    if not examples:
        return None
    collate = PadCollator(pad_id)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                batch = collate([e.features() for e in examples[start : start + batch_size]])
                batch = {k: v.to(device) for k, v in batch.items()}
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                shifted = logits.logits[:, :-1].float()
                labels = batch["labels"][:, 1:]
                losses = torch.nn.functional.cross_entropy(
                    shifted.reshape(-1, shifted.shape[-1]),
                    labels.reshape(-1),
                    ignore_index=IGNORE,
                    reduction="sum",
                )
                total += float(losses)
                count += int((labels != IGNORE).sum())
    finally:
        model.train(was_training)
    return total / count if count else None


def _finish(
    loaded: LoadedModel,
    peft_model: Any,
    trainer: SteeredTrainer,
    dataset: Dataset,
    identity: dict[str, Any],
    train_rows: list[Example],
    held_rows: list[Example],
) -> dict[str, Any]:
    """The training record: identity, data, steps, loss curve, held-out losses, versions."""
    pad_id = int(loaded.tokenizer.pad_token_id or 0)
    tuned = heldout_loss(peft_model, held_rows, pad_id)
    with peft_model.disable_adapter():
        base = heldout_loss(peft_model, held_rows, pad_id)
    history = trainer.state.log_history
    curve = [
        {k: h[k] for k in ("step", "loss", "penalty", "learning_rate") if k in h}
        for h in history
        if "loss" in h and isinstance(h.get("loss"), (int, float))
    ]
    tail = [c["loss"] for c in curve[-max(1, len(curve) // 5) :]]
    return {
        **identity,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data": {
            "path": str(dataset.path),
            "format": dataset.format,
            "hash": dataset.data_hash,
            "rows": len(dataset.conversations),
            "train_rows": len(train_rows),
            "heldout_rows": len(held_rows),
            "trained_tokens": sum(e.trained_tokens for e in train_rows),
        },
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "seed": identity["config"]["seed"],
        "loss_curve": curve,
        "first_loss": curve[0]["loss"] if curve else None,
        "final_loss": sum(tail) / len(tail) if tail else None,
        "heldout_loss": {"base": _finite(base), "tuned": _finite(tuned)},
        "versions": _versions(),
    }


def _write_outputs(
    final: Path, peft_model: Any, trainer: SteeredTrainer, record: dict[str, Any]
) -> None:
    shutil.rmtree(final, ignore_errors=True)
    final.mkdir(parents=True)
    peft_model.save_pretrained(str(final))
    config = {
        "train_config": record["config"],
        "interventions": record["interventions"],
        "lora": peft_model.peft_config["default"].to_dict(),
        "trainer": _json_ready(trainer.args.to_dict()),
    }
    atomic_write_text(final / CONFIG_FILE, json.dumps(_json_ready(config), indent=2) + "\n")
    plot_loss_curve(record, final / LOSS_PLOT)
    atomic_write_text(final / RECORD, json.dumps(_json_ready(record), indent=2) + "\n")


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_json_ready(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def _versions() -> dict[str, str]:
    import accelerate
    import peft
    import transformers

    return {
        "persona_lens": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
    }
