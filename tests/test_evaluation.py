"""``persona eval`` logic on a tiny Llama with fake judges: one batched generate call for every
condition (per-prompt coefficients), scores and refusals, judge calibration, files, CLI errors;
one smoke run on the embedded model."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from persona_lens.cli import app
from persona_lens.core.architecture import BlockLayout
from persona_lens.core.errors import InputError
from persona_lens.core.generation import generate
from persona_lens.core.models import LoadedModel
from persona_lens.core.steering import SteeringSpec
from persona_lens.core.vectors import PersonaVector
from persona_lens.monitoring import evaluation
from persona_lens.monitoring.evaluation import (
    EvalSettings,
    build_conditions,
    distinct_settings,
    evaluate,
    parse_coefficients,
    write_eval,
)
from persona_lens.traits.definitions import TraitDefinition, load_trait
from tests.cli_run import assert_one_line_error, persona
from tests.crude_vector import crude_vector
from tests.fake_judge import FakeJudge, GenerateSpy, LearningJudge, hello_share
from tests.tiny import load_tiny, random_trait_vector

L = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedModel, BlockLayout, Path]:
    return load_tiny(tmp_path_factory.mktemp("eval") / "model", seed=3, num_layers=L)


@pytest.fixture(scope="module")
def vector(tiny: tuple[LoadedModel, BlockLayout, Path]) -> PersonaVector:
    return random_trait_vector(tiny, "humorous", seed=1, best_layer=2, scale=8.0)


@pytest.fixture(scope="module")
def trait() -> TraitDefinition:
    return load_trait("humorous")


def test_sweep_is_one_generate_call_with_per_prompt_coefficients(
    tiny: tuple[LoadedModel, BlockLayout, Path],
    vector: PersonaVector,
    trait: TraitDefinition,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loaded, layout, _ = tiny
    spy = GenerateSpy()
    monkeypatch.setattr(evaluation, "generate", spy)
    settings = EvalSettings(questions=2, samples=2, max_new_tokens=4, temperature=1.0)
    report = evaluate(
        loaded.model,
        loaded.tokenizer,
        layout,
        FakeJudge(hello_share),
        trait,
        settings,
        sweep=SteeringSpec(vector, 0.0, 2),
        coefficients=[-3.0, 0.0, 3.0],
    )
    assert len(spy.calls) == 1
    (call,) = spy.calls
    (spec,) = call["steering"]
    # baseline and sweep 0 share rows: 3 distinct settings x 2 questions x 2 samples
    assert len(call["prompts"]) == 12 and len(spec.coefficient) == 12
    assert Counter(spec.coefficient) == {-3.0: 4, 0.0: 4, 3.0: 4}
    assert spec.layers == 2 and call["do_sample"] is True and call["seed"] == 0
    assert [c for c, _ in report.sweep] == [-3.0, 0.0, 3.0]
    assert report.sweep[1][1].samples == report.baseline.samples
    assert report.sweep_layer == 2
    for _, result in report.sweep:
        assert len(result.samples) == 4
        assert result.trait_score is not None and 0 <= result.trait_score <= 100


def test_rows_are_steered_as_if_run_alone(
    tiny: tuple[LoadedModel, BlockLayout, Path],
    vector: PersonaVector,
    trait: TraitDefinition,
) -> None:
    """Greedy: each condition's responses equal a separate run with a scalar coefficient."""
    loaded, layout, _ = tiny
    settings = EvalSettings(questions=2, samples=1, max_new_tokens=5, temperature=0.0)
    steer = SteeringSpec(vector, 4.0, 2)
    report = evaluate(
        loaded.model,
        loaded.tokenizer,
        layout,
        FakeJudge(),
        trait,
        settings,
        steering=[steer],
        sweep=SteeringSpec(vector, 0.0, 3),
        coefficients=[-6.0, 6.0],
    )
    questions = list(trait.evaluation_questions[:2])

    def alone(specs: list[SteeringSpec]) -> list[str]:
        out = generate(
            loaded.model,
            loaded.tokenizer,
            questions,
            max_new_tokens=5,
            steering=specs,
            layout=layout,
        )
        return [g.response for g in out]

    assert report.steered is not None
    assert [s.response for s in report.baseline.samples] == alone([])
    assert [s.response for s in report.steered.samples] == alone([steer])
    for coef, result in report.sweep:
        assert [s.response for s in result.samples] == alone([SteeringSpec(vector, coef, 3)])
    assert [s.response for s in report.steered.samples] != alone([])


