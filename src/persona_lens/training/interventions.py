"""What is done to the residual stream while training: preventative steering, ablation, or a
projection penalty, each with its persona vector, coefficient and layers.

- ``prevent`` (the paper's preventative steering): +coef * v at every token position of the
  training forwards, at one layer (coefficients up to about 5 in the paper) or, with
  ``layers="all"``, the layer-incremental vectors v_l - v_(l-1) at every block (up to about
  1.5); the raw, unnormalised vector;
- ``ablate`` (CAFT-style): the unit direction projected out at the chosen layer(s);
- ``regularize`` (the paper's baseline): ``coefficient`` weights a loss term on the change of
  the projection onto the unit direction, fine-tuned minus base
  (:mod:`persona_lens.training.regularization`).

Steering and ablation are ordinary :class:`~persona_lens.core.steering.SteeringSpec` values
attached only around training forwards; the adapter is always used without them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from persona_lens.core.architecture import BlockLayout
from persona_lens.core.errors import InputError, LayerError, VectorMismatchError
from persona_lens.core.steering import SteeringSpec, compile_specs
from persona_lens.core.vectors import PersonaVector, check_layer
from persona_lens.interop.prompts_io import LayerSel, parse_steer, parse_vector_ref

Kind = Literal["prevent", "ablate", "regularize"]
KINDS: tuple[Kind, ...] = ("prevent", "ablate", "regularize")


@dataclass(frozen=True)
class Intervention:
    """One training-time intervention. ``layers=None`` means the vector's ``best_layer``."""

    kind: Kind
    vector: PersonaVector
    coefficient: float = 1.0
    layers: LayerSel = None
    source: str = ""  # where the vector came from (a file path), for the record

    @property
    def flag(self) -> str:
        return f"--{self.kind}"

    def resolved_layers(self, num_layers: int) -> list[int]:
        """The blocks this intervention touches (1..L); LayerError naming the flag."""
        layers = self.layers
        if layers == "all":
            return list(range(1, num_layers + 1))
        if layers is None:
            if self.vector.best_layer is None:
                raise LayerError(
                    f"{self.flag} {self.source or self.vector.trait}: the vector has no "
                    "best_layer; add @LAYER"
                )
            layers = self.vector.best_layer
        values = [layers] if isinstance(layers, int) else list(layers)
        try:
            return [check_layer(layer, num_layers) for layer in values]
        except LayerError as exc:
            raise LayerError(f"{self.flag} {self.source or self.vector.trait}: {exc}") from exc

    def steering_spec(self) -> SteeringSpec:
        """The spec applied during training forwards (prevent and ablate only)."""
        if self.kind == "regularize":
            raise InputError("a projection penalty is a loss term, not a steering spec")
        layers: Any = list(self.layers) if isinstance(self.layers, tuple) else self.layers
        if self.kind == "ablate":
            return SteeringSpec(self.vector, 1.0, layers, operator="ablate")
        return SteeringSpec(self.vector, self.coefficient, layers)

    def describe(self, num_layers: int) -> dict[str, Any]:
        """What train.json records: kind, vector (path, trait, sha256), coefficient, layers."""
        return {
            "kind": self.kind,
            "vector": self.source or None,
            "vector_sha256": vector_digest(self.vector),
            "trait": self.vector.trait,
            "coefficient": self.coefficient,
            "layers": "all" if self.layers == "all" else self.resolved_layers(num_layers),
            "incremental": self.kind == "prevent" and self.layers == "all",
        }


def vector_digest(vector: PersonaVector) -> str:
    """sha256 of the vector's float32 values (16 hex characters)."""
    data = vector.vectors.contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def parse_intervention(kind: str, text: str) -> tuple[Path, float, LayerSel]:
    """``VEC:COEF[@LAYER]`` for prevent and regularize, ``VEC[@LAYER]`` for ablate."""
    option = f"--{kind}"
    if kind == "ablate":
        ref = parse_vector_ref(text, option)
        return ref.path, 1.0, ref.layers
    if kind not in KINDS:
        raise InputError(f"unknown intervention {kind!r}; choose one of {', '.join(KINDS)}")
    arg = parse_steer(text, option)
    return arg.path, arg.coefficient, arg.layers


def check_interventions(
    interventions: Sequence[Intervention], layout: BlockLayout, fingerprint: str | None = None
) -> None:
    """Refuse what cannot train: a vector for another model, a coefficient that is not finite
    (or a penalty weight that is not positive), a layer out of range, prevent and ablate on
    the same layer, or a projection penalty mixed with steering."""
    touched: dict[int, str] = {}
    for item in interventions:
        name = item.source or item.vector.trait
        try:
            item.vector.check_compatible(layout.num_layers, layout.hidden_size, fingerprint)
        except VectorMismatchError as exc:
            raise VectorMismatchError(f"{item.flag} {name}: {exc}") from exc
        if not math.isfinite(item.coefficient):
            raise InputError(f"{item.flag} {name}: the coefficient must be finite")
        if item.kind == "regularize" and item.coefficient <= 0:
            raise InputError(f"{item.flag} {name}: the penalty weight must be positive")
        for layer in item.resolved_layers(layout.num_layers):
            other = touched.get(layer)
            if item.kind != "regularize" and other is not None and other != item.kind:
                raise InputError(
                    f"--prevent and --ablate both act on layer {layer}; "
                    "steer and ablate on different layers"
                )
            if item.kind != "regularize":
                touched[layer] = item.kind
        if item.kind != "regularize":
            compile_specs([item.steering_spec()], layout)
    kinds = {i.kind for i in interventions}
    if "regularize" in kinds and kinds & {"prevent", "ablate"}:
        raise InputError(
            "--regularize is a separate method (a loss term measured against the unsteered "
            "base model); use it without --prevent or --ablate"
        )
