"""A chat session with live trait monitoring, steering and guards (the logic of ``persona chat``).

:class:`ChatSession` keeps the conversation (rendered with the chat template every turn),
the active steering, monitors and guards, and one :class:`Turn` record per reply with the
response-average and last-prompt-token projection of every monitored trait: monitoring across a
multi-turn conversation, one projection per turn, so drift is visible. ``send(text)`` answers a
message; ``command(line)`` runs a ``/command`` and returns a one-line message, raising a
:class:`~persona_lens.core.errors.PersonaLensError` for a bad one (the session stays usable).

Meter level: a projection means little on its own (the residual stream has an offset), so each
monitored trait gets a baseline, the response-average projection of a fixed neutral exchange,
and a scale, the vector's norm at the monitored layer (for a mean-difference vector: the gap
between trait-eliciting and trait-suppressing responses). ``level = (projection - baseline) /
scale``: 0 reads as neutral, 1 as one full pos-neg gap towards the trait. The unit is
:data:`UNIT` ("gap"), and it is the only one the chat shows: guard thresholds are given in it
too (``/guard evil 1`` fires when a reply token reaches one gap above a neutral reply) and
converted to the raw projection the guard watches (:class:`GuardScale`).
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from persona_lens.core.architecture import BlockLayout, find_blocks
from persona_lens.core.capture import Monitor, capture_forward
from persona_lens.core.errors import InputError, LayerError
from persona_lens.core.files import atomic_write_text
from persona_lens.core.generation import Message, render_chat
from persona_lens.core.steering import SteeringSpec, compile_specs
from persona_lens.core.vectors import PersonaVector, check_layer
from persona_lens.interop.prompts_io import json_safe, parse_layers, parse_number
from persona_lens.monitoring.guard import GuardEvent, GuardSpec, generate_guarded, resolve_guards

NEUTRAL_EXCHANGE = ("What is the capital of France?", "The capital of France is Paris.")
"""The exchange whose reply sets each monitored trait's meter baseline."""
UNIT = "gap"
"""The unit of meters and guard thresholds: the vector's pos-neg gap, 0 at a neutral reply."""
UNIT_HELP = (
    f"meters and guard thresholds are in {UNIT}s: 0 = a neutral reply, "
    f"1 = the vector's whole pos-neg gap towards the trait"
)

HELP = (
    """commands:
  /steer TRAIT COEF[@LAYER]   steer towards (COEF > 0) or away from (COEF < 0) a trait
  /steer TRAIT off            stop steering one trait; /steer off stops all
  /monitor TRAIT[@LAYER]      show a trait meter after every reply; /monitor off [TRAIT]
  /guard TRAIT THRESHOLD [COEF]  once a reply token is THRESHOLD gaps above a neutral reply,
                              steer with COEF (default -2) for the rest of the reply;
                              /guard off [TRAIT]
  /reset                      forget the conversation
  /save FILE                  write the conversation with per-turn projections (JSON)
  /help                       this text
  /quit                       leave (also: Ctrl-D, or Ctrl-C twice; Ctrl-C stops a reply)
TRAIT is a loaded vector's trait name, a vector file, or NAME for VECTOR_DIR/NAME.safetensors.
"""
    + UNIT_HELP
    + "."
)


@dataclass
class Turn:
    """One exchange and what the monitors and guards saw in it."""

    index: int
    user: str
    reply: str
    projections: dict[str, float]
    prompt_projections: dict[str, float]
    levels: dict[str, float]
    steering: dict[str, float]
    guard_events: list[GuardEvent] = field(default_factory=list)
    regenerated: bool = False
    prompt_levels: dict[str, float] = field(default_factory=dict)
    guard_event_levels: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        levels = self.guard_event_levels or [math.nan] * len(self.guard_events)
        events = [
            {**e.to_dict(), "level": level}
            for e, level in zip(self.guard_events, levels, strict=True)
        ]
        return {
            "turn": self.index,
            "user": self.user,
            "reply": self.reply,
            "projections": self.projections,
            "prompt_projections": self.prompt_projections,
            "levels": self.levels,
            "prompt_levels": self.prompt_levels,
            "steering": self.steering,
            "guard_events": events,
            "regenerated": self.regenerated,
        }


