"""Block diffusion through the library's API: ``generate``, operators at every denoising step,
end-of-sequence handling, the decoder stream, and chat (a tiny random DiffusionGemma)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn

from persona_lens.core.architecture import BlockLayout, find_blocks
from persona_lens.core.capture import Monitor, capture_forward
from persona_lens.core.diffusion.capture import DiffusionCapture
from persona_lens.core.diffusion.generation import DiffusionGeneration
from persona_lens.core.diffusion.steering import DiffusionSteeringHandle
from persona_lens.core.errors import InputError
from persona_lens.core.generation import Generation, generate, render_chat
from persona_lens.core.models import LoadedModel, prepare_tokenizer
from persona_lens.core.steering import SteeringSpec, steer
from persona_lens.core.vectors import PersonaVector
from tests import zoo
from tests.tiny import tiny_tokenizer

PROMPTS = ["hello w10 w20 w30", "world w40"]
LAYER = 2


@pytest.fixture(scope="module")
def subject() -> tuple[nn.Module, Any, BlockLayout]:
    model = zoo.build("diffusion_gemma")
    tokenizer = prepare_tokenizer(tiny_tokenizer(zoo.VOCAB_SIZE))
    return model, tokenizer, find_blocks(model)


def _vector(layout: BlockLayout, scale: float = 4.0) -> PersonaVector:
    generator = torch.Generator().manual_seed(5)
    rows = torch.randn(layout.num_layers + 1, layout.hidden_size, generator=generator)
    return PersonaVector(scale * rows, "random", {"best_layer": str(LAYER)})


def _monitor(layout: BlockLayout) -> Monitor:
    return Monitor("random", _vector(layout).at(LAYER), LAYER)


def _run(subject: tuple[nn.Module, Any, BlockLayout], **kwargs: Any) -> list[Generation]:
    model, tokenizer, layout = subject
    kwargs.setdefault("layout", layout)
    kwargs.setdefault("max_new_tokens", 16)
    return generate(model, tokenizer, PROMPTS, **kwargs)


@contextmanager
def _end_tokens(model: nn.Module, ids: list[int]) -> Iterator[None]:
    """Make many tokens end a response, so that rows end inside a canvas."""
    config = model.generation_config
    saved = config.eos_token_id
    config.eos_token_id = ids
    try:
        yield
    finally:
        config.eos_token_id = saved


def test_generate_reproducible_and_captured(subject: tuple[nn.Module, Any, BlockLayout]) -> None:
    """Without sampling options the sampler runs on seed 0: the same call gives the same
    text; results carry activations, per-token and per-denoising-step projections."""
    monitor = _monitor(subject[2])
    first = _run(subject, monitors=[monitor], capture_layers=None)
    again = _run(subject, monitors=[monitor])
    assert [g.response_ids for g in first] == [g.response_ids for g in again]
    other_seed = _run(subject, seed=3)
    assert [g.response_ids for g in other_seed] != [g.response_ids for g in first]
    steps = subject[0].generation_config.max_denoising_steps
    for g in first:
        assert isinstance(g, DiffusionGeneration)
        assert g.response_mean is not None and g.response_mean.shape == (5, 64)
        assert len(g.token_projections["random"]) == len(g.response_ids) == 16
        series = g.denoising_projections["random"]
        assert len(series) == 2 and all(len(s) == steps for s in series)


def test_end_of_sequence_inside_a_canvas(subject: tuple[nn.Module, Any, BlockLayout]) -> None:
    """Rows that end mid-canvas: only tokens before the end token are response tokens, in
    the text and in every capture, which still equals one encoder forward over them."""
    model, tokenizer, layout = subject
    monitor = _monitor(layout)
    with _end_tokens(model, list(range(3, 40))):
        results = _run(subject, monitors=[monitor], capture_layers=None, max_new_tokens=12)
    assert any(len(g.response_ids) < 12 for g in results)
    for g in results:
        assert len(g.response_ids) <= 12
        assert len(g.token_projections["random"]) == len(g.response_ids)
        assert len(g.denoising_projections["random"]) == -(-max(len(g.response_ids), 1) // 8)
        if not g.response_ids:
            continue
        prompt = tokenizer(g.prompt_text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + g.response_ids])
        response = torch.zeros_like(ids, dtype=torch.bool)
        response[0, len(prompt) :] = True
        reference = capture_forward(model, ids, torch.ones_like(ids), response, monitors=[monitor])
        assert reference.response_mean is not None and g.response_mean is not None
        torch.testing.assert_close(
            reference.response_mean[0], g.response_mean, rtol=1e-4, atol=1e-4
        )
        torch.testing.assert_close(
            torch.tensor(reference.token_projections["random"][0]),
            torch.tensor(g.token_projections["random"]),
            rtol=1e-4,
            atol=1e-4,
        )


def test_commit_masks_response_tokens(subject: tuple[nn.Module, Any, BlockLayout]) -> None:
    model, _, layout = subject
    capture = DiffusionCapture(model, layout, eos_token_ids=[2], stream="decoder")
    capture.begin(max_response_tokens=10)
    capture.commit(torch.tensor([[5, 6, 2, 7], [5, 6, 7, 8], [2, 5, 5, 5]]))
    capture.commit(torch.tensor([[5, 5, 5, 5], [5, 2, 7, 8], [5, 5, 5, 5]]))
    capture.commit(torch.tensor([[5, 5, 5, 5], [5, 5, 5, 5], [5, 5, 5, 5]]))
    assert capture.result().response_counts.tolist() == [2, 5, 0]


def test_sampling_options_that_do_not_apply(subject: tuple[nn.Module, Any, BlockLayout]) -> None:
    with pytest.raises(InputError, match="temperature"):
        _run(subject, do_sample=True, temperature=0.5)
    with pytest.raises(InputError, match="top_p"):
        _run(subject, top_p=0.9)


def test_decoder_stream(subject: tuple[nn.Module, Any, BlockLayout]) -> None:
    """Reading the decoder: the same text (steering-free hooks change nothing), other
    activations, and the encoder's prompt statistics."""
    model, _, layout = subject
    decoder = find_blocks(model, layout.stream("decoder").path)
    assert decoder.stream().name == "decoder" and decoder.blocks != layout.blocks
    on_encoder = _run(subject, capture_layers=None)
    on_decoder = _run(subject, capture_layers=None, layout=decoder)
    for e, d in zip(on_encoder, on_decoder, strict=True):
        assert e.response_ids == d.response_ids
        assert e.prompt_last is not None and d.prompt_last is not None
        torch.testing.assert_close(e.prompt_last, d.prompt_last)
        assert e.response_mean is not None and d.response_mean is not None
        assert torch.isfinite(d.response_mean).all()
        assert not torch.allclose(e.response_mean[1:], d.response_mean[1:])


