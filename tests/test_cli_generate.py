"""Tests of ``persona generate`` and ``persona monitor`` on a tiny Llama saved to a directory
(and once on the embedded model): output records, steering arithmetic, monitor projections,
and bad input -> one line, exit 2, no output file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from persona_lens.cli import app
from persona_lens.core.errors import (
    InputError,
    LayerError,
    ModelSpecError,
    VectorError,
    VectorMismatchError,
)
from persona_lens.core.models import LoadedModel, load_model, model_fingerprint
from persona_lens.core.vectors import PersonaVector
from tests.cli_run import persona
from tests.tiny import HIDDEN_SIZE, tiny_model_dir

L = 4
PROMPTS = [
    {"prompt": "hello world", "id": 1},
    {
        "messages": [
            {"role": "system", "content": "hello"},
            {"role": "user", "content": "world world hello"},
        ],
        "id": 2,
        "extra": {"keep": True},
    },
    {"prompt": "world", "id": 3},
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model directory, vectors made for it (and for others), and a prompt file."""
    root = tmp_path_factory.mktemp("cli-gen")
    model_dir = tiny_model_dir(root / "model", seed=5, num_layers=L)
    lm = load_model(str(model_dir))
    fingerprint = model_fingerprint(lm.model, lm.tokenizer)
    gen = torch.Generator().manual_seed(0)

    def save(name: str, best: int | None, fp: str = fingerprint, d: int = HIDDEN_SIZE) -> Path:
        meta = {"model_fingerprint": fp, "model": str(model_dir)}
        if best is not None:
            meta["best_layer"] = str(best)
        vector = PersonaVector(2 * torch.randn(L + 1, d, generator=gen), name, meta)
        return vector.save(root / f"{name}.safetensors")

    paths = {
        "model": model_dir,
        "humorous": save("humorous", 2),
        "hallucinating": save("hallucinating", 2),
        "evil": save("evil", 3),
        "nobest": save("nobest", None),
        "other_model": save("other", 2, fp="f" * 16),
        "other_width": save("wide", 2, d=HIDDEN_SIZE * 2),
        "prompts": root / "prompts.jsonl",
    }
    paths["prompts"].write_text("\n".join(json.dumps(p) for p in PROMPTS) + "\n")
    return paths


def _invoke(*parts: list[Any]) -> Any:
    """Run the CLI in-process on the concatenated argument lists."""
    return CliRunner().invoke(app, [str(a) for part in parts for a in part])


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _unit(path: Path, layer: int) -> torch.Tensor:
    row = PersonaVector.load(path).at(layer)
    return row / row.norm()


