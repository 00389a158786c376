"""Trait expression of fine-tuned adapters, beside the base model, in one ``persona eval``
table: each adapter is applied in turn and scored under the same conditions, sampling seed
and (already calibrated) judge as the base model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from persona_lens.core.models import LoadedModel
from persona_lens.core.steering import SteeringSpec
from persona_lens.monitoring.evaluation import (
    Advance,
    EvalSettings,
    ModelResult,
    build_conditions,
    run_conditions,
)
from persona_lens.training.adapters import adapter_applied
from persona_lens.traits.definitions import TraitDefinition

if TYPE_CHECKING:
    from persona_lens.judges.base import Judge


def evaluate_adapters(
    loaded: LoadedModel,
    judge: Judge,
    trait: TraitDefinition,
    settings: EvalSettings,
    adapters: Sequence[Path],
    *,
    steering: Sequence[SteeringSpec] = (),
    progress: Advance | None = None,
) -> list[ModelResult]:
    """Baseline (and, with ``steering``, steered) results for each adapter folder."""
    conditions, _ = build_conditions(steering, False, ())
    results = []
    for folder in adapters:
        with adapter_applied(loaded, folder):
            scored = run_conditions(
                loaded.model,
                loaded.tokenizer,
                loaded.layout,
                judge,
                trait,
                list(steering),
                conditions,
                settings,
                progress=progress,
            )
        results.append(ModelResult(str(folder), scored[0], scored[1] if steering else None))
    return results
