"""Acceptance: `persona extract` on the embedded model, offline, end to end."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from persona_lens.cli import app
from persona_lens.core.generation import generate
from persona_lens.core.models import LoadedModel
from persona_lens.core.vectors import PersonaVector
from persona_lens.traits.definitions import load_trait
from tests.controls import CONTROLS, control_bar, per_row_steering, random_directions

pytestmark = pytest.mark.embedded

SEPARATION_CONTROLS = 200  # projections of the same answers: controls cost nothing here
STEER_QUESTIONS = 8
STEER_TOKENS = 32
STEER_COEFFICIENT = 4.0

# A measurable proxy for optimism that shares nothing with the pipeline: a word count.
HOPEFUL = frozenset(
    """hope hopeful bright brighter opportunity opportunities exciting excited optimistic
    positive promising possible possibilities success succeed thrive growth progress improve
    improving better best great wonderful amazing confident confidence forward potential joy
    happy enjoy solutions solution overcome achieve achievement embrace inspiring inspire
    incredible fantastic""".split()
)
GLOOMY = frozenset(
    """risk risks fail failure failures difficult difficulties problem problems challenge
    challenges worse worst unfortunately unlikely decline doubt doubtful uncertain uncertainty
    danger dangerous threat threats struggle struggling loss lose losing disappointing
    disappointment hard harsh limited concern concerns worry bleak grim costly complex
    obstacles obstacle""".split()
)


def optimism_score(text: str) -> float:
    """(hopeful - gloomy) words per 100 words."""
    words = re.findall(r"[a-z']+", text.lower())
    if not words:
        return 0.0
    return 100.0 * (sum(w in HOPEFUL for w in words) - sum(w in GLOOMY for w in words)) / len(words)


@pytest.fixture(scope="module")
def extracted(default_vector: Callable[[str], Path]) -> Path:
    """``persona extract optimistic`` with the defaults (quick budget, offline judge)."""
    return default_vector("optimistic")


def test_vector_file_and_report(extracted: Path) -> None:
    vector = PersonaVector.load(extracted)
    assert vector.vectors.shape == (31, 576)
    meta = vector.metadata
    assert meta["judge"] == "offline" and meta["method"] == "mean_diff/response_avg"
    assert int(meta["num_pos"]) > 0 and int(meta["num_neg"]) > 0
    assert vector.best_layer is not None and 1 <= vector.best_layer <= 30
    report = extracted.with_suffix("").as_posix() + ".report.md"
    text = Path(report).read_text()
    assert "Filtering" in text and "best layer" in text
    assert Path(extracted.with_suffix("").as_posix() + ".report.png").stat().st_size > 1000


@pytest.mark.xfail(
    strict=True,
    reason="measured: at layer 29, vector d = 0.54 vs random |d| 95% = 0.88 on 8+8 answers; "
    "open finding (too few answers for power, or the prompts shift answers in many directions)",
)
def test_held_out_projections_separate(extracted: Path, embedded_model: LoadedModel) -> None:
    """Fresh rollouts on evaluation questions (never used for extraction), at the layer the
    extraction found most separating on its own held-out split: the eliciting and suppressing
    prompts' answers separate along the vector (Cohen's d of their response-mean projections)
    more than along 95% of random directions with the same norm, on the same answers."""
    vector = PersonaVector.load(extracted)
    separation = json.loads(vector.metadata["held_out_separation"])
    layer = max(range(1, len(separation)), key=lambda k: separation[k])
    trait = load_trait("optimistic")
    questions = list(trait.evaluation_questions[:8])
    prompts = [
        [{"role": "system", "content": s}, {"role": "user", "content": q}]
        for s in (trait.instructions[2].pos, trait.instructions[2].neg)
        for q in questions
    ]
    out = generate(
        embedded_model.model,
        embedded_model.tokenizer,
        prompts,
        max_new_tokens=32,
        capture_layers=[layer],
        batch_size=16,
    )
    means = torch.stack([g.response_mean[0] for g in out if g.response_mean is not None])
    assert len(means) == len(prompts)

    def cohen_d(direction: torch.Tensor) -> float:
        projections = means @ (direction / direction.norm())
        pos, neg = projections[: len(questions)], projections[len(questions) :]
        pooled = torch.cat([pos - pos.mean(), neg - neg.mean()]).std()
        return float((pos.mean() - neg.mean()) / pooled)

    found = cohen_d(vector.at(layer))
    controls = [cohen_d(r) for r in random_directions(vector.at(layer), SEPARATION_CONTROLS)]
    bar = control_bar(controls)
    print(f"\nseparation at layer {layer}: vector d = {found:.2f}, random |d| 95% = {bar:.2f}")
    assert found > bar, (layer, found, sorted(controls))


def test_steering_shifts_text_towards_optimism(
    extracted: Path, embedded_model: LoadedModel
) -> None:
    """Steering with +c and -c shifts the answers' hopeful-minus-gloomy word rate more along
    the vector than along 95% of random directions with its norm at the steered layer: every
    direction and sign in one batched generate call (per-row coefficients)."""
    vector = PersonaVector.load(extracted)
    layer = vector.best_layer
    assert layer is not None
    questions = list(load_trait("optimistic").evaluation_questions[:STEER_QUESTIONS])
    directions = [vector.at(layer), *random_directions(vector.at(layer), CONTROLS, seed=1)]
    signs = [STEER_COEFFICIENT] * len(questions) + [-STEER_COEFFICIENT] * len(questions)
    prompts = (questions * 2) * len(directions)
    out = generate(
        embedded_model.model,
        embedded_model.tokenizer,
        prompts,
        max_new_tokens=STEER_TOKENS,
        steering=per_row_steering(directions, layer, len(vector.vectors) - 1, signs),
        batch_size=64,
    )
    shifts = []
    for k in range(len(directions)):
        block = [optimism_score(g.response) for g in out[k * len(signs) : (k + 1) * len(signs)]]
        up, down = block[: len(questions)], block[len(questions) :]
        shifts.append(sum(up) / len(up) - sum(down) / len(down))
    found, bar = shifts[0], control_bar(shifts[1:])
    print(f"\noptimism shift at layer {layer}: vector {found:+.2f}, random |shift| 95% {bar:.2f}")
    assert found > bar, (found, sorted(shifts[1:]))


def test_custom_trait_from_description_offline(tmp_path: Path, embedded_model: LoadedModel) -> None:
    result = CliRunner().invoke(
        app,
        [
            "extract",
            "stoic",
            "--description",
            "calm acceptance of hardship without complaint",
            "--judge",
            "none",
            "--budget",
            "quick",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    vector = PersonaVector.load(tmp_path / "stoic.safetensors")
    assert vector.metadata["generator"].startswith("generated:offline")
    assert vector.metadata["description"] == "calm acceptance of hardship without complaint"
    assert torch.isfinite(vector.vectors).all() and vector.norms()[1:].min() > 0
