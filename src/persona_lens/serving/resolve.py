"""From a validated request to what the engine runs: names resolved, limits checked.

:class:`Resolver` is the one place where a request meets the server's state: the model names
it serves, the loaded vectors and the limits of :class:`ServerSettings`. Everything it refuses
is an :class:`~persona_lens.serving.errors.APIError` naming the offending field (``param``);
what it returns (:class:`GenerationJob`) is plain data that the engine can run without checks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from persona_lens.core.architecture import BlockLayout
from persona_lens.core.errors import PersonaLensError
from persona_lens.core.generation import Message
from persona_lens.core.steering import SteeringSpec, compile_specs
from persona_lens.monitoring.guard import GuardSpec, resolve_guards
from persona_lens.serving.errors import APIError, bad_request
from persona_lens.serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    LayerChoice,
    PersonaOptions,
)
from persona_lens.serving.settings import ServerSettings
from persona_lens.serving.vectors import ServedVector, VectorLibrary

StepLayers = tuple[int, ...] | Literal["all"] | None
"""Steering layers: None (the vector's best layer), ``"all"`` or explicit blocks."""

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass(frozen=True)
class SteerEntry:
    """Add ``coefficient`` times ``vector`` at ``layers`` for one request."""

    vector: ServedVector
    coefficient: float
    layers: StepLayers = None

    def key(self) -> tuple[str, str]:
        """Requests whose entries share a key share one steering op (per-row coefficients)."""
        return self.vector.hash, repr(self.layers)

    def spec(self, coefficient: float | list[float]) -> SteeringSpec:
        layers = list(self.layers) if isinstance(self.layers, tuple) else self.layers
        return SteeringSpec(self.vector.vector, coefficient, layers)


@dataclass(frozen=True)
class GuardEntry:
    """Above ``threshold`` at the vector's best layer, steer the rest with ``coefficient``."""

    vector: ServedVector
    threshold: float
    coefficient: float


@dataclass(frozen=True)
class Sampling:
    """How one request's tokens are chosen and when its reply stops."""

    max_tokens: int
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass(frozen=True)
class GenerationJob:
    """What the engine runs for one request: a chat (``messages``) or a raw ``text`` prompt."""

    kind: Literal["chat", "completion"]
    messages: tuple[Message, ...] | None
    text: str | None
    steering: tuple[SteerEntry, ...]
    monitors: tuple[ServedVector, ...]
    guards: tuple[GuardEntry, ...]
    sampling: Sampling

    @property
    def monitor_names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.monitors)


