"""Every zoo model builds from its config and runs a forward pass on CPU."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.zoo import CATEGORIES, NUM_LAYERS, VOCAB_SIZE, ZOO, ZooEntry, build

REQUIRED = {
    "llama": "dense",
    "qwen2": "dense",
    "gpt2": "dense",
    "mistral": "sliding-window",
    "gemma3": "sliding-window",
    "mixtral": "moe",
    "qwen3_moe": "moe",
    "olmoe": "moe",
    "gpt_oss": "moe",
    "deepseek_v3": "moe",
    "mamba": "ssm",
    "mamba2": "ssm",
    "falcon_mamba": "ssm",
    "jamba": "hybrid-inter",
    "bamba": "hybrid-inter",
    "zamba2": "hybrid-inter",
    "nemotron_h": "hybrid-inter",
    "granitemoehybrid": "hybrid-inter",
    "lfm2": "hybrid-inter",
    "qwen3_next": "hybrid-inter",
    "falcon_h1": "hybrid-intra",
    "minimax": "linear-attention",
    "rwkv": "linear-rnn",
    "recurrent_gemma": "linear-rnn",
    "deepseek_v32": "sparse-dynamic",
    "glm_moe_dsa": "sparse-dynamic",
    "diffusion_gemma": "diffusion",
}


def _params(entries: dict[str, ZooEntry]) -> list[Any]:
    marks = {
        name: [pytest.mark.xfail(reason=e.xfail, strict=True)] if e.xfail else []
        for name, e in entries.items()
    }
    return [pytest.param(name, id=name, marks=marks[name]) for name in entries]


def test_registry() -> None:
    for name, category in REQUIRED.items():
        assert ZOO[name].category == category
    for name, entry in ZOO.items():
        assert entry.name == name
        assert entry.category in CATEGORIES
    with pytest.raises(KeyError):
        build("no-such-model")


@pytest.mark.parametrize("name", _params(ZOO))
def test_forward(name: str) -> None:
    model = build(name)
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.get_text_config().num_hidden_layers == NUM_LAYERS
    input_ids = torch.randint(3, VOCAB_SIZE, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids, output_hidden_states=True)
    # a block-diffusion model returns the logits of the one canvas its decoder denoised
    length = getattr(model.config, "canvas_length", None) or 16
    assert out.logits.shape == (2, length, VOCAB_SIZE)
    assert torch.isfinite(out.logits).all()
    assert len(out.hidden_states) == NUM_LAYERS + 1


def test_build_is_seeded() -> None:
    state = torch.random.get_rng_state()
    a, b = build("llama"), build("llama")
    assert torch.equal(torch.random.get_rng_state(), state)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb
        assert torch.equal(va, vb)
