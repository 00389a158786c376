"""The HF ``Trainer`` with training-time interventions in its loss, and its callbacks.

:class:`SteeredTrainer` wraps ``compute_loss``: while the model is in training mode, the
preventative-steering / ablation hooks (a :class:`~persona_lens.core.steering.SteeringHandle`
on the blocks) are attached for exactly that forward and removed after it, so evaluation,
checkpoints and the saved adapter never see them. The hooks sit on the block modules
themselves, so they fire under any wrapper the training engine adds (peft, DDP through
``accelerate launch``). The projection penalty runs one extra no-grad forward with the adapter
disabled and adds its term to the loss.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from persona_lens.core.architecture import BlockLayout
from persona_lens.core.files import atomic_write_text
from persona_lens.core.steering import SteeringHandle, compile_specs
from persona_lens.training.interventions import Intervention
from persona_lens.training.regularization import ProjectionPenalty
from persona_lens.training.workdir import COMPLETE

Progress = Callable[[int, int, float | None], None]  # (step, total steps, last loss)


class SteeredTrainer(Trainer):
    """``Trainer`` whose training forwards carry the interventions' hooks and penalty."""

    def __init__(
        self,
        *args: Any,
        interventions: tuple[Intervention, ...] = (),
        layout: BlockLayout,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        specs = [i.steering_spec() for i in interventions if i.kind != "regularize"]
        model = cast(torch.nn.Module, self.model)
        self.steering = (
            SteeringHandle(model, compile_specs(specs, layout), layout) if specs else None
        )
        self.penalty = ProjectionPenalty(interventions, layout)
        self._penalty_sum = 0.0
        self._penalty_count = 0

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        if not model.training or (self.steering is None and not self.penalty):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        base = None
        tap: contextlib.AbstractContextManager[dict[int, torch.Tensor]] = contextlib.nullcontext({})
        if self.penalty:
            base = self._base_projections(inputs)
            tap = self.penalty.tap()
        steering = self.steering if self.steering is not None else contextlib.nullcontext()
        with steering, tap as hidden:
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        if base is not None:
            term = self.penalty.penalty(
                self.penalty.projections(hidden), base, inputs["attention_mask"]
            )
            self._penalty_sum += float(term.detach())
            self._penalty_count += 1
            loss = loss + term * self._penalty_scale(num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _base_projections(self, inputs: dict[str, Any]) -> dict[tuple[int, int], torch.Tensor]:
        peft_model = self.accelerator.unwrap_model(self.model)
        kwargs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        if "logits_to_keep" in inspect.signature(peft_model.get_base_model().forward).parameters:
            kwargs["logits_to_keep"] = 1  # only block outputs are wanted, not [B, T, vocab]
        return self.penalty.reference(lambda: peft_model(**kwargs), peft_model.disable_adapter())

    def _penalty_scale(self, num_items_in_batch: torch.Tensor | int | None) -> float:
        """1 / accumulation steps where the Trainer does not divide the loss itself, so the
        penalty is a mean over micro-batches like the token-mean cross-entropy."""
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (
                self.model_accepts_loss_kwargs and num_items_in_batch is not None
            ) or self.compute_loss_func is not None
        return 1.0 / self.current_gradient_accumulation_steps if scaled else 1.0

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._penalty_count:
            logs["penalty"] = self._penalty_sum / self._penalty_count
            self._penalty_sum, self._penalty_count = 0.0, 0
        super().log(logs, start_time)


class ProgressCallback(TrainerCallback):
    """Reports (step, total, last logged loss) to a progress function."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.loss: float | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self.progress(state.global_step, state.max_steps, None)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kw: Any,
    ) -> None:
        value = (logs or {}).get("loss")
        if value is not None and math.isfinite(value):
            self.loss = float(value)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self.progress(state.global_step, state.max_steps, self.loss)


class CheckpointMarker(TrainerCallback):
    """Marks a checkpoint complete once the Trainer has written all of it (``on_save`` runs
    after the state file), so a resume after kill -9 never picks a half-written one."""

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if state.is_world_process_zero:
            folder = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                atomic_write_text(folder / COMPLETE, f"{state.global_step}\n")