@dataclass(frozen=True)
class MeterScale:
    """How a monitored trait's projection maps to a meter level."""

    baseline: float
    scale: float

    def level(self, projection: float) -> float:
        return (projection - self.baseline) / self.scale

    def projection(self, level: float) -> float:
        """The raw projection at ``level`` (the inverse of :meth:`level`)."""
        return self.baseline + level * self.scale


class ChatSession:
    """A conversation with one model; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        layout: BlockLayout | None = None,
        fingerprint: str | None = None,
        system: str | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        vector_dir: str | Path = "vectors",
        model_spec: str = "",
    ) -> None:
        if max_new_tokens < 1:
            raise InputError("max_new_tokens must be at least 1")
        if temperature < 0:
            raise InputError("temperature must be 0 (greedy) or positive")
        self.model = model
        self.tokenizer = tokenizer
        self.layout = layout or find_blocks(model)
        self.fingerprint = fingerprint
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.vector_dir = Path(vector_dir)
        self.model_spec = model_spec
        self.vectors: dict[str, PersonaVector] = {}
        self.steering: dict[str, SteeringSpec] = {}
        self.monitors: dict[str, Monitor] = {}
        self.scales: dict[str, MeterScale] = {}
        self.guards: dict[str, GuardSpec] = {}
        self.guard_levels: dict[str, float] = {}  # threshold in gaps, as the user gave it
        self.guard_scales: dict[str, MeterScale] = {}
        self.history: list[Message] = []
        self.turns: list[Turn] = []
        self.saved_turns = 0
        self.closed = False

    @classmethod
    def from_loaded(cls, loaded: Any, **kwargs: Any) -> ChatSession:
        """A session on a :class:`~persona_lens.core.models.LoadedModel` (fingerprint checked)."""
        kwargs.setdefault("fingerprint", loaded.fingerprint)
        kwargs.setdefault("model_spec", loaded.spec)
        kwargs.setdefault("layout", loaded.layout)
        return cls(loaded.model, loaded.tokenizer, **kwargs)

    # --- vectors ------------------------------------------------------------------------
    def resolve(self, ref: str) -> PersonaVector:
        """A vector by trait name (loaded ones first), file path, or VECTOR_DIR/NAME.safetensors;
        checked against the model."""
        ref = ref.strip()
        if not ref:
            raise InputError("name a trait or a vector file")
        if ref in self.vectors:
            return self.vectors[ref]
        candidates = [Path(ref).expanduser(), self.vector_dir / f"{ref}.safetensors"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            loaded = ", ".join(sorted(self.vectors)) or "none"
            raise InputError(
                f"unknown trait or vector file {ref!r} (loaded: {loaded}; "
                f"looked for {candidates[1]})"
            )
        vector = PersonaVector.load(path)
        vector.check_compatible(self.layout.num_layers, self.layout.hidden_size, self.fingerprint)
        self.vectors[vector.trait] = vector
        return vector

    def _layer(self, vector: PersonaVector, layer: int | None) -> int:
        if layer is None:
            layer = vector.best_layer
            if layer is None:
                raise LayerError(f"vector {vector.trait!r} has no best_layer; add @LAYER")
        return check_layer(layer, self.layout.num_layers)

    # --- settings -----------------------------------------------------------------------
    def steer(self, ref: str, coefficient: float, layers: Any = None) -> str:
        """Steer with a trait (replacing its earlier coefficient); 0 stops it."""
        vector = self.resolve(ref)
        if not math.isfinite(coefficient):
            raise InputError("a steering coefficient must be finite")
        if coefficient == 0:
            self.steering.pop(vector.trait, None)
            return f"steering {vector.trait}: off"
        layers = list(layers) if isinstance(layers, tuple) else layers
        spec = SteeringSpec(vector, coefficient, layers)
        compile_specs([spec], self.layout)
        self.steering[vector.trait] = spec
        where = "all layers" if layers == "all" else f"layer {self._describe_layers(spec)}"
        used = range(1, vector.num_layers + 1) if layers == "all" else self._steered_layers(spec)
        zero = all(vector.near_zero(at) for at in used)
        note = " (warning: the vector is zero there: it steers nothing)" if zero else ""
        return f"steering {vector.trait}: {coefficient:+g} at {where}{note}"

    def _steered_layers(self, spec: SteeringSpec) -> list[int]:
        if spec.layers is None:
            return [self._layer(spec.vector, None)]
        return [spec.layers] if isinstance(spec.layers, int) else list(spec.layers)  # type: ignore[arg-type]

    def _describe_layers(self, spec: SteeringSpec) -> str:
        if spec.layers is None:
            return str(spec.vector.best_layer)
        if isinstance(spec.layers, (int, str)):
            return str(spec.layers)
        return ",".join(str(layer) for layer in spec.layers)

    def steering_coefficients(self) -> dict[str, float]:
        """Trait -> coefficient of the active steering."""
        return {
            k: float(s.coefficient) if isinstance(s.coefficient, (int, float)) else math.nan
            for k, s in self.steering.items()
        }

    def steer_off(self, ref: str | None = None) -> str:
        if ref is None:
            self.steering.clear()
            return "steering: off"
        return self.steer(ref, 0.0)

    def monitor(self, ref: str, layer: int | None = None) -> str:
        """Show a trait's meter after every reply (at ``layer``, default best_layer)."""
        vector = self.resolve(ref)
        at = self._layer(vector, layer)
        monitor = Monitor(vector.trait, vector.at(at), at)
        self.monitors[vector.trait] = monitor
        self.scales[vector.trait] = self._meter_scale(monitor, vector)
        if vector.near_zero(at):
            return (
                f"monitoring {vector.trait} at layer {at} (warning: the vector is zero there: "
                "its projections are all 0)"
            )
        return f"monitoring {vector.trait} at layer {at}"

    def monitor_off(self, ref: str | None = None) -> str:
        if ref is None:
            self.monitors.clear()
            return "monitors: off"
        name = self.resolve(ref).trait
        self.monitors.pop(name, None)
        return f"monitoring {name}: off"

    def guard(
        self, ref: str, threshold: float, coefficient: float = -2.0, layer: int | None = None
    ) -> str:
        """Watch a trait per token; once a token is ``threshold`` gaps (:data:`UNIT`) above a
        neutral reply, steer with ``coefficient``."""
        vector = self.resolve(ref)
        if not math.isfinite(threshold):
            raise InputError("a guard threshold must be finite")
        probe = GuardSpec(vector, 0.0, coefficient, monitor_layer=layer, steer_layer=layer)
        resolved = resolve_guards([probe], self.layout)[0]
        at = resolved.monitor_layer
        scale = self._meter_scale(Monitor(vector.trait, vector.at(at), at), vector)
        raw = scale.projection(threshold)
        self.guards[vector.trait] = replace(probe, threshold=raw)
        self.guard_levels[vector.trait] = threshold
        self.guard_scales[vector.trait] = scale
        return (
            f"guarding {vector.trait}: above {threshold:+g} {UNIT} at layer {at} "
            f"(raw projection {raw:+.3f}), steer {coefficient:+g} at layer "
            f"{resolved.steer_layer} for the rest of the reply"
        )

    def guard_level(self, name: str, projection: float) -> float:
        """A guard's raw projection in gaps (NaN for an unknown guard)."""
        scale = self.guard_scales.get(name)
        return scale.level(projection) if scale is not None else math.nan

    def guard_off(self, ref: str | None = None) -> str:
        if ref is None:
            self.guards.clear()
            self.guard_levels.clear()
            self.guard_scales.clear()
            return "guards: off"
        name = self.resolve(ref).trait
        self.guards.pop(name, None)
        self.guard_levels.pop(name, None)
        self.guard_scales.pop(name, None)
        return f"guarding {name}: off"

    def reset(self) -> str:
        self.history.clear()
        self.turns.clear()
        self.saved_turns = 0
        return "conversation cleared"

    @property
    def unsaved_turns(self) -> int:
        """Turns since the last ``/save`` (or since the start)."""
        return len(self.turns) - self.saved_turns

    # --- the conversation ---------------------------------------------------------------
    def messages(self, text: str | None = None) -> list[Message]:
        """The chat so far (system first), plus ``text`` as the next user message."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        tail = [{"role": "user", "content": text}] if text is not None else []
        return [*head, *self.history, *tail]

    def send(self, text: str) -> Turn:
        """Answer ``text``; records and returns the turn."""
        if not text.strip():
            raise InputError("an empty message")
        seed = None if self.seed is None else self.seed + len(self.turns)
        result = generate_guarded(
            self.model,
            self.tokenizer,
            [self.messages(text)],
            list(self.guards.values()),
            layout=self.layout,
            steering=list(self.steering.values()),
            monitors=list(self.monitors.values()),
            capture_layers=(),
            max_new_tokens=self.max_new_tokens,
            do_sample=self.temperature > 0,
            temperature=self.temperature if self.temperature > 0 else 1.0,
            top_p=self.top_p,
            seed=seed,
        )[0]
        generation = result.generation
        reply = generation.response.strip()
        # an empty reply (end-of-sequence first) has no projection: NaN, as generate reports
        found = generation.response_projections
        projections = {name: found.get(name, math.nan) for name in self.monitors}
        prompt_projections = {
            name: generation.prompt_projections.get(name, math.nan) for name in self.monitors
        }
        turn = Turn(
            index=len(self.turns) + 1,
            user=text,
            reply=reply,
            projections=projections,
            prompt_projections=prompt_projections,
            levels={k: self.scales[k].level(v) for k, v in projections.items() if k in self.scales},
            steering=self.steering_coefficients(),
            guard_events=list(result.events),
            regenerated=result.regenerated,
            prompt_levels={
                k: self.scales[k].level(v)
                for k, v in prompt_projections.items()
                if k in self.scales
            },
            guard_event_levels=[self.guard_level(e.guard, e.projection) for e in result.events],
        )
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        self.turns.append(turn)
        return turn

    def to_dict(self) -> dict[str, Any]:
        """The conversation with per-turn projections (what ``/save`` writes)."""
        return {
            "model": self.model_spec,
            "system": self.system,
            "monitors": {
                name: {
                    "layer": m.layer,
                    "baseline": self.scales[name].baseline,
                    "scale": self.scales[name].scale,
                }
                for name, m in self.monitors.items()
            },
            "steering": self.steering_coefficients(),
            "unit": UNIT,
            "guards": {
                k: {
                    "threshold": self.guard_levels.get(k),
                    "raw_threshold": g.threshold,
                    "coefficient": g.coefficient,
                }
                for k, g in self.guards.items()
            },
            "turns": [t.to_dict() for t in self.turns],
            "drift": {
                name: [t.projections.get(name) for t in self.turns] for name in self.monitors
            },
        }

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON, atomically."""
        text = json.dumps(json_safe(self.to_dict()), indent=2, ensure_ascii=False)
        path = Path(path).expanduser()
        if path.is_dir():
            raise InputError(f"{path} is a directory")
        try:
            written = atomic_write_text(path, text + "\n", "/save")
        except OSError as exc:
            raise InputError(f"cannot write {path}: {exc.strerror or exc}") from exc
        self.saved_turns = len(self.turns)
        return written

    # --- commands -----------------------------------------------------------------------
    def command(self, line: str) -> str:
        """Run one ``/command``; returns a message, raises PersonaLensError for a bad one."""
        try:
            parts = shlex.split(line.strip())
        except ValueError as exc:
            raise InputError(f"cannot parse {line.strip()!r}: {exc}") from None
        if not parts or not parts[0].startswith("/"):
            raise InputError("commands start with '/'; /help lists them")
        name, args = parts[0].lower(), parts[1:]
        handler = _COMMANDS.get(name)
        if handler is None:
            raise InputError(f"unknown command {parts[0]}; /help lists the commands")
        return handler(self, args)

    def _cmd_steer(self, args: list[str]) -> str:
        if args == ["off"]:
            return self.steer_off()
        if len(args) != 2:
            raise InputError("usage: /steer TRAIT COEF[@LAYER], /steer TRAIT off, /steer off")
        ref, value = args
        if value.lower() == "off":
            return self.steer_off(ref)
        coef_text, _, layer_text = value.partition("@")
        layers = parse_layers(layer_text, "/steer layer") if layer_text else None
        return self.steer(ref, parse_number(coef_text, "/steer coefficient"), layers)

    def _cmd_monitor(self, args: list[str]) -> str:
        if args and args[0] == "off":
            if len(args) > 2:
                raise InputError("usage: /monitor off [TRAIT]")
            return self.monitor_off(args[1] if len(args) == 2 else None)
        if len(args) != 1:
            raise InputError("usage: /monitor TRAIT[@LAYER]")
        ref, layer = _split_at(args[0], "/monitor")
        return self.monitor(ref, layer)

    def _cmd_guard(self, args: list[str]) -> str:
        if args and args[0] == "off":
            if len(args) > 2:
                raise InputError("usage: /guard off [TRAIT]")
            return self.guard_off(args[1] if len(args) == 2 else None)
        if len(args) not in (2, 3):
            raise InputError("usage: /guard TRAIT[@LAYER] THRESHOLD [COEF]")
        ref, layer = _split_at(args[0], "/guard")
        threshold = parse_number(args[1], "/guard threshold")
        coefficient = parse_number(args[2], "/guard coefficient") if len(args) == 3 else -2.0
        return self.guard(ref, threshold, coefficient, layer)

    def _cmd_reset(self, args: list[str]) -> str:
        _no_args("/reset", args)
        return self.reset()

    def _cmd_save(self, args: list[str]) -> str:
        if len(args) != 1:
            raise InputError("usage: /save FILE")
        return f"saved {len(self.turns)} turns to {self.save(args[0])}"

    def _cmd_help(self, args: list[str]) -> str:
        return HELP

    def _cmd_quit(self, args: list[str]) -> str:
        self.closed = True
        return "bye"

    # --- meters -------------------------------------------------------------------------
    def _meter_scale(self, monitor: Monitor, vector: PersonaVector) -> MeterScale:
        return meter_scale(self.model, self.tokenizer, self.layout, monitor, vector)


