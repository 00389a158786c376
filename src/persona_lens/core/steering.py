"""Steering: declarative specs applied by hooks on block outputs, always removed on exit.

A :class:`SteeringSpec` says what to do (vector, coefficient, layers, token positions,
operator); :func:`steer` turns specs into one forward hook per touched block and returns a
:class:`SteeringHandle`, a context manager that removes every hook on exit, also after an
exception. The model class is never modified. Operators live in ``OPERATORS``:

- ``add``: h + c * v (the paper's steering; c < 0 suppresses);
- ``ablate``: h - c * (h . u) u, the direction projected out (c = 1: fully);
- ``cap``: the projection h . u clamped into [lo, hi].

``layers="all"`` adds the layer-incremental vectors v_l - v_(l-1) at every block, as in the
paper's appendix, so the total added by block l is c * v_l. A coefficient may be a list with
one value per batch row: requests with different steering share one batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from persona_lens.core.architecture import BlockLayout, block_hidden, find_blocks, with_block_hidden
from persona_lens.core.errors import InputError, LayerError
from persona_lens.core.ownership import ModelClaim, claim_model, release_model
from persona_lens.core.positions import POSITIONS, Positions, PositionTracker
from persona_lens.core.vectors import PersonaVector, check_finite_matrix, check_layer

Operator = Literal["add", "ablate", "cap"]
Layers = int | Sequence[int] | Literal["all"] | None
Coefficient = float | Sequence[float]


@dataclass(frozen=True)
class SteeringSpec:
    """One steering instruction. ``layers=None`` means the vector's ``best_layer``."""

    vector: PersonaVector
    coefficient: Coefficient = 1.0
    layers: Layers = None
    positions: Positions = "all"
    operator: Operator = "add"
    cap_range: tuple[float, float] | None = None


OperatorFn = Callable[[torch.Tensor, torch.Tensor, Any, "tuple[float, float] | None"], torch.Tensor]


def _add(
    h: torch.Tensor, v: torch.Tensor, coef: Any, _: tuple[float, float] | None
) -> torch.Tensor:
    if isinstance(coef, float) and coef == 1.0:  # folded adds carry their coefficient in v
        return h + v
    return h + coef * v


def _ablate(
    h: torch.Tensor, v: torch.Tensor, coef: Any, _: tuple[float, float] | None
) -> torch.Tensor:
    unit = v / v.norm().clamp_min(1e-12)
    return h - coef * (h @ unit).unsqueeze(-1) * unit


def _cap(
    h: torch.Tensor, v: torch.Tensor, _: Any, bounds: tuple[float, float] | None
) -> torch.Tensor:
    assert bounds is not None
    unit = v / v.norm().clamp_min(1e-12)
    projection = h @ unit
    return h + (projection.clamp(bounds[0], bounds[1]) - projection).unsqueeze(-1) * unit


OPERATORS: dict[str, OperatorFn] = {"add": _add, "ablate": _ablate, "cap": _cap}


