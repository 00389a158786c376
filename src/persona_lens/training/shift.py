"""The finetuning shift (the paper's section 4.2).

1. the mean last-prompt-token activation over the trait's evaluation questions, for the base
   model and for the fine-tuned one (no system prompt beyond the chat template's own);
2. their difference projected onto the persona vector's unit direction, at every layer
   position 0..L (each layer on its own row of the vector);
3. reported per layer and at the vector's layer (its ``best_layer``, or the one given).

A positive shift means fine-tuning moved the model's state along the trait direction.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from persona_lens.core.capture import capture_sequences
from persona_lens.core.errors import InputError
from persona_lens.core.files import atomic_write_text
from persona_lens.core.generation import render_chat
from persona_lens.core.models import LoadedModel
from persona_lens.core.vectors import PersonaVector, check_layer
from persona_lens.training.adapters import adapter_applied
from persona_lens.training.report import plot_shift


@dataclass
class FinetuningShift:
    """Per layer position 0..L: ``shift[l] = (mean_tuned_l - mean_base_l) . v_l / |v_l|``."""

    trait: str
    layer: int | None
    per_layer: list[float]
    base_projection: list[float]
    tuned_projection: list[float]
    shift_norm: list[float]  # |mean_tuned_l - mean_base_l|, for scale
    questions: int
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def at_layer(self) -> float | None:
        return self.per_layer[self.layer] if self.layer is not None else None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "at_layer": self.at_layer}


def mean_prompt_last(
    loaded: LoadedModel, questions: Sequence[str], *, batch_size: int = 16
) -> torch.Tensor:
    """Mean last-prompt-token activation [L+1, d] over ``questions`` asked as user turns."""
    if not questions:
        raise InputError("the finetuning shift needs at least one evaluation question")
    tokenizer = loaded.tokenizer
    prompts = [
        list(
            tokenizer(
                render_chat(tokenizer, [{"role": "user", "content": q}]), add_special_tokens=False
            )["input_ids"]
        )
        for q in questions
    ]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results = capture_sequences(
        loaded.model,
        prompts,
        [[] for _ in prompts],
        pad_token_id=int(pad),
        layout=loaded.layout,
        batch_size=batch_size,
    )
    rows = [r.prompt_last[0] for r in results if r.prompt_last is not None]
    return torch.stack(rows).mean(dim=0)


def shift_between(
    base: torch.Tensor,
    tuned: torch.Tensor,
    vector: PersonaVector,
    *,
    layer: int | None = None,
    questions: int = 0,
) -> FinetuningShift:
    """The shift of ``tuned - base`` (both [L+1, d]) along each row of ``vector``."""
    if base.shape != vector.vectors.shape or tuned.shape != base.shape:
        raise InputError(
            f"activations {tuple(base.shape)} do not match the vector {tuple(vector.vectors.shape)}"
        )
    chosen = layer if layer is not None else vector.best_layer
    if chosen is not None:
        check_layer(chosen, vector.num_layers, allow_zero=True)
    unit = vector.normalized().vectors
    delta = tuned.float() - base.float()
    return FinetuningShift(
        trait=vector.trait,
        layer=chosen,
        per_layer=(delta * unit).sum(-1).tolist(),
        base_projection=(base.float() * unit).sum(-1).tolist(),
        tuned_projection=(tuned.float() * unit).sum(-1).tolist(),
        shift_norm=delta.norm(dim=-1).tolist(),
        questions=questions,
    )


def finetuning_shift(
    loaded: LoadedModel,
    adapter: str | Path,
    vector: PersonaVector,
    questions: Sequence[str],
    *,
    layer: int | None = None,
    batch_size: int = 16,
) -> FinetuningShift:
    """Base activations, then the same with the adapter applied (removed again after)."""
    vector.check_compatible(loaded.layout.num_layers, loaded.layout.hidden_size, loaded.fingerprint)
    base = mean_prompt_last(loaded, questions, batch_size=batch_size)
    with adapter_applied(loaded, adapter):
        tuned = mean_prompt_last(loaded, questions, batch_size=batch_size)
    shift = shift_between(base, tuned, vector, layer=layer, questions=len(questions))
    shift.metadata["adapter"] = str(adapter)
    return shift


def write_shift(shift: FinetuningShift, out: Path) -> list[Path]:
    """``out`` (JSON) and ``<stem>.png`` beside it."""
    if out.is_dir():
        raise InputError(f"--out {out} is a directory; give a .json file")
    if out.suffix == ".png":
        raise InputError(f"--out {out}: give a .json file (the .png goes beside it)")
    stem = out.with_suffix("") if out.suffix else out
    title = f"{shift.trait}: finetuning shift"
    if shift.at_layer is not None:
        title += f" ({shift.at_layer:+.3g} at layer {shift.layer})"
    png = plot_shift(shift.per_layer, shift.layer, title, Path(f"{stem}.png"))
    text = json.dumps(shift.to_json(), indent=2) + "\n"
    return [png, atomic_write_text(out, text)]
