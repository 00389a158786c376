"""Scores of screened samples: how far a dataset response moves the model along each vector.

For a sample (prompt x, dataset response y) and a vector's unit direction v̂ at layer l, with
a_l(x, y) the mean of block l's output over the response tokens (layer positions as in
DESIGN.md: l is the output of block l):

- ``diff`` (the paper's projection difference): ΔP = (a_l(x, y) - a_l(x, y')) · v̂, where y'
  is the model's own greedy response to x (at most ``max_new_tokens``), from a generation
  backend (``hf`` captures a_l(x, y') while generating; ``vllm`` samples and the HF model reads);
- ``response``: the raw projection a_l(x, y) · v̂ (nothing is generated);
- ``prompt-last``: ΔP with the base term replaced by the projection of the last prompt token,
  h_l(x)[-1] · v̂, the paper's cheap approximation (nothing is generated).

One batched forward over x + y reads every vector at every layer it needs
(:func:`~persona_lens.core.capture.capture_sequences`, length-sorted batches).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from persona_lens.core.capture import Monitor, capture_sequences
from persona_lens.core.errors import InputError, VectorMismatchError
from persona_lens.core.generation import eos_token_ids, render_chat
from persona_lens.core.models import LoadedModel
from persona_lens.core.vectors import PersonaVector
from persona_lens.extraction.backends import BACKENDS, GenerationBackend, load_backend
from persona_lens.screening.samples import Sample, SkippedRow

MODES = ("diff", "response", "prompt-last")


@dataclass(frozen=True)
class ScoreSettings:
    """How samples are scored. Only counts and the mode; never the model or the vectors."""

    mode: str = "diff"
    max_new_tokens: int = 64  # cap on the base response y' (diff mode)
    batch_size: int = 16  # sequences per forward pass and per generation batch
    max_response_tokens: int = 1024  # dataset responses are cut to this many tokens
    backend: str = "hf"  # who generates y': hf | vllm

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.backend not in BACKENDS:
            raise InputError(
                f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}"
            )
        for name in ("max_new_tokens", "batch_size", "max_response_tokens"):
            if getattr(self, name) < 1:
                raise InputError(f"{name.replace('_', '-')} must be at least 1")

    @property
    def score_key(self) -> str:
        """The name of the score in outputs: ``projection`` (response mode) or ``delta_p``."""
        return "projection" if self.mode == "response" else "delta_p"


@dataclass
class SampleScore:
    """One sample's scores, per monitor name."""

    row: int
    scores: dict[str, float]
    response_projection: dict[str, float]
    base_projection: dict[str, float] = field(default_factory=dict)  # y' or last prompt token
    base_response: str | None = None  # diff mode
    response_tokens: int = 0
    truncated: bool = False  # the dataset response was cut to max_response_tokens
    base_fallback: bool = False  # y' was empty: its term is the last prompt token's


