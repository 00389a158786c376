"""The monitoring experiment: prompt ladder, many-shot prompts, Pearson r, one generate call
for all prompts with a prompt-token monitor; files and CLI; one embedded smoke run."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from persona_lens.cli import app
from persona_lens.core.architecture import BlockLayout
from persona_lens.core.capture import Monitor, capture_forward
from persona_lens.core.errors import InputError, LayerError
from persona_lens.core.generation import render_chat
from persona_lens.core.models import LoadedModel
from persona_lens.core.vectors import PersonaVector
from persona_lens.monitoring import experiment as mx
from persona_lens.monitoring.experiment import (
    ExperimentResult,
    ExperimentSettings,
    Point,
    ladder,
    many_shot_messages,
    pearson,
    run_experiment,
    write_experiment,
)
from persona_lens.traits.definitions import TraitDefinition, load_trait
from tests.cli_run import assert_one_line_error, persona
from tests.crude_vector import crude_vector
from tests.fake_judge import FakeJudge, GenerateSpy, LearningJudge, hello_share
from tests.tiny import load_tiny, random_trait_vector

L = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedModel, BlockLayout, Path]:
    return load_tiny(tmp_path_factory.mktemp("mx") / "model", seed=4, num_layers=L)


@pytest.fixture(scope="module")
def vector(tiny: tuple[LoadedModel, BlockLayout, Path]) -> PersonaVector:
    return random_trait_vector(tiny, "humorous", seed=2, best_layer=3)


@pytest.fixture(scope="module")
def trait() -> TraitDefinition:
    return load_trait("humorous")


# --- statistics -------------------------------------------------------------------------------
def test_pearson_matches_numpy() -> None:
    rng = random.Random(0)
    for n in (3, 5, 40):
        x = [rng.gauss(0, 1) for _ in range(n)]
        y = [2 * v + rng.gauss(0, 1) for v in x]
        r = pearson(x, y)
        assert r == pytest.approx(float(np.corrcoef(x, y)[0, 1]), abs=1e-12)
    assert pearson([1, 2, 3, 4], [8, 6, 4, 2]) == pytest.approx(-1.0)
    assert pearson([1, 2, 3], [5, 5, 5]) is None  # constant
    assert pearson([1, 2], [3, 4]) is None  # too few
    with pytest.raises(ValueError):
        pearson([1, 2, 3], [1, 2])


def _point(condition: str, level: int, projection: float, trait: float | None) -> Point:
    return Point(condition, level, f"l{level}", "q", projection, trait, 80.0, 0)


def test_correlations_overall_and_within_conditions() -> None:
    ladder_x, ladder_y = [0.0, 1.0, 2.0, 3.0, 4.0], [10.0, 35.0, 20.0, 60.0, 90.0]
    shot_x, shot_y = [5.0, 6.0, 7.0, 8.0], [70.0, 40.0, 30.0, 20.0]
    points = [
        _point(mx.LADDER, i, x, y) for i, (x, y) in enumerate(zip(ladder_x, ladder_y, strict=True))
    ]
    points += [
        _point(mx.MANY_SHOT, i, x, y) for i, (x, y) in enumerate(zip(shot_x, shot_y, strict=True))
    ]
    points.append(_point(mx.LADDER, 9, 100.0, None))  # unscored: left out
    c = ExperimentResult("t", 3, points, []).correlations()
    assert c[mx.LADDER]["r"] == pytest.approx(np.corrcoef(ladder_x, ladder_y)[0, 1])
    assert c[mx.MANY_SHOT]["r"] == pytest.approx(np.corrcoef(shot_x, shot_y)[0, 1])
    overall = np.corrcoef(ladder_x + shot_x, ladder_y + shot_y)[0, 1]
    assert c["overall"]["r"] == pytest.approx(overall) and c["overall"]["n"] == 9


# --- prompts ----------------------------------------------------------------------------------
def test_ladder_runs_from_suppressing_to_eliciting(trait: TraitDefinition) -> None:
    rungs = ladder(trait)
    assert [r.index for r in rungs] == list(range(8))
    first, second = trait.instructions[0], trait.instructions[1]
    assert first.neg in str(rungs[0].system) and second.neg in str(rungs[0].system)
    assert rungs[1].system == first.neg
    assert rungs[3].system is None  # neutral: no system prompt
    assert rungs[6].system == first.pos
    assert first.pos in str(rungs[7].system) and second.pos in str(rungs[7].system)
    assert all(first.pos not in str(r.system) for r in rungs[:4])
    assert all(first.neg not in str(r.system) for r in rungs[4:])
    assert len({r.system for r in rungs}) == 8
    assert "suppress" in rungs[2].label and "elicit" in rungs[4].label


def test_many_shot_messages() -> None:
    examples = [(f"q{i}", f"a{i}") for i in range(3)]
    messages = many_shot_messages(examples, 2, "final?")
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert [m["content"] for m in messages] == ["q0", "a0", "q1", "a1", "final?"]
    assert many_shot_messages(examples, 0, "x") == [{"role": "user", "content": "x"}]
    with pytest.raises(InputError):
        many_shot_messages(examples, 4, "x")


def test_settings_are_checked(trait: TraitDefinition) -> None:
    for bad in (
        ExperimentSettings(shot_counts=(0, 21)),
        ExperimentSettings(shot_counts=(2, 2)),
        ExperimentSettings(questions=0),
        ExperimentSettings(temperature=-1),
    ):
        with pytest.raises(InputError):
            bad.check(trait)


# --- the run ----------------------------------------------------------------------------------
def test_experiment_projects_last_prompt_token_in_one_call(
    tiny: tuple[LoadedModel, BlockLayout, Path],
    vector: PersonaVector,
    trait: TraitDefinition,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loaded, layout, _ = tiny
    spy = GenerateSpy()
    monkeypatch.setattr(mx, "generate", spy)
    import persona_lens.monitoring.evaluation as evaluation

    monkeypatch.setattr(evaluation, "generate", spy)
    settings = ExperimentSettings(questions=2, shot_counts=(0, 1, 3), max_new_tokens=3)
    result = run_experiment(
        loaded.model, loaded.tokenizer, layout, FakeJudge(hello_share), trait, vector, settings
    )
    # one call for the in-context examples (pos side only), one for every experiment prompt
    assert len(spy.calls) == 2
    examples_call, main_call = spy.calls
    assert len(examples_call["prompts"]) == 3 and not examples_call.get("monitors")
    assert len(main_call["prompts"]) == 8 * 2 + 3 * 2
    (monitor,) = main_call["monitors"]
    assert monitor.layer == 3 == result.layer
    assert len(result.points) == 22 and len(result.examples) == 3
    assert [p.level for p in result.points if p.condition == mx.LADDER] == [
        i for i in range(8) for _ in range(2)
    ]
    assert [p.level for p in result.points if p.condition == mx.MANY_SHOT] == [0, 0, 1, 1, 3, 3]
    # the projection is the last prompt token's: compare with a forward pass of the prompt
    for point, prompt in zip(result.points, main_call["prompts"], strict=True):
        text = render_chat(loaded.tokenizer, prompt)
        ids = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        captured = capture_forward(
            loaded.model,
            ids["input_ids"],
            ids["attention_mask"],
            torch.zeros_like(ids["attention_mask"]),
            layout=layout,
            layers=(),
            monitors=[Monitor("m", vector.at(3), 3)],
        )
        assert point.projection == pytest.approx(
            float(captured.prompt_projections["m"][0]), abs=1e-4
        )
    # the neutral rung and the 0-shot prompt are the same prompt
    neutral = [p.projection for p in result.points if p.condition == mx.LADDER and p.level == 3]
    zero = [p.projection for p in result.points if p.condition == mx.MANY_SHOT and p.level == 0]
    assert neutral == pytest.approx(zero, abs=1e-4)
    assert len({round(p.projection, 4) for p in result.points}) > 8
    assert all(p.trait is not None and p.coherence == 80.0 for p in result.points)


def test_samples_are_averaged_and_learning_judge_fitted(
    tiny: tuple[LoadedModel, BlockLayout, Path], vector: PersonaVector, trait: TraitDefinition
) -> None:
    loaded, layout, _ = tiny
    judge = LearningJudge(hello_share)
    settings = ExperimentSettings(questions=1, shot_counts=(0,), samples=3, max_new_tokens=4)
    result = run_experiment(loaded.model, loaded.tokenizer, layout, judge, trait, vector, settings)
    ((positives, negatives),) = judge.fits
    assert len(positives) == len(negatives) == 6
    assert {i.question for i in positives} <= set(trait.extraction_questions)
    assert result.examples == []
    for point in result.points:
        assert len(point.responses) == 3
        assert point.trait == pytest.approx(sum(hello_share(r) for r in point.responses) / 3)


def test_progress_ends_complete(
    tiny: tuple[LoadedModel, BlockLayout, Path], vector: PersonaVector, trait: TraitDefinition
) -> None:
    """Every stage's last report is done == total, ending with judging 1/1 (it used to stop
    at `judging 0/1`)."""
    loaded, layout, _ = tiny
    reports: list[tuple[str, int, int]] = []
    settings = ExperimentSettings(questions=1, shot_counts=(0,), max_new_tokens=2)
    run_experiment(
        loaded.model,
        loaded.tokenizer,
        layout,
        FakeJudge(hello_share),
        trait,
        vector,
        settings,
        progress=lambda stage, done, total: reports.append((stage, done, total)),
    )
    assert reports[-1] == ("judging", 1, 1)
    last = {stage: (done, total) for stage, done, total in reports}
    assert set(last) == {"examples", "generating", "judging"}
    assert all(done == total for done, total in last.values()), last


def test_layer_override_and_missing_best_layer(
    tiny: tuple[LoadedModel, BlockLayout, Path], trait: TraitDefinition
) -> None:
    loaded, layout, _ = tiny
    bare = PersonaVector(torch.ones(L + 1, layout.hidden_size), "humorous")
    settings = ExperimentSettings(questions=1, shot_counts=(), max_new_tokens=2)
    with pytest.raises(LayerError):
        run_experiment(loaded.model, loaded.tokenizer, layout, FakeJudge(), trait, bare, settings)
    result = run_experiment(
        loaded.model,
        loaded.tokenizer,
        layout,
        FakeJudge(),
        trait,
        bare,
        ExperimentSettings(questions=1, shot_counts=(), max_new_tokens=2, layer=1),
    )
    assert result.layer == 1 and len(result.points) == 8


def test_write_experiment(tmp_path: Path) -> None:
    rng = random.Random(1)
    points = [_point(mx.LADDER, i % 8, rng.random(), rng.random() * 100) for i in range(16)]
    points += [_point(mx.MANY_SHOT, k, rng.random(), rng.random() * 100) for k in (0, 2, 5)]
    result = ExperimentResult("humorous", 3, points, [("q", "a")], {"model": "m"})
    written = write_experiment(result, tmp_path / "run")
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["monitoring.json", "monitoring.md", "monitoring.png"]
    data = json.loads(written[-1].read_text())
    assert data["correlations"]["overall"]["n"] == 19
    assert data["correlations"]["ladder"]["r"] == pytest.approx(
        np.corrcoef([p.projection for p in points[:16]], [p.trait for p in points[:16]])[0, 1]
    )
    assert len(data["levels"]) == 11 and data["examples"] == [{"question": "q", "answer": "a"}]
    md = (tmp_path / "run" / "monitoring.md").read_text()
    assert "| overall | 19 |" in md and "monitoring.png" in md
    assert (tmp_path / "run" / "monitoring.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError):
        write_experiment(result, tmp_path / "afile")


def test_cli_experiment_with_fake_judge(
    tiny: tuple[LoadedModel, BlockLayout, Path],
    vector: PersonaVector,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import persona_lens.judges.specs as judges

    monkeypatch.setattr(judges, "load_judge", lambda spec, **kw: FakeJudge(hello_share))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, _, model_dir = tiny
    vec = vector.save(tmp_path / "humorous.safetensors")
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "monitor-experiment",
            "--model",
            str(model_dir),
            "--vector",
            f"{vec}@2",
            "--questions",
            "1",
            "--shots",
            "0,2",
            "--max-new-tokens",
            "3",
            "--judge",
            "offline",  # load_judge is patched to a fake judge
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(out / "monitoring.json")
    data = json.loads((out / "monitoring.json").read_text())
    assert data["layer"] == 2 and len(data["points"]) == 10
    assert data["settings"]["shot_counts"] == [0, 2] and data["trait"] == "humorous"


def test_cli_experiment_bad_input(vector: PersonaVector, tmp_path: Path) -> None:
    vec = str(vector.save(tmp_path / "v.safetensors"))
    out = tmp_path / "run"
    cases = [
        (["--shots", "0,x"], "whole numbers"),
        (["--shots", "0,25"], "at most 20 shots"),
        (["--shots", "2,2"], "distinct"),
        (["--judge", "none"], "needs a judge"),
        (["--vector", str(tmp_path / "missing.safetensors")], "no vector file"),
        (["--vector", f"{vec}@1-3"], "one layer"),
        (["--trait", "no-such-trait"], "unknown trait"),
    ]
    for args, needle in cases:
        base = [] if "--vector" in args else ["--vector", vec]
        result = CliRunner().invoke(app, ["monitor-experiment", *base, *args, "--out", str(out)])
        assert result.exit_code != 0, args
        message = f"{result.exception} {result.output} {getattr(result, 'stderr', '')}"
        assert needle in message, (args, message)
        assert not out.exists(), args


def test_cli_experiment_error_is_one_line_exit_2(tmp_path: Path) -> None:
    out = tmp_path / "run"
    missing = str(tmp_path / "none.safetensors")
    proc = persona("monitor-experiment", "--vector", missing, "--out", str(out))
    assert_one_line_error(proc, "no vector file", out)


# --- embedded model ---------------------------------------------------------------------------
@pytest.mark.embedded
def test_embedded_experiment_smoke(embedded_model: LoadedModel, tmp_path: Path) -> None:
    loaded = embedded_model
    vector = crude_vector(loaded, "humorous")
    vec = vector.save(tmp_path / "humorous.safetensors")
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "monitor-experiment",
            "--vector",
            str(vec),
            "--questions",
            "1",
            "--shots",
            "0,2",
            "--max-new-tokens",
            "8",
            "--judge",
            "offline",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads((out / "monitoring.json").read_text())
    assert len(data["points"]) == 10 and data["layer"] == 15
    ladder_proj = [p["projection"] for p in data["points"] if p["condition"] == "ladder"]
    # the eliciting end of the ladder projects higher than the suppressing end
    assert ladder_proj[7] > ladder_proj[0]
    assert set(data["correlations"]) == {"overall", "ladder", "many_shot"}
    assert (out / "monitoring.png").is_file() and (out / "monitoring.md").is_file()
