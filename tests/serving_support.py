"""Shared helpers for the serving tests: a live server on loopback, clients, vectors, and the
comparison of greedy replies that tells float noise from cross-talk."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from persona_lens.core.models import LoadedModel
from persona_lens.core.vectors import PersonaVector
from persona_lens.serving.engine import Engine
from persona_lens.serving.server import LiveServer, build_app
from persona_lens.serving.settings import ServerSettings
from persona_lens.serving.vectors import VectorLibrary

NEAR_TIE = 1e-3
"""Top-2 log-probability gap below which float noise may flip a greedy choice."""


@dataclass
class Served:
    """A running server: its URL, engine and library."""

    url: str
    engine: Engine
    library: VectorLibrary
    model: str


@contextmanager
def serve(loaded: LoadedModel, vector_dir: Path | None = None, **settings: Any) -> Iterator[Served]:
    """Start an engine and uvicorn on a free loopback port; always stop both."""
    library = (
        VectorLibrary.load(vector_dir, loaded.layout, loaded.fingerprint)
        if vector_dir is not None
        else VectorLibrary([])
    )
    settings.setdefault("default_max_tokens", min(128, settings.get("max_tokens", 512)))
    app, engine = build_app(loaded, library, ServerSettings(**settings))
    try:
        with LiveServer(app) as server:
            yield Served(server.url, engine, library, loaded.name)
    finally:
        engine.stop()


def openai_client(url: str, api_key: str = "unused", **kwargs: Any) -> Any:
    """The real OpenAI client pointed at a test server (no retries)."""
    import openai

    return openai.OpenAI(
        base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=kwargs.pop("timeout", 300)
    )


def matched_random(vector: PersonaVector, name: str, seed: int) -> PersonaVector:
    """A random direction with ``vector``'s norm at every layer (the control), same metadata."""
    noise = torch.randn(vector.vectors.shape, generator=torch.Generator().manual_seed(seed))
    norms = vector.vectors.norm(dim=-1, keepdim=True)
    return PersonaVector(
        noise / noise.norm(dim=-1, keepdim=True) * norms, name, dict(vector.metadata)
    )


def sse_events(lines: Iterator[str]) -> list[Any]:
    """The ``data:`` payloads of a server-sent event stream (JSON, or the string ``[DONE]``)."""
    events: list[Any] = []
    for line in lines:
        if not line.startswith("data: "):
            assert not line.strip(), f"unexpected stream line {line!r}"
            continue
        data = line[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_error_shape(body: Any, code: str | None = None, param: str | None = None) -> None:
    """The OpenAI error shape, exactly: ``{"error": {message, type, param, code}}``."""
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error


@dataclass
class GreedyReply:
    """Token ids of a greedy reply with each step's top-2 log-probabilities."""

    tokens: list[str]
    gaps: list[float]  # top-1 minus top-2 log-probability at each step
    projections: list[dict[str, float]]


def greedy_reply(response: Any) -> GreedyReply:
    """From a non-streaming OpenAI chat response asked with ``logprobs=True, top_logprobs=2``."""
    content = response.choices[0].logprobs.content
    gaps = [
        t.top_logprobs[0].logprob - t.top_logprobs[1].logprob if len(t.top_logprobs) > 1 else 99.0
        for t in content
    ]
    extra = response.model_extra["persona"]
    names = list(extra["token_projections"])
    projections = [
        {n: extra["token_projections"][n][i] for n in names} for i in range(len(content))
    ]
    return GreedyReply([t.token for t in content], gaps, projections)


def compare_greedy(
    together: GreedyReply, alone: GreedyReply, projection_tolerance: float
) -> tuple[int, str, float]:
    """Compare a reply decoded in a batch with the same request decoded alone.

    Returns (tokens compared, note, largest projection difference). Tokens must be equal up to
    the end, or up to a step where the reply alone had a near tie (float rounding differs
    between batch shapes on a CPU, so a near tie may break either way). Projections must agree
    within ``projection_tolerance`` over the compared tokens: cross-talk (another row's steering
    leaking in) moves them by a coefficient times a vector norm, far above the tolerance.
    """
    n = min(len(together.tokens), len(alone.tokens))
    compared = n
    note = "identical"
    for i in range(n):
        if together.tokens[i] != alone.tokens[i]:
            assert alone.gaps[i] < NEAR_TIE or together.gaps[i] < NEAR_TIE, (
                f"token {i} differs ({together.tokens[i]!r} vs {alone.tokens[i]!r}) without a near "
                f"tie (top-2 gaps {together.gaps[i]:.2e}, {alone.gaps[i]:.2e})"
            )
            compared, note = i, f"near tie at token {i}"
            break
    else:
        assert len(together.tokens) == len(alone.tokens), "one reply stopped earlier"
    largest = 0.0
    for i in range(compared):  # a diverged token is fed differently, so is measured differently
        for name, value in alone.projections[i].items():
            other = together.projections[i][name]
            assert abs(other - value) <= projection_tolerance, (
                f"token {i}: projection {name} {other} in the batch vs {value} alone"
            )
            largest = max(largest, abs(other - value))
    return compared, note, largest


def max_abs(values: Sequence[float]) -> float:
    return max(abs(v) for v in values)


def embedded_with_vectors(folder: Path) -> LoadedModel:
    """A fresh embedded model (the server's engine will own it) and, in ``folder``, crude
    ``humorous`` and ``evil`` vectors (best layer 15) and ``control``, a random direction
    with humorous's norm at every layer."""
    from persona_lens.core.models import load_model
    from tests.crude_vector import crude_vector

    loaded = load_model("embedded")
    folder.mkdir(parents=True, exist_ok=True)
    humorous = crude_vector(loaded, "humorous")
    humorous.save(folder / "humorous.safetensors")
    crude_vector(loaded, "evil").save(folder / "evil.safetensors")
    matched_random(humorous, "control", seed=0).save(folder / "control.safetensors")
    return loaded


def steps_with_at_least(stats: dict[str, Any], rows: int) -> int:
    """Decoding steps that ran with ``rows`` or more rows (``rows_per_step`` keys are JSON
    strings over HTTP, ints in process)."""
    return sum(n for k, n in stats["rows_per_step"].items() if int(k) >= rows)