@dataclass
class _LayerOp:
    """One operation at one block: a direction, a coefficient, positions, an operator."""

    direction: torch.Tensor
    coefficient: float | torch.Tensor
    positions: str
    operator: str
    cap_range: tuple[float, float] | None
    _cache: tuple[torch.device, torch.dtype, torch.Tensor, Any] | None = None

    def prepared(self, like: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Direction and coefficient on ``like``'s device and dtype (cached)."""
        cache = self._cache
        if cache is None or cache[0] != like.device or cache[1] != like.dtype:
            direction = self.direction.to(like.device, like.dtype)
            coef: Any = self.coefficient
            if isinstance(coef, torch.Tensor):
                coef = coef.to(like.device, like.dtype).view(-1, 1, 1)
            cache = (like.device, like.dtype, direction, coef)
            self._cache = cache
        return cache[2], cache[3]


def _check_spec(spec: SteeringSpec, layout: BlockLayout) -> None:
    if not isinstance(spec.vector, PersonaVector):
        raise InputError("a steering spec needs a PersonaVector")
    spec.vector.check_compatible(layout.num_layers, layout.hidden_size)
    if spec.operator not in OPERATORS:
        raise InputError(f"unknown operator {spec.operator!r}; choose one of {sorted(OPERATORS)}")
    if spec.positions not in POSITIONS:
        raise InputError(f"unknown positions {spec.positions!r}; choose one of {POSITIONS}")
    if spec.operator == "cap":
        bounds = spec.cap_range
        if bounds is None or len(bounds) != 2 or not bounds[0] <= bounds[1]:
            raise InputError("operator 'cap' needs cap_range=(lo, hi) with lo <= hi")


def _coefficient(value: Coefficient) -> float | torch.Tensor:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        coef = float(value)
        if coef != coef or coef in (float("inf"), float("-inf")):
            raise InputError(f"steering coefficient must be finite, got {value}")
        return coef
    try:
        tensor = torch.tensor([float(v) for v in value], dtype=torch.float32)  # type: ignore[union-attr]
    except (TypeError, ValueError) as exc:
        raise InputError(f"steering coefficient must be a number or a list, got {value!r}") from exc
    if tensor.numel() == 0 or not torch.isfinite(tensor).all():
        raise InputError("per-row steering coefficients must be finite and non-empty")
    return tensor


def _resolve_layers(spec: SteeringSpec, num_layers: int) -> list[int] | Literal["all"]:
    layers = spec.layers
    if layers == "all":
        return "all"
    if layers is None:
        best = spec.vector.best_layer
        if best is None:
            raise LayerError(
                f"vector {spec.vector.trait!r} has no best_layer; give a layer explicitly"
            )
        layers = best
    values = [layers] if isinstance(layers, int) else list(layers)
    if not values:
        raise LayerError("an empty list of steering layers")
    return [check_layer(layer, num_layers) for layer in values]


def compile_specs(specs: Iterable[SteeringSpec], layout: BlockLayout) -> dict[int, list[_LayerOp]]:
    """Turn specs into per-block operations (1-based block index -> ops), validated."""
    plan: dict[int, list[_LayerOp]] = {}
    for spec in specs:
        _check_spec(spec, layout)
        coef = _coefficient(spec.coefficient)
        rows = spec.vector.vectors
        layers = _resolve_layers(spec, layout.num_layers)
        if layers == "all":
            targets = list(range(1, layout.num_layers + 1))
            incremental = spec.operator == "add"
        else:
            targets, incremental = layers, False
        for layer in targets:
            direction = rows[layer] - rows[layer - 1] if incremental else rows[layer]
            op = _LayerOp(direction, coef, spec.positions, spec.operator, spec.cap_range)
            plan.setdefault(layer, []).append(op)
    return {layer: _fold_adds(ops) for layer, ops in plan.items()}


def _fold_adds(ops: list[_LayerOp]) -> list[_LayerOp]:
    """Merge each run of consecutive scalar ``add`` ops into one per positions selection.

    Adds commute with each other but not with ``ablate`` or ``cap``, so a run ends at any
    other operator: [add A, ablate A, add B] keeps B's component along A.
    """
    folded: list[_LayerOp] = []
    run: dict[str, _LayerOp] = {}  # positions -> the merged add of the current run
    for op in ops:
        if op.operator != "add":
            run = {}
            folded.append(op)
            continue
        if isinstance(op.coefficient, torch.Tensor):  # per-row: kept apart, still in the run
            folded.append(op)
            continue
        scaled = op.direction * op.coefficient
        if op.positions in run:
            run[op.positions].direction = run[op.positions].direction + scaled
            continue
        merged = _LayerOp(scaled, 1.0, op.positions, "add", None)
        run[op.positions] = merged
        folded.append(merged)
    return folded


class SteeringHandle:
    """Hooks applying a steering plan; a context manager that always removes them.

    While attached it holds the model for the thread that attached it (one owner per model,
    :mod:`persona_lens.core.ownership`): a forward from another thread raises
    :class:`~persona_lens.core.errors.ModelBusyError` instead of being steered.
    """

    def __init__(self, model: nn.Module, plan: dict[int, list[_LayerOp]], layout: BlockLayout):
        self.model = model
        self.layout = layout
        self.plan = plan
        self.tracker: PositionTracker | None = None
        self._handles: list[RemovableHandle] = []
        self._claim: ModelClaim | None = None

    @property
    def active(self) -> bool:
        return self._claim is not None

    def attach(self) -> SteeringHandle:
        if self.active:
            return self
        self._claim = claim_model(self.model)
        try:
            self._attach_positions()
            for layer, ops in sorted(self.plan.items()):
                for block in self._steered_blocks(layer):
                    # prepend: steering runs before any capture hook, which sees the steered stream
                    hook = block.register_forward_hook(
                        self._make_hook(ops, self._claim), prepend=True
                    )
                    self._handles.append(hook)
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._detach_positions()
        if self._claim is not None:
            self._claim = None
            release_model(self.model)

    def reset_positions(self, prompt_length: int | None = None) -> None:
        """Declare that the next forward starts a new sequence (optionally its prompt length).

        Never needed around ``generate`` calls, whose new sequences the handle recognises
        itself (:class:`~persona_lens.core.positions.PositionTracker`); useful before a plain
        forward over prompt + response, to say where the prompt ends.
        """
        if self.tracker is not None:
            self.tracker.reset(prompt_length)

    def __enter__(self) -> SteeringHandle:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _attach_positions(self) -> None:
        """Track token positions when an op needs them (``prompt``/``generated``)."""
        if any(op.positions != "all" for ops in self.plan.values() for op in ops):
            self.tracker = PositionTracker()
            self.tracker.attach(self.model)

    def _detach_positions(self) -> None:
        if self.tracker is not None:
            self.tracker.detach()
            self.tracker = None

    def _steered_blocks(self, layer: int) -> list[nn.Module]:
        """The block(s) whose output position ``layer`` is: one per stream."""
        return [self.layout.blocks[layer - 1]]

    def _make_hook(self, ops: list[_LayerOp], claim: ModelClaim) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            claim.check()  # a forward of another thread, already running when we attached
            hidden = block_hidden(output)
            steered = hidden
            for op in ops:
                steered = self._apply(op, steered)
            return with_block_hidden(output, steered)

        return hook

    def _apply(self, op: _LayerOp, hidden: torch.Tensor) -> torch.Tensor:
        direction, coef = op.prepared(hidden)
        if isinstance(coef, torch.Tensor) and coef.shape[0] != hidden.shape[0]:
            raise InputError(
                f"{coef.shape[0]} per-row coefficients for a batch of {hidden.shape[0]} rows"
            )
        operator = OPERATORS[op.operator]
        if op.positions == "all" or self.tracker is None:
            return operator(hidden, direction, coef, op.cap_range)
        selected = self.tracker.select(op.positions)
        if selected is None:
            return hidden
        if selected == slice(None):
            return operator(hidden, direction, coef, op.cap_range)
        part = operator(hidden[:, selected], direction, coef, op.cap_range)
        rest_first = selected.start is not None
        pieces = (
            [hidden[:, : selected.start], part]
            if rest_first
            else [part, hidden[:, selected.stop :]]
        )
        return torch.cat(pieces, dim=1)


def steer(
    model: nn.Module,
    specs: SteeringSpec | Iterable[SteeringSpec],
    *,
    layout: BlockLayout | None = None,
) -> SteeringHandle:
    """Patch ``model`` with steering hooks; use as ``with steer(model, spec): ...``.

    Validation happens here, before any hook is attached.
    """
    spec_list = [specs] if isinstance(specs, SteeringSpec) else list(specs)
    layout = layout or find_blocks(model)
    plan = compile_specs(spec_list, layout)
    if layout.is_block_diffusion:  # both streams, at every denoising step
        from persona_lens.core.diffusion.steering import DiffusionSteeringHandle

        return DiffusionSteeringHandle(model, plan, layout).attach()
    return SteeringHandle(model, plan, layout).attach()


def steering_vector(direction: torch.Tensor, trait: str = "direction") -> PersonaVector:
    """Wrap a raw [L+1, d] tensor as a PersonaVector (for quick experiments)."""
    return PersonaVector(check_finite_matrix(direction), trait)