def test_refusals_are_counted_not_averaged(
    tiny: tuple[LoadedModel, BlockLayout, Path], trait: TraitDefinition
) -> None:
    loaded, layout, _ = tiny
    calls = iter(range(1000))
    judge = FakeJudge(lambda a: 90.0, refuse=lambda a: next(calls) % 2 == 0)
    settings = EvalSettings(questions=3, samples=2, max_new_tokens=3)
    report = evaluate(loaded.model, loaded.tokenizer, layout, judge, trait, settings)
    summary = report.baseline.summary()
    assert summary["n"] == 6 and summary["refusals"] == 3 and summary["scored"] == 3
    assert summary["trait_score"] == pytest.approx(90.0)
    assert summary["coherence"] == pytest.approx(80.0)
    assert report.steered is None and report.sweep == []
    assert judge.coherence_traits == [trait]  # the trait's coherence rubric applies


def test_learning_judge_is_fitted_on_extraction_questions_only(
    tiny: tuple[LoadedModel, BlockLayout, Path], trait: TraitDefinition
) -> None:
    loaded, layout, _ = tiny
    judge = LearningJudge()
    evaluate(
        loaded.model,
        loaded.tokenizer,
        layout,
        judge,
        trait,
        EvalSettings(questions=2, max_new_tokens=3),
    )
    ((positives, negatives),) = judge.fits
    assert len(positives) == len(negatives) > 0
    asked = {i.question for i in positives + negatives}
    assert asked <= set(trait.extraction_questions)
    assert not asked & set(trait.evaluation_questions)
    # the scored items are evaluation answers, not the fitting ones
    assert {i.question for i in judge.trait_calls[-1]} <= set(trait.evaluation_questions)


def test_which_judges_learn() -> None:
    from persona_lens.judges.specs import load_judge
    from persona_lens.monitoring.evaluation import judge_learns

    assert judge_learns(LearningJudge()) and not judge_learns(FakeJudge())
    assert judge_learns(load_judge("offline"))  # no attribute: the offline judge learns
    assert not judge_learns(load_judge("none"))


def test_conditions_and_coefficients() -> None:
    vec = PersonaVector(torch.ones(3, 4), "t", {"best_layer": "1"})
    conditions, main = build_conditions([SteeringSpec(vec, 2.0)], True, [-1.0, 0.0, 1.0])
    assert [c.name for c in conditions] == ["baseline", "steered", "sweep -1", "sweep 0", "sweep 1"]
    assert [c.coefficients for c in conditions][:2] == [(0.0, 0.0), (2.0, 0.0)]
    assert main == 2 and distinct_settings(conditions) == 4  # sweep 0 == baseline
    assert parse_coefficients("-2, -1,0,1.5") == [-2.0, -1.0, 0.0, 1.5]
    for bad in ("1,x", "1,1", "nan", ""):
        with pytest.raises(InputError):
            parse_coefficients(bad)
    with pytest.raises(InputError):
        build_conditions([], True, [])
    with pytest.raises(InputError):
        EvalSettings(samples=0).check()


def test_write_eval_files(
    tiny: tuple[LoadedModel, BlockLayout, Path],
    vector: PersonaVector,
    trait: TraitDefinition,
    tmp_path: Path,
) -> None:
    loaded, layout, _ = tiny
    report = evaluate(
        loaded.model,
        loaded.tokenizer,
        layout,
        FakeJudge(hello_share),
        trait,
        EvalSettings(questions=2, max_new_tokens=3),
        steering=[SteeringSpec(vector, 1.0)],
        sweep=SteeringSpec(vector, 0.0, 2),
        coefficients=[-1.0, 0.0, 1.0],
    )
    out = tmp_path / "res" / "eval.json"
    written = write_eval(report, out)
    assert written[-1] == out
    data = json.loads(out.read_text())
    assert set(data) >= {"trait", "baseline", "steered", "sweep", "samples"}
    assert [p["coefficient"] for p in data["sweep"]["points"]] == [-1.0, 0.0, 1.0]
    assert {s["condition"] for s in data["samples"]} >= {"baseline", "steered", "sweep 1"}
    md = (tmp_path / "res" / "eval.md").read_text()
    assert "| coefficient | trait score" in md and "eval.sweep.png" in md
    assert (tmp_path / "res" / "eval.sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "eval.json",
        "eval.md",
        "eval.sweep.png",
    ]
    with pytest.raises(InputError):
        write_eval(report, tmp_path)


