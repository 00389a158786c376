"""The family matrix for block-diffusion models (tiny random DiffusionGemma).

The checks of ``tests/test_families.py``, in what they mean for a model that writes a canvas of
tokens at a time (its encoder commits canvases into a KV cache, its decoder denoises the next
one over several steps), plus two checks of generated text: steering changes it, and a row
steered with coefficient 0 in a per-row batch equals an unsteered run. Generation always
samples here (the model has no greedy mode), so every run is seeded.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from persona_lens.core.architecture import BlockLayout, find_blocks
from persona_lens.core.capture import Monitor, capture_forward
from persona_lens.core.diffusion.capture import DiffusionCapture
from persona_lens.core.diffusion.generation import encode_last_canvas
from persona_lens.core.steering import SteeringSpec, steer
from persona_lens.core.vectors import PersonaVector
from tests import zoo
from tests.matrix import assert_generation_capture_equals_forward
from tests.model_hooks import hook_ids

PROMPT_LEN = 7
NEW_TOKENS = 16  # two canvases of 8
SEED = 11
NAMES = [name for name, entry in zoo.ZOO.items() if entry.generation == "block-diffusion"]


@pytest.fixture(scope="module", params=NAMES)
def family(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    model = zoo.build(request.param)
    ids, mask = _batch()
    _generate(model, ids, mask)  # first-call set-up inside transformers, outside any test
    with torch.no_grad():  # transformers adds its own recording hooks on first use; let it
        model(input_ids=ids, decoder_input_ids=_canvas(model), output_hidden_states=True)
        model.get_encoder()(input_ids=ids, output_hidden_states=True)
    return request.param, model


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts, row 0 left-padded."""
    ids = torch.randint(
        3, zoo.VOCAB_SIZE, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(1)
    )
    mask = torch.ones_like(ids)
    ids[0, 0], mask[0, 0] = zoo.PAD_ID, 0
    return ids, mask


def _generate(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, seed: int = SEED) -> Any:
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=NEW_TOKENS,
            pad_token_id=zoo.PAD_ID,
            eos_token_id=None,
            return_dict_in_generate=True,
        )


@pytest.fixture(scope="module")
def plain(family: tuple[str, nn.Module]) -> torch.Tensor:
    """The unsteered sequences of :func:`_batch` with seed ``SEED``."""
    return _generate(family[1], *_batch()).sequences


def _vector(layout: BlockLayout, scale: float = 4.0, seed: int = 2) -> PersonaVector:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(layout.num_layers + 1, layout.hidden_size, generator=generator)
    return PersonaVector(rows * scale, "random")


@pytest.fixture(autouse=True)
def _no_hooks_left(family: tuple[str, nn.Module]) -> Any:
    before = hook_ids(family[1])
    yield
    assert hook_ids(family[1]) == before, "hooks left on the model"


def _canvas(model: nn.Module) -> torch.Tensor:
    width = model.config.canvas_length
    return torch.randint(3, zoo.VOCAB_SIZE, (2, width), generator=torch.Generator().manual_seed(4))


