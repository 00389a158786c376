"""persona-lens: persona vectors for every architecture family.

The public API, importable from the package's top::

    from persona_lens import load_model, PersonaVector, SteeringSpec, generate, Monitor, screen

Names load on first use (PEP 562), so ``import persona_lens`` and the ``persona`` command
start without importing torch and transformers until they are needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from persona_lens.core.version import __version__

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # loading a model
    "load_model": "persona_lens.core.models",
    "LoadedModel": "persona_lens.core.models",
    "find_blocks": "persona_lens.core.architecture",
    "BlockLayout": "persona_lens.core.architecture",
    # vectors
    "PersonaVector": "persona_lens.core.vectors",
    "cosine_similarity": "persona_lens.core.vectors",
    # steering
    "SteeringSpec": "persona_lens.core.steering",
    "SteeringHandle": "persona_lens.core.steering",
    "steer": "persona_lens.core.steering",
    # generation and capture
    "generate": "persona_lens.core.generation",
    "Generation": "persona_lens.core.generation",
    "Monitor": "persona_lens.core.capture",
    "ActivationCapture": "persona_lens.core.capture",
    "CaptureResult": "persona_lens.core.capture",
    "capture_forward": "persona_lens.core.capture",
    "capture_sequences": "persona_lens.core.capture",
    # traits and extraction
    "TraitDefinition": "persona_lens.traits.definitions",
    "load_trait": "persona_lens.traits.definitions",
    "generate_trait": "persona_lens.traits.generator",
    "extract": "persona_lens.extraction.extract",
    "ExtractionOptions": "persona_lens.extraction.extract",
    "ExtractionResult": "persona_lens.extraction.extract",
    "load_judge": "persona_lens.judges.specs",
    # screening training data
    "screen": "persona_lens.screening.screen",
    "ScreenResult": "persona_lens.screening.results",
    "ScreenSummary": "persona_lens.screening.results",
    "synthetic_dataset": "persona_lens.screening.synthetic",
    # using a vector live
    "GuardSpec": "persona_lens.monitoring.guard",
    "guard": "persona_lens.monitoring.guard",
    "generate_guarded": "persona_lens.monitoring.guard",
    # one owner per model
    "owning": "persona_lens.core.ownership",
    # fine-tuning with preventative steering
    "train": "persona_lens.training.run",
    "TrainResult": "persona_lens.training.run",
    "TrainConfig": "persona_lens.training.config",
    "preset_config": "persona_lens.training.config",
    "Intervention": "persona_lens.training.interventions",
    "finetuning_shift": "persona_lens.training.shift",
    "FinetuningShift": "persona_lens.training.shift",
    # errors
    "PersonaLensError": "persona_lens.core.errors",
    "ModelBusyError": "persona_lens.core.errors",
}

__all__ = [
    "ActivationCapture",
    "BlockLayout",
    "CaptureResult",
    "ExtractionOptions",
    "ExtractionResult",
    "FinetuningShift",
    "Generation",
    "GuardSpec",
    "Intervention",
    "LoadedModel",
    "ModelBusyError",
    "Monitor",
    "PersonaLensError",
    "PersonaVector",
    "ScreenResult",
    "ScreenSummary",
    "SteeringHandle",
    "SteeringSpec",
    "TrainConfig",
    "TrainResult",
    "TraitDefinition",
    "__version__",
    "capture_forward",
    "capture_sequences",
    "cosine_similarity",
    "extract",
    "find_blocks",
    "finetuning_shift",
    "generate",
    "generate_guarded",
    "generate_trait",
    "guard",
    "load_judge",
    "load_model",
    "load_trait",
    "owning",
    "preset_config",
    "screen",
    "steer",
    "synthetic_dataset",
    "train",
]
assert set(__all__) == {"__version__", *_EXPORTS}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'persona_lens' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from persona_lens.core.architecture import BlockLayout, find_blocks
    from persona_lens.core.capture import (
        ActivationCapture,
        CaptureResult,
        Monitor,
        capture_forward,
        capture_sequences,
    )
    from persona_lens.core.errors import ModelBusyError, PersonaLensError
    from persona_lens.core.generation import Generation, generate
    from persona_lens.core.models import LoadedModel, load_model
    from persona_lens.core.ownership import owning
    from persona_lens.core.steering import SteeringHandle, SteeringSpec, steer
    from persona_lens.core.vectors import PersonaVector, cosine_similarity
    from persona_lens.extraction.extract import ExtractionOptions, ExtractionResult, extract
    from persona_lens.judges.specs import load_judge
    from persona_lens.monitoring.guard import GuardSpec, generate_guarded, guard
    from persona_lens.screening.results import ScreenResult, ScreenSummary
    from persona_lens.screening.screen import screen
    from persona_lens.screening.synthetic import synthetic_dataset
    from persona_lens.training.config import TrainConfig, preset_config
    from persona_lens.training.interventions import Intervention
    from persona_lens.training.run import TrainResult, train
    from persona_lens.training.shift import FinetuningShift, finetuning_shift
    from persona_lens.traits.definitions import TraitDefinition, load_trait
    from persona_lens.traits.generator import generate_trait
