"""Acceptance: `persona extract` on the embedded model, offline, end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from persona_lens.cli import app
from persona_lens.core.capture import Monitor
from persona_lens.core.generation import generate
from persona_lens.core.models import LoadedModel
from persona_lens.core.steering import SteeringSpec
from persona_lens.core.vectors import PersonaVector
from persona_lens.traits.definitions import load_trait

pytestmark = pytest.mark.embedded

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
def extracted(tmp_path_factory: pytest.TempPathFactory, embedded_model: LoadedModel) -> Path:
    out = tmp_path_factory.mktemp("vectors")
    result = CliRunner().invoke(
        app, ["extract", "optimistic", "--budget", "quick", "--judge", "offline", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path == out / "optimistic.safetensors"
    return path


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


def test_held_out_projections_separate(extracted: Path, embedded_model: LoadedModel) -> None:
    """Fresh rollouts on evaluation questions (never used for extraction), at the layer the
    extraction found most separating on its own held-out split: answers under the eliciting
    prompts project higher than answers under the suppressing prompts."""
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
        monitors=[Monitor("o", vector.at(layer), layer)],
        batch_size=16,
    )
    projections = torch.tensor([g.response_projections["o"] for g in out])
    pos, neg = projections[:8], projections[8:]
    pooled = torch.cat([pos - pos.mean(), neg - neg.mean()]).std()
    assert (pos.mean() - neg.mean()) / pooled > 0.5, (layer, pos, neg)


def test_steering_shifts_text_towards_optimism(
    extracted: Path, embedded_model: LoadedModel
) -> None:
    vector = PersonaVector.load(extracted)
    trait = load_trait("optimistic")
    questions = list(trait.evaluation_questions[:8])
    prompts = questions * 2
    coefficients = [4.0] * len(questions) + [-4.0] * len(questions)
    out = generate(
        embedded_model.model,
        embedded_model.tokenizer,
        prompts,
        max_new_tokens=48,
        steering=[SteeringSpec(vector, coefficients)],
        batch_size=16,
    )
    up = [optimism_score(g.response) for g in out[: len(questions)]]
    down = [optimism_score(g.response) for g in out[len(questions) :]]
    assert sum(up) / len(up) - sum(down) / len(down) > 2.0, (up, down)


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