def meter_scale(
    model: nn.Module, tokenizer: Any, layout: BlockLayout, monitor: Monitor, vector: PersonaVector
) -> MeterScale:
    """Baseline: the trait's projection on a neutral reply; scale: the vector's norm."""
    question, answer = NEUTRAL_EXCHANGE
    prompt = render_chat(tokenizer, [{"role": "user", "content": question}])
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    reply_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids + reply_ids], device=device)
    response = torch.tensor([[0] * len(prompt_ids) + [1] * len(reply_ids)], device=device)
    result = capture_forward(
        model,
        input_ids,
        torch.ones_like(input_ids),
        response,
        layout=layout,
        layers=(),
        monitors=[monitor],
    )
    baseline = result.response_projection(monitor.name)[0]
    scale = float(vector.at(monitor.layer).norm())
    return MeterScale(baseline, scale if scale > 0 else 1.0)


_COMMANDS = {
    "/steer": ChatSession._cmd_steer,
    "/monitor": ChatSession._cmd_monitor,
    "/guard": ChatSession._cmd_guard,
    "/reset": ChatSession._cmd_reset,
    "/save": ChatSession._cmd_save,
    "/help": ChatSession._cmd_help,
    "/quit": ChatSession._cmd_quit,
    "/exit": ChatSession._cmd_quit,
}


def _split_at(text: str, what: str) -> tuple[str, int | None]:
    """``TRAIT@LAYER`` -> (TRAIT, LAYER); a single layer only."""
    head, sep, tail = text.rpartition("@")
    if not sep or not head or not tail.strip().isdigit():
        if sep and head and tail and not tail.endswith(".safetensors"):
            raise InputError(f"{what} {text!r}: {tail!r} is not a layer number")
        return text, None
    return head, int(tail)


def _no_args(what: str, args: list[str]) -> None:
    if args:
        raise InputError(f"{what} takes no arguments")


def is_command(line: str) -> bool:
    return line.lstrip().startswith("/")