# --- generate -----------------------------------------------------------------------------------
def test_generate_two_steers_and_monitors(env: dict[str, Path], tmp_path: Path) -> None:
    """'humor on, hallucination off' in one command; the monitored prompt projections move by
    exactly what the steering added at the monitored layer."""
    base_out, out = tmp_path / "base.jsonl", tmp_path / "out.jsonl"
    common = ["-m", env["model"], "-p", env["prompts"], "--max-new-tokens", 4]
    monitors = ["--monitor", env["humorous"], "--monitor", env["hallucinating"]]
    monitors += ["--monitor", f"{env['evil']}@4"]
    result = _invoke(["generate", *common, *monitors, "-o", base_out])
    assert result.exit_code == 0, result.output
    result = _invoke(
        [
            "generate",
            *common,
            "--steer",
            f"{env['humorous']}:2",
            "--steer",
            f"{env['hallucinating']}:-2",
            *monitors,
            "--token-projections",
            "-o",
            out,
        ]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    base, rows = _read(base_out), _read(out)
    assert [r["id"] for r in rows] == [1, 2, 3]
    assert rows[1]["extra"] == {"keep": True} and rows[1]["messages"] == PROMPTS[1]["messages"]

    h, e = PersonaVector.load(env["humorous"]).at(2), PersonaVector.load(env["hallucinating"]).at(2)
    added = 2 * h - 2 * e
    for name, path in (("humorous", env["humorous"]), ("hallucinating", env["hallucinating"])):
        expected_delta = float(added @ _unit(path, 2))
        for b, r in zip(base, rows, strict=True):
            delta = r["prompt_projections"][name] - b["prompt_projections"][name]
            assert delta == pytest.approx(expected_delta, rel=1e-3, abs=1e-3)
    for row in rows:
        assert set(row["projections"]) == {"humorous", "hallucinating", "evil"}
        assert isinstance(row["response"], str)
        tokens = row["tokens"]
        assert len(tokens) <= 4
        for name, values in row["token_projections"].items():
            assert len(values) == len(tokens)
            if values:
                assert row["projections"][name] == pytest.approx(sum(values) / len(values))
            else:
                assert row["projections"][name] is None
    assert "token_projections" not in base[0] and "tokens" not in base[0]


def test_generate_layer_selections(env: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    for steer in (f"{env['nobest']}:1@all", f"{env['nobest']}:1@2-3", f"{env['evil']}:-1@1,4"):
        result = _invoke(
            ["generate", "-m", env["model"], "-p", env["prompts"], "--steer", steer],
            ["--max-new-tokens", 2, "--temperature", 0.7, "--seed", 1, "-o", out],
        )
        assert result.exit_code == 0, (steer, result.output)
        assert len(_read(out)) == 3


# --- monitor ------------------------------------------------------------------------------------
def test_monitor_forward_matches_generation(env: dict[str, Path], tmp_path: Path) -> None:
    """The forward-only prompt projections equal those captured while generating, whatever
    the batching."""
    gen_out, mon_out = tmp_path / "g.jsonl", tmp_path / "m.jsonl"
    vectors = ["-v", env["humorous"], "-v", f"{env['evil']}@1", "-v", f"{env['evil']}@4"]
    result = _invoke(
        ["monitor", "-m", env["model"], "-p", env["prompts"], *vectors, "--generate"],
        ["--max-new-tokens", 3, "-o", gen_out],
    )
    assert result.exit_code == 0, result.output
    result = _invoke(
        ["monitor", "-m", env["model"], "-p", env["prompts"], *vectors],
        ["--batch-size", 1, "-o", mon_out],
    )
    assert result.exit_code == 0, result.output
    generated, monitored = _read(gen_out), _read(mon_out)
    assert set(monitored[0]["prompt_projections"]) == {"humorous", "evil@1", "evil@4"}
    for g, m in zip(generated, monitored, strict=True):
        assert "response" in g and "response" not in m
        assert m["projections"] == m["prompt_projections"]
        for key, value in m["prompt_projections"].items():
            assert value == pytest.approx(g["prompt_projections"][key], rel=1e-4, abs=1e-4)


def test_monitor_layer_option_overrides_best_layer(env: dict[str, Path], tmp_path: Path) -> None:
    outs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    for out, extra in zip(outs, ([], ["--layer", 2]), strict=True):
        result = _invoke(
            ["monitor", "-m", env["model"], "-p", env["prompts"], "-v", env["evil"], *extra],
            ["-o", out],
        )
        assert result.exit_code == 0, result.output
    at_best, at_two = _read(outs[0]), _read(outs[1])
    result = _invoke(
        ["monitor", "-m", env["model"], "-p", env["prompts"], "-v", f"{env['evil']}@2"],
        ["-o", outs[0]],
    )
    assert result.exit_code == 0
    assert _read(outs[0]) == at_two
    assert at_best[0]["projections"]["evil"] != at_two[0]["projections"]["evil"]


# --- bad input ----------------------------------------------------------------------------------
def _bad_cases(env: dict[str, Path], tmp_path: Path) -> list[tuple[list[Any], type, str]]:
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "hello"}\n{"prompt": oops}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    m, p = ["-m", env["model"]], ["-p", env["prompts"]]
    gen = ["generate", *m]
    return [
        ([*gen, *p, "--steer", f"{env['humorous']}:abc"], InputError, "not a number"),
        ([*gen, *p, "--steer", f"{tmp_path}/none.safetensors:1"], VectorError, "no vector file"),
        ([*gen, *p, "--steer", f"{env['humorous']}:1@9"], LayerError, "out of range 1..4"),
        ([*gen, *p, "--steer", f"{env['humorous']}:1@0"], LayerError, "out of range 1..4"),
        ([*gen, *p, "--steer", f"{env['nobest']}:1"], LayerError, "no best_layer"),
        ([*gen, *p, "--monitor", f"{env['humorous']}@5"], LayerError, "out of range 0..4"),
        ([*gen, *p, "--monitor", f"{env['humorous']}@all"], LayerError, "one layer"),
        ([*gen, "-p", bad_json], InputError, "bad.jsonl:2: not valid JSON"),
        ([*gen, "-p", empty], InputError, "holds no prompts"),
        ([*gen, "-p", tmp_path / "none.jsonl"], InputError, "no prompt file"),
        (["generate", "-m", "no-such-model-xyz", *p], ModelSpecError, "no-such-model-xyz"),
        ([*gen, *p, "--steer", f"{env['other_model']}:1"], VectorMismatchError, "fingerprint"),
        ([*gen, *p, "--monitor", env["other_width"]], VectorMismatchError, "hidden size"),
        ([*gen, *p, "--temperature", -1], InputError, "temperature"),
        (["monitor", *m, *p, "-v", env["evil"], "--token-projections"], InputError, "--generate"),
        (["monitor", *m, *p, "-v", env["evil"], "--layer", 7], LayerError, "out of range"),
        (["monitor", *m, *p, "-v", env["other_model"]], VectorMismatchError, "other"),
    ]


def test_bad_input_raises_user_errors_and_writes_nothing(
    env: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    for args, error, needle in _bad_cases(env, tmp_path):
        result = _invoke([*args, "-o", out])
        assert isinstance(result.exception, error), (args, result.exception, result.output)
        assert needle in str(result.exception), (args, str(result.exception))
        assert not out.exists(), args


def test_subprocess_bad_input_is_one_line_exit_2(env: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_text('{"prompt": "hello"}\n')
    cases = [
        ["generate", "-p", "p.jsonl", "--steer", "h.safetensors:abc", "-o", "out.jsonl"],
        ["generate", "-p", "p.jsonl", "--steer", "h.safetensors:1", "-o", "out.jsonl"],
        ["monitor", "-p", "p.jsonl", "-v", "h.safetensors", "-o", "out.jsonl"],
    ]
    for args in cases:
        proc = persona(*args, cwd=tmp_path, timeout=120)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, proc.stderr
        assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
        assert "Traceback" not in proc.stderr and proc.stdout == ""
        assert not (tmp_path / "out.jsonl").exists()


def test_help_has_examples() -> None:
    for command in ("generate", "monitor", "export", "import"):
        result = _invoke([command, "--help"])
        assert result.exit_code == 0 and "Examples" in result.output, command


# --- embedded model -----------------------------------------------------------------------------
@pytest.mark.embedded
def test_generate_embedded_two_steers_and_monitor(
    embedded_model: LoadedModel, tmp_path: Path
) -> None:
    lm = embedded_model
    fingerprint = model_fingerprint(lm.model, lm.tokenizer)
    gen = torch.Generator().manual_seed(0)
    paths = {}
    for name in ("humorous", "hallucinating"):
        rows = torch.randn(31, 576, generator=gen)
        rows = 4 * rows / rows.norm(dim=-1, keepdim=True)
        meta = {"best_layer": "15", "model_fingerprint": fingerprint, "model": "embedded"}
        paths[name] = PersonaVector(rows, name, meta).save(tmp_path / f"{name}.safetensors")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Tell me a joke."}\n{"prompt": "What is 2 + 2?", "n": 4}\n')
    base, out = tmp_path / "base.jsonl", tmp_path / "out.jsonl"
    result = _invoke(
        ["monitor", "-p", prompts, "-v", paths["humorous"], "-v", paths["hallucinating"]],
        ["-o", base],
    )
    assert result.exit_code == 0, result.output
    result = _invoke(
        ["generate", "-p", prompts, "--steer", f"{paths['humorous']}:2"],
        ["--steer", f"{paths['hallucinating']}:-2", "--monitor", paths["humorous"]],
        ["--max-new-tokens", 6, "--token-projections", "-o", out],
    )
    assert result.exit_code == 0, result.output
    rows, base_rows = _read(out), _read(base)
    assert rows[1]["n"] == 4
    h = PersonaVector.load(paths["humorous"]).at(15)
    e = PersonaVector.load(paths["hallucinating"]).at(15)
    expected = float((2 * h - 2 * e) @ (h / h.norm()))
    for row, b in zip(rows, base_rows, strict=True):
        assert row["response"].strip()
        assert 1 <= len(row["tokens"]) <= 6
        delta = row["prompt_projections"]["humorous"] - b["prompt_projections"]["humorous"]
        assert delta == pytest.approx(expected, rel=2e-2, abs=2e-2)
        assert math.isfinite(row["projections"]["humorous"])
