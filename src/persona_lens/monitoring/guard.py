"""Guard mode: watch a trait while the model writes, and steer away once it shows.

A :class:`GuardSpec` watches the projection of each newly fed response token onto a trait
vector (made unit length) at a monitor layer. When a row's projection first exceeds the
threshold, policy ``steer`` adds ``coefficient * v`` (negative: away from the trait) at the
steer layer to that row for the rest of its reply; the other rows of the batch are untouched.
Policy ``regenerate`` only records the crossing while generating; :func:`generate_guarded` then
generates those replies again with the steering on from the start (all positions, as the
paper steers).

:class:`GuardHandle` holds the hooks: a context manager that always removes them. It follows
batched cached generation: a forward of several tokens (or the first after :meth:`begin`) is a
prompt and is not watched; each later forward feeds one token per row; a row that has fed an
end-of-sequence token is finished, and the pad tokens it keeps being fed are ignored.

Timing: the projection is read at the monitor layer *before* the guard's own steering there.
With the steer layer at or after the monitor layer, steering starts in the crossing token's own
forward, so the very next predicted token is steered; at an earlier layer it starts one forward
later. The state lives in tensors: no host sync per token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from persona_lens.core.architecture import BlockLayout, block_hidden, find_blocks, with_block_hidden
from persona_lens.core.errors import InputError, LayerError
from persona_lens.core.generation import (
    Generation,
    PromptLike,
    eos_token_ids,
    generate,
    render_prompt,
)
from persona_lens.core.ownership import ModelClaim, claim_model, release_model
from persona_lens.core.positions import read_forward_inputs
from persona_lens.core.steering import SteeringSpec
from persona_lens.core.vectors import PersonaVector, check_layer

Policy = Literal["steer", "regenerate"]
POLICIES: tuple[str, ...] = ("steer", "regenerate")
RowResolver = Callable[[torch.Tensor, "torch.Tensor | None"], list[int]]


@dataclass(frozen=True)
class GuardSpec:
    """Watch ``vector`` at ``monitor_layer``; above ``threshold``, steer with ``coefficient``
    at ``steer_layer`` (both default to the vector's best_layer). ``name`` defaults to the
    vector's trait."""

    vector: PersonaVector
    threshold: float
    coefficient: float = -2.0
    monitor_layer: int | None = None
    steer_layer: int | None = None
    policy: Policy = "steer"
    name: str | None = None


@dataclass(frozen=True)
class GuardEvent:
    """A guard fired: ``row`` (prompt index, or batch row for a bare handle), the response
    token whose projection crossed, its projection, and the attempt (1: a regenerated reply)."""

    guard: str
    row: int
    token_index: int
    projection: float
    attempt: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "guard": self.guard,
            "row": self.row,
            "token_index": self.token_index,
            "projection": self.projection,
            "attempt": self.attempt,
        }


@dataclass
class GuardedGeneration:
    """A reply with the guard events of its prompt. A regenerated reply keeps the first one."""

    generation: Generation
    events: list[GuardEvent] = field(default_factory=list)
    regenerated: bool = False
    first_attempt: Generation | None = None

    @property
    def triggered(self) -> bool:
        return bool(self.events)


@dataclass(frozen=True)
class ResolvedGuard:
    """A validated guard: unique name, concrete layers, unit monitor direction."""

    spec: GuardSpec
    name: str
    monitor_layer: int
    steer_layer: int

    @property
    def steers(self) -> bool:
        return self.spec.policy == "steer"


def resolve_guards(guards: Iterable[GuardSpec], layout: BlockLayout) -> list[ResolvedGuard]:
    """Validate guards against the model (raises InputError/LayerError/VectorMismatchError)."""
    resolved: list[ResolvedGuard] = []
    names: list[str] = []
    guards = list(guards)
    if guards and layout.is_block_diffusion:
        raise InputError(
            "guards do not apply to block-diffusion decoding: a guard acts on each token as it "
            f"is generated, and this model commits {layout.canvas_length} tokens at a time"
        )
    for spec in guards:
        if not isinstance(spec, GuardSpec) or not isinstance(spec.vector, PersonaVector):
            raise InputError("a guard needs a GuardSpec with a PersonaVector")
        spec.vector.check_compatible(layout.num_layers, layout.hidden_size)
        if spec.policy not in POLICIES:
            raise InputError(f"unknown guard policy {spec.policy!r}; choose one of {POLICIES}")
        for what, value in (("threshold", spec.threshold), ("coefficient", spec.coefficient)):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise InputError(f"guard {what} must be a number, got {value!r}")
            if not torch.isfinite(torch.tensor(float(value))):
                raise InputError(f"guard {what} must be finite, got {value}")
        monitor = _layer(spec, spec.monitor_layer, layout.num_layers)
        steer = _layer(spec, spec.steer_layer, layout.num_layers)
        base = spec.name or spec.vector.trait
        name = base if base not in names else f"{base}#{names.count(base) + 1}"
        names.append(base)
        resolved.append(ResolvedGuard(spec, name, monitor, steer))
    return resolved