def test_ablate_and_cap_at_every_denoising_step(
    subject: tuple[nn.Module, Any, BlockLayout],
) -> None:
    """Each operator acts at every denoising step on the canvas positions and on the
    committed canvases: the projection read after it, at its layer, is 0 (ablate) or inside
    the range (cap) at every step; the prompt (positions "generated") is left alone."""
    _, _, layout = subject
    vector, monitor = _vector(layout), _monitor(layout)
    plain = _run(subject, monitors=[monitor])
    specs = {
        "ablate": SteeringSpec(vector, 1.0, LAYER, positions="generated", operator="ablate"),
        "cap": SteeringSpec(
            vector, 1.0, LAYER, positions="generated", operator="cap", cap_range=(-0.05, 0.05)
        ),
    }
    for name, spec in specs.items():
        steered = _run(subject, monitors=[monitor], steering=[spec])
        bound = 1e-5 if name == "ablate" else 0.05 + 1e-5
        for g, p in zip(steered, plain, strict=True):
            steps = [v for canvas in g.denoising_projections["random"] for v in canvas]
            assert steps and max(abs(v) for v in steps) <= bound, name
            assert max(abs(v) for v in g.token_projections["random"]) <= bound, name
            assert g.prompt_projections["random"] == p.prompt_projections["random"]
        assert max(abs(v) for g in plain for v in g.token_projections["random"]) > 0.1


def test_all_layers_on_both_streams(subject: tuple[nn.Module, Any, BlockLayout]) -> None:
    """``layers="all"``: the layer-incremental vectors at every block of both streams, and a
    handle reused for two calls steers both alike (the phase comes from the cache)."""
    model, _, layout = subject
    vector = _vector(layout, scale=1.0)
    with steer(model, SteeringSpec(vector, 2.0, "all")) as handle:
        assert isinstance(handle, DiffusionSteeringHandle)
        assert sorted(handle.plan) == list(range(1, layout.num_layers + 1))
        for layer, ops in handle.plan.items():
            expected = 2.0 * (vector.at(layer) - vector.at(layer - 1))
            torch.testing.assert_close(ops[0].direction, expected)
        assert len(handle._handles) == 2 * layout.num_layers
        torch.manual_seed(0)
        ids = torch.tensor([[5, 6, 7, 8]])
        first = model.generate(input_ids=ids, max_new_tokens=8, eos_token_id=None)
        torch.manual_seed(0)
        second = model.generate(input_ids=ids, max_new_tokens=8, eos_token_id=None)
    assert torch.equal(first.sequences, second.sequences)
    torch.manual_seed(0)
    plain = model.generate(input_ids=ids, max_new_tokens=8, eos_token_id=None)
    assert not torch.equal(first.sequences, plain.sequences)


def test_chat_on_diffusion(subject: tuple[nn.Module, Any, BlockLayout], tmp_path: Any) -> None:
    """A chat turn with a steering vector and a meter works; a guard is refused in one line."""
    from persona_lens.monitoring.chat import ChatSession

    model, tokenizer, layout = subject
    loaded = LoadedModel(
        model, tokenizer, "zoo:diffusion_gemma", torch.device("cpu"), torch.float32
    )
    vector = _vector(layout)
    vector.metadata["model_fingerprint"] = loaded.fingerprint
    path = vector.save(tmp_path / "random.safetensors")
    session = ChatSession.from_loaded(loaded, max_new_tokens=8, vector_dir=tmp_path)
    session.monitor(str(path))
    session.steer(str(path), 1.0)
    turn = session.send("hello w10")
    assert isinstance(turn.reply, str) and "random" in turn.projections
    with pytest.raises(InputError, match="guards do not apply"):
        session.guard(str(path), 1.0)
    text = render_chat(tokenizer, session.messages())
    assert "hello" in text