class Resolver:
    """Checks requests against the served model names, the vectors and the limits."""

    def __init__(
        self,
        library: VectorLibrary,
        settings: ServerSettings,
        layout: BlockLayout,
        model_ids: Sequence[str],
    ) -> None:
        self.library = library
        self.settings = settings
        self.layout = layout
        self.model_ids = tuple(model_ids)

    def chat(self, request: ChatCompletionRequest) -> GenerationJob:
        self._check_model(request.model)
        messages = tuple(
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in request.messages
        )
        asked = request.max_completion_tokens or request.max_tokens
        param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        if request.top_logprobs and not request.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        sampling = self._sampling(
            request,
            asked or self.settings.default_max_tokens,
            param,
            bool(request.logprobs),
            request.top_logprobs or 0,
        )
        return self._job("chat", messages, None, request.persona, sampling)

    def completion(self, request: CompletionRequest) -> GenerationJob:
        self._check_model(request.model)
        max_tokens = request.max_tokens or min(
            COMPLETION_DEFAULT_MAX_TOKENS, self.settings.max_tokens
        )
        logprobs = request.logprobs is not None
        sampling = self._sampling(
            request, max_tokens, "max_tokens", logprobs, request.logprobs or 0
        )
        return self._job("completion", None, request.prompt_text(), request.persona, sampling)

    # --- parts ----------------------------------------------------------------------------
    def _check_model(self, name: str) -> None:
        if name not in self.model_ids:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {self.model_ids[0]!r}",
                "invalid_request_error",
                "model",
                "model_not_found",
            )

    def _sampling(
        self,
        request: GenerationRequest,
        max_tokens: int,
        param: str,
        logprobs: bool,
        top_logprobs: int,
    ) -> Sampling:
        if max_tokens > self.settings.max_tokens:
            raise bad_request(
                f"{param} is {max_tokens}; this server allows at most {self.settings.max_tokens}",
                param,
            )
        min_tokens = request.min_tokens or 0
        if min_tokens > max_tokens:
            raise bad_request(
                f"min_tokens ({min_tokens}) exceeds {param} ({max_tokens})", "min_tokens"
            )
        return Sampling(
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            seed=request.seed,
            stop=request.stop_strings(),
            logprobs=logprobs,
            top_logprobs=top_logprobs,
        )

    def _job(
        self,
        kind: Literal["chat", "completion"],
        messages: tuple[Message, ...] | None,
        text: str | None,
        persona: PersonaOptions | None,
        sampling: Sampling,
    ) -> GenerationJob:
        persona = persona or PersonaOptions()
        steering = self._steering(persona)
        guards = self._guards(persona)
        monitors = self._monitors(persona, guards)
        return GenerationJob(kind, messages, text, steering, monitors, guards, sampling)

    def _vector(self, name: str, param: str) -> ServedVector:
        try:
            return self.library.get(name)
        except PersonaLensError as exc:
            raise bad_request(str(exc), param, "unknown_vector") from exc

    def _coefficient(self, value: float, param: str) -> float:
        bound = self.settings.max_coefficient
        if not math.isfinite(value) or abs(value) > bound:
            raise bad_request(
                f"{param} is {value}; coefficients must lie in [-{bound}, {bound}]", param
            )
        return float(value)

    def _steering(self, persona: PersonaOptions) -> tuple[SteerEntry, ...]:
        for name in persona.layers:
            if name not in persona.steer:
                raise bad_request(
                    f"persona.layers names {name!r}, which persona.steer does not steer",
                    f"persona.layers.{name}",
                )
        entries: dict[str, SteerEntry] = {}
        for name, value in persona.steer.items():
            param = f"persona.steer.{name}"
            vector = self._vector(name, param)
            coefficient = self._coefficient(value, param)
            layers = self._layers(vector, persona.layers.get(name, "best"), name)
            if coefficient == 0:
                continue
            if vector.hash in {e.vector.hash for e in entries.values()}:
                raise bad_request(f"{name!r} names a vector steered already", param)
            entries[name] = SteerEntry(vector, coefficient, layers)
        return tuple(entries.values())

    def _layers(self, vector: ServedVector, choice: LayerChoice, name: str) -> StepLayers:
        if choice == "best":
            return None
        layers: StepLayers = (
            "all" if choice == "all" else (choice,) if isinstance(choice, int) else tuple(choice)
        )
        if layers == ():
            raise bad_request("an empty list of layers", f"persona.layers.{name}")
        try:
            compile_specs([SteerEntry(vector, 1.0, layers).spec(1.0)], self.layout)
        except PersonaLensError as exc:
            raise bad_request(str(exc), f"persona.layers.{name}") from exc
        return layers

    def _guards(self, persona: PersonaOptions) -> tuple[GuardEntry, ...]:
        guards: list[GuardEntry] = []
        for name, options in persona.guard.items():
            param = f"persona.guard.{name}"
            vector = self._vector(name, param)
            coefficient = self._coefficient(options.coefficient, f"{param}.coefficient")
            try:
                resolve_guards(
                    [GuardSpec(vector.vector, options.threshold, coefficient)], self.layout
                )
            except PersonaLensError as exc:
                raise bad_request(str(exc), param) from exc
            if any(g.vector.hash == vector.hash for g in guards):
                raise bad_request(f"{name!r} names a vector guarded already", param)
            guards.append(GuardEntry(vector, float(options.threshold), coefficient))
        return tuple(guards)

    def _monitors(
        self, persona: PersonaOptions, guards: Sequence[GuardEntry]
    ) -> tuple[ServedVector, ...]:
        if persona.monitor is None:
            chosen = list(self.library)
        else:
            chosen = [
                self._vector(name, f"persona.monitor[{i}]")
                for i, name in enumerate(persona.monitor)
            ]
        chosen += [g.vector for g in guards]
        unique: dict[str, ServedVector] = {}
        for vector in chosen:
            unique.setdefault(vector.name, vector)
        return tuple(unique.values())