# --- command line -----------------------------------------------------------------------------
def _invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def test_cli_eval_with_fake_judge(
    tiny: tuple[LoadedModel, BlockLayout, Path],
    vector: PersonaVector,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import persona_lens.judges.specs as judges

    monkeypatch.setattr(judges, "load_judge", lambda spec, **kw: FakeJudge(hello_share))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, _, model_dir = tiny
    vec_path = vector.save(tmp_path / "humorous.safetensors")
    out = tmp_path / "eval.json"
    result = _invoke(
        "eval",
        "--model",
        str(model_dir),
        "--trait",
        "humorous",
        "--steer",
        f"{vec_path}:2",
        "--sweep",
        f"{vec_path}@3",
        "--coefficients",
        "-2,0,2",
        "--questions",
        "2",
        "--max-new-tokens",
        "3",
        "--judge",
        "offline",  # load_judge is patched to a fake judge
        "--out",
        str(out),
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(out)
    data = json.loads(out.read_text())
    assert data["sweep"]["layer"] == 3 and data["steered"]["n"] == 2
    assert data["steering"] == [f"{vec_path}:2"]


def test_cli_eval_bad_input_raises_user_errors_and_writes_nothing(
    vector: PersonaVector, tmp_path: Path
) -> None:
    vec = str(vector.save(tmp_path / "v.safetensors"))
    out = tmp_path / "eval.json"
    cases = [
        (["--sweep", vec, "--coefficients", "1,a"], "not a number"),
        (["--sweep", vec, "--coefficients", "1,1"], "repeats"),
        (["--judge", "none"], "needs a judge"),
        (["--judge", "bogus"], "unknown judge"),
        (["--steer", str(tmp_path / "missing.safetensors:2")], "no vector file"),
        (["--steer", vec], "expected VEC:COEF"),
        (["--trait", "no-such-trait"], "unknown trait"),
        (["--temperature", "-1"], "temperature"),
    ]
    for args, needle in cases:
        base = [] if "--trait" in args else ["--trait", "humorous"]
        result = _invoke("eval", *base, *args, "--out", str(out))
        assert result.exit_code != 0, args
        message = f"{result.exception} {result.output} {getattr(result, 'stderr', '')}"
        assert needle in message, (args, message)
        assert not out.exists(), args


def test_cli_eval_error_is_one_line_exit_2(tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    proc = persona("eval", "--trait", "humorous", "--judge", "none", "--out", str(out))
    assert_one_line_error(proc, "needs a judge", out)


# --- embedded model ---------------------------------------------------------------------------
@pytest.mark.embedded
def test_embedded_eval_sweep_smoke(embedded_model: LoadedModel, tmp_path: Path) -> None:
    """A crude humour vector (response means under pos vs neg prompts), then a tiny sweep."""
    loaded = embedded_model
    vector = crude_vector(loaded, "humorous")
    vec_path = vector.save(tmp_path / "humorous.safetensors")
    out = tmp_path / "eval.json"
    result = _invoke(
        "eval",
        "--trait",
        "humorous",
        "--sweep",
        str(vec_path),
        "--coefficients",
        "-4,0,4",
        "--questions",
        "2",
        "--max-new-tokens",
        "8",
        "--judge",
        "offline",
        "--out",
        str(out),
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    points = data["sweep"]["points"]
    assert [p["coefficient"] for p in points] == [-4, 0, 4]
    for p in points:
        assert p["n"] == 2 and p["scored"] + p["refusals"] + p["unscored"] == 2
        assert p["trait_score"] is None or 0 <= p["trait_score"] <= 100
    assert (tmp_path / "eval.sweep.png").is_file() and (tmp_path / "eval.md").is_file()