class Scorer:
    """Scores samples with one loaded model and a fixed set of monitors (one replica)."""

    def __init__(
        self,
        loaded: LoadedModel,
        monitors: Sequence[Monitor],
        settings: ScoreSettings,
        backend: GenerationBackend | None = None,
    ) -> None:
        if not monitors:
            raise InputError("give at least one vector to screen with")
        self.loaded = loaded
        self.monitors = tuple(monitors)
        self.settings = settings
        self.layers = tuple(sorted({m.layer for m in self.monitors}))
        self.units = {m.name: m.unit() for m in self.monitors}
        tokenizer = loaded.tokenizer
        eos = eos_token_ids(loaded.model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
        self._backend = backend

    def backend(self) -> GenerationBackend:
        if self._backend is None:
            self._backend = load_backend(self.settings.backend, self.loaded)
        return self._backend

    def score(self, samples: Sequence[Sample]) -> list[SampleScore | SkippedRow]:
        """Scores in the order of ``samples`` (a row whose response has no tokens is skipped)."""
        tokenizer = self.loaded.tokenizer
        cap = self.settings.max_response_tokens
        prompts = _encode(tokenizer, [render_chat(tokenizer, s.prompt) for s in samples])
        responses = _encode(tokenizer, [s.response for s in samples])
        usable = [i for i, ids in enumerate(responses) if ids]
        captured = capture_sequences(
            self.loaded.model,
            [prompts[i] for i in usable],
            [responses[i][:cap] for i in usable],
            pad_token_id=self.pad_id,
            layout=self.loaded.layout,
            layers=self.layers,
            batch_size=self.settings.batch_size,
        )
        base: list[tuple[dict[str, float], str | None, bool]] = [({}, None, False)] * len(usable)
        if self.settings.mode == "diff":
            base = self._base_terms([samples[i] for i in usable])
        out: list[SampleScore | SkippedRow] = [
            SkippedRow(s.row, "response has no tokens") for s in samples
        ]
        for j, i in enumerate(usable):
            result = captured[j]
            assert result.response_mean is not None and result.prompt_last is not None
            response = self._project(result.response_mean[0])
            if self.settings.mode == "response":
                scores, base_projection = dict(response), {}
            elif self.settings.mode == "prompt-last":
                base_projection = self._project(result.prompt_last[0])
                scores = {k: response[k] - base_projection[k] for k in response}
            else:
                base_projection = base[j][0]
                scores = {k: response[k] - base_projection[k] for k in response}
            out[i] = SampleScore(
                row=samples[i].row,
                scores=scores,
                response_projection=response,
                base_projection=base_projection,
                base_response=base[j][1],
                response_tokens=min(len(responses[i]), cap),
                truncated=len(responses[i]) > cap,
                base_fallback=base[j][2],
            )
        return out

    def _project(self, means: torch.Tensor) -> dict[str, float]:
        """Projection of per-layer means [len(layers), d] onto each monitor's unit direction."""
        index = {layer: k for k, layer in enumerate(self.layers)}
        return {
            m.name: float(means[index[m.layer]].float() @ self.units[m.name]) for m in self.monitors
        }

    def _base_terms(
        self, samples: Sequence[Sample]
    ) -> list[tuple[dict[str, float], str | None, bool]]:
        """a_l(x, y') · v̂ per sample, y' the model's greedy answer (generated once per distinct
        prompt, in batches of prompts of similar length)."""
        keys = [_prompt_key(s) for s in samples]
        first: dict[str, tuple[dict[str, str], ...]] = {}
        for key, sample in zip(keys, samples, strict=True):
            first.setdefault(key, sample.prompt)
        distinct = list(first)
        tokenizer = self.loaded.tokenizer
        encoded = _encode(tokenizer, [render_chat(tokenizer, first[k]) for k in distinct])
        lengths = {k: len(ids) for k, ids in zip(distinct, encoded, strict=True)}
        order = sorted(distinct, key=lambda k: -lengths[k])
        size = len(order) if self.settings.backend == "vllm" else self.settings.batch_size
        terms: dict[str, tuple[dict[str, float], str | None, bool]] = {}
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            generations = self.backend().generate(
                [list(first[k]) for k in chunk],
                max_new_tokens=self.settings.max_new_tokens,
                temperature=0.0,
                seed=0,
            )
            for key, gen in zip(chunk, generations, strict=True):
                empty = not gen.response_ids or gen.response_mean is None
                means = gen.prompt_last if empty else gen.response_mean
                assert means is not None
                terms[key] = (self._project(means[list(self.layers)]), gen.response, empty)
        return [terms[k] for k in keys]


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text (one batched tokenizer call), no special tokens added."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _prompt_key(sample: Sample) -> str:
    return "\x1e".join(f"{m['role']}\x1f{m['content']}" for m in sample.prompt)


def check_vectors(vectors: Sequence[tuple[str, PersonaVector]], loaded: LoadedModel) -> None:
    """Refuse a vector made for another model; ``vectors`` are (where it came from, vector)."""
    layout = loaded.layout
    for where, vector in vectors:
        try:
            vector.check_compatible(layout.num_layers, layout.hidden_size, loaded.fingerprint)
        except VectorMismatchError as exc:
            raise VectorMismatchError(f"{where}: {exc}") from exc


def vector_config(vectors: Sequence[tuple[str, PersonaVector]]) -> list[dict[str, Any]]:
    """Vectors as plain data, for a Ray worker to check against its model."""
    return [
        {"where": where, "trait": v.trait, "vectors": v.vectors.tolist(), "metadata": v.metadata}
        for where, v in vectors
    ]


def vectors_from_config(config: Sequence[dict[str, Any]]) -> list[tuple[str, PersonaVector]]:
    return [
        (c["where"], PersonaVector(torch.tensor(c["vectors"]), c["trait"], dict(c["metadata"])))
        for c in config
    ]


def monitor_config(monitors: Sequence[Monitor]) -> list[dict[str, Any]]:
    """Monitors as plain data (name, layer, direction as a list), e.g. for a Ray worker."""
    return [
        {"name": m.name, "layer": m.layer, "direction": m.direction.float().tolist()}
        for m in monitors
    ]


def monitors_from_config(config: Sequence[dict[str, Any]]) -> list[Monitor]:
    return [
        Monitor(c["name"], torch.tensor(c["direction"], dtype=torch.float32), int(c["layer"]))
        for c in config
    ]