def _layer(spec: GuardSpec, layer: int | None, num_layers: int) -> int:
    if layer is None:
        layer = spec.vector.best_layer
        if layer is None:
            raise LayerError(f"vector {spec.vector.trait!r} has no best_layer; give guard layers")
    return check_layer(layer, num_layers)


class _GuardState:
    """One guard's hooks and per-row state for the current batch."""

    def __init__(self, guard: ResolvedGuard, handle: GuardHandle) -> None:
        self.guard = guard
        self.handle = handle
        vector = guard.spec.vector
        unit = vector.at(guard.monitor_layer).float()
        self.unit = unit / unit.norm().clamp_min(1e-12)
        self.added = float(guard.spec.coefficient) * vector.at(guard.steer_layer).float()
        self.threshold = float(guard.spec.threshold)
        self.first_index: torch.Tensor | None = None  # [B] long, -1 until the row fires
        self.first_value: torch.Tensor | None = None  # [B] float32
        self._cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def reset(self, batch: int, device: torch.device) -> None:
        self.first_index = torch.full((batch,), -1, dtype=torch.long, device=device)
        self.first_value = torch.zeros(batch, dtype=torch.float32, device=device)

    def _on(self, tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        key = (like.device, like.dtype)
        if key not in self._cache:
            self._cache[key] = tensor.to(like.device, like.dtype)
        return self._cache[key]

    def monitor_hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        self.handle.check_owner()
        valid = self.handle.valid
        if valid is None or self.first_index is None or self.first_value is None:
            return None  # a prompt forward, or nothing started
        hidden = block_hidden(output)
        if hidden.shape[0] != self.first_index.shape[0]:
            raise InputError(
                f"guard saw {hidden.shape[0]} rows in a batch of {self.first_index.shape[0]} "
                "(beam search is not supported)"
            )
        with torch.no_grad():
            projection = hidden[:, -1].detach().float() @ self.unit.to(hidden.device)
        index, value = self.first_index.to(hidden.device), self.first_value.to(hidden.device)
        crossed = valid.to(hidden.device) & (index < 0) & (projection > self.threshold)
        self.first_index = torch.where(crossed, self.handle.token_index, index)
        self.first_value = torch.where(crossed, projection, value)
        if self.guard.steers and self.guard.steer_layer == self.guard.monitor_layer:
            return with_block_hidden(output, self.steered(hidden))
        return None

    def steer_hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        self.handle.check_owner()
        if self.handle.valid is None or not self.guard.steers:
            return None
        return with_block_hidden(output, self.steered(block_hidden(output)))

    def steered(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` with the steering added to the rows that fired (others bit-identical)."""
        assert self.first_index is not None
        fired = (self.first_index >= 0).to(hidden.device).view(-1, 1, 1)
        return torch.where(fired, hidden + self._on(self.added, hidden), hidden)

    def events(self, rows: Sequence[int], attempt: int) -> list[GuardEvent]:
        if self.first_index is None or self.first_value is None:
            return []
        found = []
        indices, values = self.first_index.tolist(), self.first_value.tolist()
        for b, (index, value) in enumerate(zip(indices, values, strict=True)):
            if index >= 0:
                found.append(GuardEvent(self.guard.name, rows[b], index, value, attempt))
        return found


class GuardHandle:
    """Guard hooks on one model; a context manager that always removes them.

    Rows are numbered in the order batches arrive (0, 1, ... across batches) unless
    ``row_resolver(input_ids, attention_mask)`` names them from each prompt forward.
    """

    def __init__(
        self,
        model: nn.Module,
        guards: Sequence[ResolvedGuard],
        layout: BlockLayout,
        *,
        eos_token_ids: Sequence[int] = (),
        row_resolver: RowResolver | None = None,
        attempt: int = 0,
    ) -> None:
        self.model = model
        self.layout = layout
        self.attempt = attempt
        self.row_resolver = row_resolver
        self.states = [_GuardState(g, self) for g in guards]
        self.valid: torch.Tensor | None = None  # [B] rows whose fed token is a response token
        self.token_index = -1
        self._eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long)
        self._finished: torch.Tensor | None = None
        self._rows: list[int] = []
        self._next_row = 0
        self._fresh = True
        self._done: list[GuardEvent] = []
        self._handles: list[RemovableHandle] = []
        self._claim: ModelClaim | None = None

    @property
    def active(self) -> bool:
        return bool(self._handles)

    @property
    def events(self) -> list[GuardEvent]:
        """Every event so far (finished batches and the current one)."""
        return self._done + self._current_events()

    def begin(self) -> None:
        """Declare that the next forward is a prompt (a new batch)."""
        self._fresh = True

    def attach(self) -> GuardHandle:
        if self.active:
            return self
        self._claim = claim_model(self.model)  # one owner per model
        self._handles.append(
            self.model.register_forward_pre_hook(self._on_forward, with_kwargs=True)
        )
        for state in self.states:
            guard = state.guard
            block = self.layout.blocks[guard.monitor_layer - 1]
            # prepend, like steering: capture hooks registered later see the guarded stream
            self._handles.append(block.register_forward_hook(state.monitor_hook, prepend=True))
            if guard.steers and guard.steer_layer != guard.monitor_layer:
                target = self.layout.blocks[guard.steer_layer - 1]
                self._handles.append(target.register_forward_hook(state.steer_hook, prepend=True))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._claim is not None:
            self._claim = None
            release_model(self.model)

    def __enter__(self) -> GuardHandle:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _current_events(self) -> list[GuardEvent]:
        return [e for s in self.states for e in s.events(self._rows, self.attempt)]

    def check_owner(self) -> None:
        """Refuse a forward from a thread that does not hold the model (one owner per model)."""
        if self._claim is not None:
            self._claim.check()

    def _on_forward(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        self.check_owner()
        if not self.states:
            return  # nothing to watch (e.g. a chat turn without guards)
        inputs = read_forward_inputs(args, kwargs)
        ids = inputs.input_ids
        if ids is None:
            raise InputError("guard mode needs input_ids (not inputs_embeds)")
        if self._fresh or inputs.length != 1 or self._finished is None:
            self._start_batch(ids, inputs.attention_mask)
            return
        token = ids[:, -1]
        if self._eos.device != token.device:
            self._eos = self._eos.to(token.device)
        is_eos = torch.isin(token, self._eos)
        self.valid = ~self._finished & ~is_eos
        self._finished = self._finished | is_eos
        self.token_index += 1

    def _start_batch(self, ids: torch.Tensor, mask: torch.Tensor | None) -> None:
        self._done.extend(self._current_events())
        batch = int(ids.shape[0])
        if self.row_resolver is not None:
            self._rows = self.row_resolver(ids, mask)
        else:
            self._rows = list(range(self._next_row, self._next_row + batch))
            self._next_row += batch
        self._finished = torch.zeros(batch, dtype=torch.bool, device=ids.device)
        self.valid = None
        self.token_index = -1
        self._fresh = False
        for state in self.states:
            state.reset(batch, ids.device)


def guard(
    model: nn.Module,
    guards: GuardSpec | Iterable[GuardSpec],
    *,
    layout: BlockLayout | None = None,
    eos_token_ids: Sequence[int] = (),
    row_resolver: RowResolver | None = None,
) -> GuardHandle:
    """Attach guard hooks; use as ``with guard(model, spec, eos_token_ids=...) as h: ...``.

    Validation happens before any hook is attached; ``h.events`` lists what fired.
    """
    spec_list = [guards] if isinstance(guards, GuardSpec) else list(guards)
    layout = layout or find_blocks(model)
    resolved = resolve_guards(spec_list, layout)
    handle = GuardHandle(
        model, resolved, layout, eos_token_ids=eos_token_ids, row_resolver=row_resolver
    )
    return handle.attach()


def prompt_matcher(
    tokenizer: Any, prompts: Sequence[PromptLike], system: str | None = None
) -> RowResolver:
    """A row resolver for :func:`generate`'s batches: names each batch row by the prompt whose
    rendered tokens it holds (identical prompts are taken in order, as ``generate`` does)."""
    table: dict[tuple[int, ...], list[int]] = {}
    for index, prompt in enumerate(prompts):
        text = render_prompt(tokenizer, prompt, system)
        ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
        table.setdefault(ids, []).append(index)

    def resolve(input_ids: torch.Tensor, mask: torch.Tensor | None) -> list[int]:
        rows = []
        for b in range(input_ids.shape[0]):
            row = input_ids[b] if mask is None else input_ids[b][mask[b].bool()]
            queue = table.get(tuple(row.tolist()))
            if not queue:
                raise InputError("guard: a batch row matches none of the prompts")
            rows.append(queue.pop(0))
        return rows

    return resolve


def generate_guarded(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[PromptLike],
    guards: Iterable[GuardSpec] = (),
    *,
    layout: BlockLayout | None = None,
    system: str | None = None,
    steering: Iterable[SteeringSpec] = (),
    **generate_kwargs: Any,
) -> list[GuardedGeneration]:
    """:func:`~persona_lens.core.generation.generate` with guards watching every reply.

    Returns one :class:`GuardedGeneration` per prompt, in order, with the events of that prompt.
    ``generate_kwargs`` go to ``generate`` (``max_new_tokens``, ``batch_size``, ``monitors``,
    sampling, ``progress``...); the regenerate pass, if any, runs without ``progress``.
    """
    if not prompts:
        raise InputError("no prompts to generate from")
    layout = layout or find_blocks(model)
    resolved = resolve_guards(guards, layout)
    user_steering = list(steering)
    generations, events = _guarded_pass(
        model, tokenizer, prompts, resolved, layout, system, user_steering, 0, generate_kwargs
    )
    results = [GuardedGeneration(g) for g in generations]
    for event in events:
        results[event.row].events.append(event)
    regenerate = [g for g in resolved if not g.steers]
    fired = {(e.guard, e.row) for e in events}
    redo = [i for i in range(len(prompts)) if any((g.name, i) in fired for g in regenerate)]
    if not redo:
        return results
    steering_again = [_subset_steering(s, redo, len(prompts)) for s in user_steering]
    for g in regenerate:
        coefficients = [g.spec.coefficient if (g.name, i) in fired else 0.0 for i in redo]
        if any(coefficients):
            steering_again.append(SteeringSpec(g.spec.vector, coefficients, g.steer_layer))
    kwargs = {k: v for k, v in generate_kwargs.items() if k != "progress"}
    again, again_events = _guarded_pass(
        model,
        tokenizer,
        [prompts[i] for i in redo],
        resolved,
        layout,
        system,
        steering_again,
        1,
        kwargs,
    )
    for local, generation in enumerate(again):
        result = results[redo[local]]
        result.first_attempt, result.generation, result.regenerated = (
            result.generation,
            generation,
            True,
        )
    for event in again_events:
        results[redo[event.row]].events.append(replace(event, row=redo[event.row]))
    return results


def _guarded_pass(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[PromptLike],
    guards: Sequence[ResolvedGuard],
    layout: BlockLayout,
    system: str | None,
    steering: Sequence[SteeringSpec],
    attempt: int,
    generate_kwargs: dict[str, Any],
) -> tuple[list[Generation], list[GuardEvent]]:
    handle = GuardHandle(
        model,
        guards,
        layout,
        eos_token_ids=eos_token_ids(model, tokenizer),
        row_resolver=prompt_matcher(tokenizer, prompts, system) if guards else None,
        attempt=attempt,
    )
    with handle:
        generations = generate(
            model,
            tokenizer,
            prompts,
            system=system,
            steering=steering,
            layout=layout,
            **generate_kwargs,
        )
    events = sorted(handle.events, key=lambda e: (e.row, e.token_index, e.guard))
    return generations, events


def _subset_steering(spec: SteeringSpec, rows: Sequence[int], total: int) -> SteeringSpec:
    """A steering spec with per-prompt coefficients cut down to ``rows``."""
    coef = spec.coefficient
    if isinstance(coef, (int, float)):
        return spec
    values = list(coef)
    if len(values) != total:
        raise InputError(f"{len(values)} per-prompt coefficients for {total} prompts")
    return replace(spec, coefficient=[values[i] for i in rows])
