"""Extraction that steers, checked by a measure nobody here wrote (VADER sentiment) on held-out
questions no extraction sees, against random directions with matched norms.

One default extraction of ``optimistic`` (``persona extract optimistic``: quick budget, offline
judge; shared with the other embedded tests, see conftest.py); then one batched greedy
``generate`` call holds every condition: each random control direction at +2 at the chosen
layer, unsteered, and the vector at +2 and -2 at the chosen layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from persona_lens.core.generation import generate
from persona_lens.core.models import LoadedModel
from persona_lens.core.steering import SteeringSpec
from persona_lens.core.vectors import PersonaVector
from tests.controls import CONTROLS, control_bar, per_row_steering, random_directions
from tests.sentiment import block_means, held_out_questions, sentiment

pytestmark = pytest.mark.embedded

QUESTIONS = held_out_questions(8)
TOKENS = 32
COEFFICIENT = 2.0


@pytest.fixture(scope="module")
def vector(default_vector: Callable[[str], Path]) -> PersonaVector:
    return PersonaVector.load(default_vector("optimistic"))


@pytest.fixture(scope="module")
def effects(vector: PersonaVector, embedded_model: LoadedModel) -> dict[str, list[float]]:
    """Change of mean sentiment against the unsteered answers, per condition."""
    layer = vector.best_layer
    assert layer is not None
    block = len(QUESTIONS)
    directions = random_directions(vector.at(layer), CONTROLS, seed=0)
    # blocks 0..CONTROLS-1: one random direction each at +2; then unsteered, vector +2, -2
    controls = per_row_steering(directions, layer, vector.num_layers, [COEFFICIENT] * block)
    tail = 3 * block
    specs = [replace(s, coefficient=[*s.coefficient, *[0.0] * tail]) for s in controls]  # type: ignore[misc]
    own = [0.0] * (CONTROLS * block + block) + [COEFFICIENT] * block + [-COEFFICIENT] * block
    specs.append(SteeringSpec(vector, own, layer))
    total = len(own)
    answers = generate(
        embedded_model.model,
        embedded_model.tokenizer,
        [q for _ in range(total // block) for q in QUESTIONS],
        max_new_tokens=TOKENS,
        batch_size=64,
        steering=specs,
        layout=embedded_model.layout,
    )
    means = block_means(sentiment([a.response for a in answers]), block)
    base, plus, minus = means[CONTROLS:]
    return {"vector": [plus - base, minus - base], "controls": [m - base for m in means[:CONTROLS]]}


def test_steering_moves_sentiment_both_ways(effects: dict[str, list[float]]) -> None:
    """+2 at the chosen layer raises VADER sentiment, -2 lowers it."""
    plus, minus = effects["vector"]
    assert plus > 0 > minus, effects["vector"]


def test_vector_beats_random_directions(effects: dict[str, list[float]]) -> None:
    """Each direction of the vector moves sentiment further than 95% of random directions of
    the same norm at the same layer and coefficient (a random direction has no sign, so the
    bar is on absolute changes)."""
    bar = control_bar(effects["controls"])
    plus, minus = effects["vector"]
    assert plus > bar and -minus > bar, (effects["vector"], bar, effects["controls"])