def _both_streams(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> Any:
    """One forward over a prompt and a canvas: every layer position of the encoder (prompt
    mean) and the decoder (canvas mean), and the decoder's hidden-state reference."""
    layout = find_blocks(model)
    capture = DiffusionCapture(model, layout, stream="decoder", denoising=False)
    capture.begin(prompt_mask=mask)
    canvas = _canvas(model)
    with capture, torch.no_grad():
        out = model(
            input_ids=ids, attention_mask=mask, decoder_input_ids=canvas, output_hidden_states=True
        )
        capture.commit(canvas)
    return capture.result(), out


def test_blocks_found(family: tuple[str, nn.Module]) -> None:
    _, model = family
    layout = find_blocks(model)
    info = layout.describe()
    assert layout.is_block_diffusion and layout.canvas_length == model.config.canvas_length
    assert set(info["streams"]) == {"encoder", "decoder"} and info["read_stream"] == "encoder"
    assert {len(s.blocks) for s in layout.streams} == {zoo.NUM_LAYERS}
    assert layout.stream("encoder").module is model.get_encoder()
    decoder_path = info["streams"]["decoder"]["block_path"]
    assert find_blocks(model, decoder_path).stream().name == "decoder"
    assert find_blocks(model).stream().name == "encoder"  # picking a stream is not sticky


def test_capture_equals_reference_forward(family: tuple[str, nn.Module]) -> None:
    """Encoder (prompt) and decoder (canvas) block outputs equal the hidden states
    transformers records (entries 0..L-1; its last entry is after the final norm)."""
    name, model = family
    ids, mask = _batch()
    captured, out = _both_streams(model, ids, mask)
    with torch.no_grad():
        encoder = model.get_encoder()(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    forward = capture_forward(model, ids, mask, mask.bool())  # the encoder over given tokens
    assert captured.response_mean is not None and forward.response_mean is not None
    assert captured.prompt_mean is not None
    weights = mask.float() / mask.sum(1, keepdim=True)
    for index in range(zoo.NUM_LAYERS):
        expected = torch.einsum("bt,btd->bd", weights, encoder.hidden_states[index].float())
        torch.testing.assert_close(forward.response_mean[:, index], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(captured.prompt_mean[:, index], expected, rtol=1e-5, atol=1e-5)
        decoded = out.hidden_states[index].float().mean(dim=1)
        torch.testing.assert_close(
            captured.response_mean[:, index], decoded, rtol=1e-5, atol=1e-5, msg=f"{name} {index}"
        )


def test_zero_vector_is_exact_noop(family: tuple[str, nn.Module], plain: torch.Tensor) -> None:
    _, model = family
    layout = find_blocks(model)
    zero = PersonaVector(torch.zeros(layout.num_layers + 1, layout.hidden_size), "zero")
    with steer(model, SteeringSpec(zero, 3.0, "all")):
        steered = _generate(model, *_batch()).sequences
    assert torch.equal(plain, steered)


def test_steering_changes_only_later_layers(family: tuple[str, nn.Module]) -> None:
    _, model = family
    ids, mask = _batch()
    layout = find_blocks(model)
    layer = max(1, layout.num_layers // 2)
    vector = _vector(layout)
    base, _ = _both_streams(model, ids, mask)
    with steer(model, SteeringSpec(vector, 1.0, layer)):
        steered, _ = _both_streams(model, ids, mask)
    for key in ("prompt_mean", "response_mean"):  # the encoder's prompt, the decoder's canvas
        a, b = getattr(base, key), getattr(steered, key)
        assert torch.equal(a[:, :layer], b[:, :layer]), key
        for index in range(layer, layout.num_layers + 1):
            assert not torch.allclose(a[:, index], b[:, index]), f"{key} position {index}"


class _DecoderCalls:
    """Records every denoising step's inputs and output (a test-side hook on the decoder;
    ``generate`` calls the top model's ``forward`` directly, so hooks there never fire)."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: list[dict[str, Any]] = []
        self.handle = model.get_decoder().register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        logits = kwargs.get("self_conditioning_logits")
        self.calls.append(
            {
                "canvas": kwargs["decoder_input_ids"].clone(),
                "self_conditioning": None if logits is None else logits.clone(),
                "hidden": output.last_hidden_state.clone(),
            }
        )


@pytest.mark.parametrize("positions", ["all", "generated"])
def test_cached_steered_generation_equals_recomputation(
    family: tuple[str, nn.Module], positions: str
) -> None:
    """Every denoising step's decoder output under steering equals a recomputation from
    scratch: a
    fresh encoder pass over the prompt and the committed canvases (one pass for ``all``;
    prompt then canvas by canvas for ``generated``, whose steering covers committed canvases
    but not the prompt), then the decoder on the recorded canvas and self-conditioning."""
    name, model = family
    ids, mask = _batch()
    layout = find_blocks(model)
    width, steps = model.config.canvas_length, model.generation_config.max_denoising_steps
    spec = SteeringSpec(_vector(layout, scale=2.0), 1.0, 2, positions=positions)  # type: ignore[arg-type]
    recorder = _DecoderCalls(model)
    try:
        with steer(model, spec):
            sequences = _generate(model, ids, mask).sequences
    finally:
        recorder.handle.remove()
    assert len(recorder.calls) == steps * NEW_TOKENS // width  # no early stop in this model
    with steer(model, spec), torch.no_grad():
        for index, call in enumerate(recorder.calls):
            canvas = index // steps
            context = sequences[:, : PROMPT_LEN + canvas * width]
            context_mask = torch.cat([mask, torch.ones_like(context[:, PROMPT_LEN:])], dim=1)
            committed = context[:, PROMPT_LEN:].split(width, dim=1) if canvas else ()
            chunks = [context] if positions == "all" else [context[:, :PROMPT_LEN], *committed]
            cache = None
            for chunk in chunks:
                seen = 0 if cache is None else cache.get_seq_length()
                encoded = model.get_encoder()(
                    input_ids=chunk,
                    attention_mask=context_mask[:, : seen + chunk.shape[1]],
                    cache=cache,
                )
                cache = encoded.cache
            full_mask = torch.cat([context_mask, torch.ones_like(call["canvas"])], dim=1)
            hidden = model.model(
                decoder_input_ids=call["canvas"],
                self_conditioning_logits=call["self_conditioning"],
                decoder_attention_mask=full_mask.bool(),
                cache=cache,
            ).last_hidden_state
            torch.testing.assert_close(
                hidden, call["hidden"], rtol=1e-4, atol=1e-4, msg=f"{name} step {index}"
            )


def test_hooks_removed_after_exception(family: tuple[str, nn.Module]) -> None:
    """Steering and capture hooks are gone after an error in the middle of generating."""
    from persona_lens.core.generation import generate

    _, model = family
    layout = find_blocks(model)
    vector = _vector(layout)
    with pytest.raises(RuntimeError, match="boom"), steer(model, SteeringSpec(vector, 1.0, 1)):
        raise RuntimeError("boom")

    calls = []

    def fail_third_step(module: nn.Module, args: Any) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom in step 3")

    failing = model.get_decoder().register_forward_pre_hook(fail_third_step)
    monitor = Monitor("m", vector.at(2), 2)
    try:
        with pytest.raises(RuntimeError, match="boom in step 3"):
            generate(
                model,
                _Tokenizer(),
                ["a"],
                steering=[SteeringSpec(vector, 1.0, "all")],
                monitors=[monitor],
                layout=layout,
            )
    finally:
        failing.remove()
    assert len(calls) == 3


class _Tokenizer:
    """Just enough tokenizer for ``generate`` on the zoo's vocabulary (ids from characters)."""

    pad_token_id = zoo.PAD_ID
    eos_token_id = zoo.EOS_ID
    chat_template = None

    def __call__(self, texts: Any, **kwargs: Any) -> dict[str, Any]:
        rows = [texts] if isinstance(texts, str) else texts
        ids = [[3 + ord(c) % (zoo.VOCAB_SIZE - 3) for c in t] for t in rows]
        if isinstance(texts, str):
            return {"input_ids": ids[0]}
        width = max(len(r) for r in ids)
        padded = [[self.pad_token_id] * (width - len(r)) + r for r in ids]
        mask = [[0] * (width - len(r)) + [1] * len(r) for r in ids]
        return {"input_ids": torch.tensor(padded), "attention_mask": torch.tensor(mask)}

    def decode(self, ids: Any, **kwargs: Any) -> str:
        return " ".join(str(int(i)) for i in ids)


def test_capture_during_generation_equals_forward(family: tuple[str, nn.Module]) -> None:
    """Encoder capture while generating (committed canvases, plus the last one encoded once
    after generate) equals one encoder forward over prompt + response."""
    name, model = family
    ids, mask = _batch()
    layout = find_blocks(model)
    monitor = Monitor("m", _vector(layout).at(2), 2)
    capture = DiffusionCapture(model, layout, monitors=[monitor])
    capture.begin(prompt_mask=mask, max_response_tokens=NEW_TOKENS)
    with capture, torch.no_grad():
        out = _generate(model, ids, mask)
        encode_last_canvas(layout, out.sequences, out.cache, mask)
    during = capture.result()
    assert_generation_capture_equals_forward(
        model, layout, monitor, during, out.sequences, mask, PROMPT_LEN, NEW_TOKENS, name
    )
    series = during.denoising_projections["m"]
    steps = model.generation_config.max_denoising_steps
    assert [[len(s) for s in row] for row in series] == [[steps] * 2] * 2


def test_steering_changes_generated_tokens(
    family: tuple[str, nn.Module], plain: torch.Tensor
) -> None:
    _, model = family
    layout = find_blocks(model)
    with steer(model, SteeringSpec(_vector(layout), 1.0, 2, positions="generated")):
        steered = _generate(model, *_batch()).sequences
    assert torch.equal(steered[:, :PROMPT_LEN], plain[:, :PROMPT_LEN])
    assert (steered[:, PROMPT_LEN:] != plain[:, PROMPT_LEN:]).any(dim=1).all()


def test_per_row_coefficients(family: tuple[str, nn.Module], plain: torch.Tensor) -> None:
    """Row 0 steered with coefficient 0 equals the unsteered run; row 1 (coefficient 1) not."""
    _, model = family
    layout = find_blocks(model)
    with steer(model, SteeringSpec(_vector(layout), [0.0, 1.0], "all")):
        steered = _generate(model, *_batch()).sequences
    assert torch.equal(steered[0], plain[0])
    assert not torch.equal(steered[1], plain[1])
