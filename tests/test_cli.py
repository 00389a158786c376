"""The `persona` command line: info, demo, and the one-line error contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from persona_lens.cli import app
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


def test_info_bad_block_path(tiny_dir: Path) -> None:
    result = runner.invoke(app, ["info", str(tiny_dir), "--block-path", "model.nope"])
    assert result.exit_code != 0


def _persona(*args: str) -> subprocess.CompletedProcess[str]:
    code = "from persona_lens.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        check=False,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )


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
