"""How to fine-tune: LoRA and optimisation settings, and the named presets.

``paper`` holds the paper's defaults (rsLoRA, r 32, alpha 64, lr 1e-5, 1 epoch, batch 2 x 8
gradient accumulation); ``cpu-small`` is sized for the embedded 135M model on 2 CPU cores: a
smaller rank, a higher learning rate and a fixed number of steps, so an effect shows within
minutes. Explicit options override a preset's values.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from persona_lens.core.errors import InputError


@dataclass(frozen=True)
class TrainConfig:
    """LoRA supervised fine-tuning settings (one epoch = one pass over the training rows)."""

    lora_rank: int = 32
    lora_alpha: float = 64.0
    rslora: bool = True
    lora_dropout: float = 0.0
    target_modules: str = "all-linear"
    learning_rate: float = 1e-5
    epochs: float = 1.0
    max_steps: int | None = None  # optimiser steps; overrides epochs when set
    batch_size: int = 2  # per device
    grad_accum: int = 8
    warmup_steps: int = 5
    scheduler: str = "linear"
    weight_decay: float = 0.0
    max_length: int = 1024  # tokens per conversation (longer ones are cut at the end)
    holdout: float = 0.1  # fraction of rows kept out of training for the held-out loss
    save_steps: int = 10  # checkpoint every N optimiser steps
    seed: int = 0

    def check(self) -> TrainConfig:
        """Return self, or raise InputError naming the first bad value."""
        positive_ints = {
            "lora_rank": self.lora_rank,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "max_length": self.max_length,
            "save_steps": self.save_steps,
        }
        for name, value in positive_ints.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{_flag(name)} must be a positive integer, got {value!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise InputError(f"--max-steps must be at least 1, got {self.max_steps}")
        finite_positive = {
            "learning_rate": self.learning_rate,
            "epochs": self.epochs,
            "lora_alpha": self.lora_alpha,
        }
        for name, number in finite_positive.items():
            if not math.isfinite(number) or number <= 0:
                raise InputError(f"{_flag(name)} must be a finite positive number, got {number}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise InputError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0.0 <= self.holdout <= 0.5:
            raise InputError(f"--holdout must be a fraction in [0, 0.5], got {self.holdout}")
        if self.warmup_steps < 0 or not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise InputError("warmup steps and weight decay must be non-negative")
        return self

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, TrainConfig] = {
    "paper": TrainConfig(),
    "cpu-small": TrainConfig(
        lora_rank=8,
        lora_alpha=16.0,
        learning_rate=1e-3,
        max_steps=8,
        batch_size=4,
        grad_accum=1,
        warmup_steps=0,
        scheduler="constant",
        max_length=256,
        save_steps=4,
    ),
}


def preset_config(name: str, **overrides: Any) -> TrainConfig:
    """A preset with the given fields replaced (``None`` values keep the preset's); checked."""
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise InputError(f"unknown training settings: {', '.join(sorted(unknown))}")
    chosen = {k: v for k, v in overrides.items() if v is not None}
    return replace(PRESETS[name], **chosen).check()


def _flag(name: str) -> str:
    return "--" + {"grad_accum": "grad-accum", "learning_rate": "lr"}.get(
        name, name.replace("_", "-")
    )
