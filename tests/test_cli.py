"""The `persona` command line: info, demo, and the one-line error contract."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from persona_lens.cli import app
from tests.cli_run import persona
from tests.tiny import tiny_model_dir

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"), seed=0, num_layers=3)


def test_info_json(tiny_dir: Path) -> None:
    result = runner.invoke(app, ["info", str(tiny_dir), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["family"] == "llama" and info["num_layers"] == 3 and info["hidden_size"] == 64
    assert info["block_path"] == "model.layers" and info["layout"] == "AAA"
    assert info["batching"].startswith("padded: ")  # a llama decodes exactly when left-padded


def test_info_bad_block_path(tiny_dir: Path) -> None:
    result = runner.invoke(app, ["info", str(tiny_dir), "--block-path", "model.nope"])
    assert result.exit_code != 0


def _persona(*args: str) -> subprocess.CompletedProcess[str]:
    return persona(*args, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize(
    "args",
    [
        ["info", "/definitely/not/a/model"],
        ["info", "not a model id!!"],
        ["demo", "--trait", "no-such-trait", "--model", "/nowhere"],
    ],
)
def test_user_errors_are_one_line_exit_2(args: list[str]) -> None:
    result = _persona(*args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr


def test_help_has_examples() -> None:
    for command in ("info", "demo", "extract"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "Examples" in result.stdout, command


@pytest.mark.embedded
def test_demo_runs(tmp_path: Path) -> None:
    out = tmp_path / "demo.safetensors"
    result = runner.invoke(
        app, ["demo", "--questions", "2", "--max-new-tokens", "12", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(out)
    assert out.is_file()


def test_help_uses_conventional_metavars() -> None:
    """TEXT/INTEGER/PATH as click prints them, nothing after a flag; never <str> or <bool>."""
    commands = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    assert {"generate", "extract", "chat"} <= set(commands)
    for command in commands:
        result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, command
        for bad in ("<bool>", "<str>", "<int", "<float", "<path>", "list["):
            assert bad not in result.output, (command, bad)
    generate_help = runner.invoke(app, ["generate", "--help"], env={"COLUMNS": "200"}).output
    assert re.search(r"--max-new-tokens\s+INTEGER", generate_help)
    assert re.search(r"--token-projections\s+Add per-token", generate_help)
