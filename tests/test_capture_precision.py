"""Capture accumulates in float32 whatever the model's dtype (bf16, fp16), also with large
activations: its reductions equal a float64 reduction of the very activations the model
computed in its own dtype (recorded by independent hooks). On CUDA too (marker ``cuda``)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from persona_lens.core.architecture import block_hidden, find_blocks
from persona_lens.core.capture import ActivationCapture, Monitor, capture_forward
from persona_lens.core.steering import SteeringSpec, steer
from persona_lens.core.vectors import PersonaVector
from tests import zoo

LENGTH = 96  # tokens; the last RESPONSE of them are the response in forward mode
RESPONSE = 90
NEW_TOKENS = 4
LAYERS = (1, 2, 4)

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ],
    ),
]
DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
# 0: the model's own activations (about 1); 1000: a constant 1000 added to every element of
# the residual stream at block 1, as in a model whose activations are large
SCALES = [pytest.param(0.0, id="normal"), pytest.param(1000.0, id="large")]


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    return zoo.build("llama")


def _model(base: nn.Module, device: str, dtype: torch.dtype) -> nn.Module:
    return copy.deepcopy(base).to(device=device, dtype=dtype)


@contextmanager
def _large(model: nn.Module, scale: float) -> Iterator[None]:
    """Add ``scale`` to every element of block 1's output (steering, so capture sees it)."""
    if scale == 0:
        yield
        return
    layout = find_blocks(model)
    rows = torch.zeros(layout.num_layers + 1, layout.hidden_size)
    rows[1] = scale
    with steer(model, SteeringSpec(PersonaVector(rows, "large"), 1.0, 1), layout=layout):
        yield


class _Recorder:
    """Independent forward hooks keeping every block output, as the model computed it."""

    def __init__(self, model: nn.Module) -> None:
        self.outputs: dict[int, list[torch.Tensor]] = {layer: [] for layer in LAYERS}
        blocks = find_blocks(model).blocks
        self.handles = [
            blocks[layer - 1].register_forward_hook(self._hook(layer)) for layer in LAYERS
        ]

    def _hook(self, layer: int):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: object, output: object) -> None:
            self.outputs[layer].append(block_hidden(output).detach().clone())

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def full(self, layer: int) -> torch.Tensor:
        """[B, T, d] float64: the prompt forward followed by one column per decoding step."""
        return torch.cat([t.double() for t in self.outputs[layer]], dim=1).cpu()


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected).abs().max() / expected.abs().max())


def _monitor(model: nn.Module) -> Monitor:
    d = find_blocks(model).hidden_size
    return Monitor("m", torch.randn(d, generator=torch.Generator().manual_seed(2)), 2)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_capture_forward_accumulates_in_float32(
    llama: nn.Module, device: str, dtype: torch.dtype, scale: float
) -> None:
    model = _model(llama, device, dtype)
    ids = torch.randint(3, zoo.VOCAB_SIZE, (2, LENGTH), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    response = torch.zeros_like(ids, dtype=torch.bool)
    response[:, -RESPONSE:] = True
    monitor = _monitor(model)
    recorder = _Recorder(model)
    try:
        with _large(model, scale):
            got = capture_forward(
                model,
                ids.to(device),
                mask.to(device),
                response.to(device),
                layers=LAYERS,
                monitors=[monitor],
            )
    finally:
        recorder.remove()
    assert got.response_mean is not None and got.prompt_mean is not None
    errors = {}
    for k, layer in enumerate(LAYERS):
        h = recorder.full(layer)
        errors[f"response_mean@{layer}"] = _relative(
            got.response_mean[:, k], h[:, -RESPONSE:].mean(1)
        )
        errors[f"prompt_mean@{layer}"] = _relative(got.prompt_mean[:, k], h[:, :-RESPONSE].mean(1))
    unit = monitor.unit().double()
    expected = recorder.full(monitor.layer)[:, -RESPONSE:] @ unit
    errors["projections"] = _relative(torch.tensor(got.token_projections["m"]), expected)
    worst = max(errors, key=lambda k: errors[k])
    assert errors[worst] < 1e-5, f"{worst}: relative error {errors[worst]:.3g} ({errors})"


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_capture_during_generation_accumulates_in_float32(
    llama: nn.Module, device: str, dtype: torch.dtype, scale: float
) -> None:
    model = _model(llama, device, dtype)
    ids = torch.randint(
        3, zoo.VOCAB_SIZE, (2, RESPONSE), generator=torch.Generator().manual_seed(1)
    )
    monitor = _monitor(model)
    capture = ActivationCapture(model, layers=LAYERS, monitors=[monitor])
    capture.begin(max_response_tokens=NEW_TOKENS)
    recorder = _Recorder(model)
    try:
        with _large(model, scale), capture, torch.no_grad():
            model.generate(
                input_ids=ids.to(device),
                attention_mask=torch.ones_like(ids).to(device),
                max_new_tokens=NEW_TOKENS + 1,
                do_sample=False,
                pad_token_id=zoo.PAD_ID,
                eos_token_id=None,
                use_cache=True,
            )
    finally:
        recorder.remove()
    got = capture.result()
    assert got.response_mean is not None and got.prompt_mean is not None
    errors = {}
    for k, layer in enumerate(LAYERS):
        h = recorder.full(layer)
        prompt, answer = h[:, :RESPONSE], h[:, RESPONSE : RESPONSE + NEW_TOKENS]
        errors[f"prompt_mean@{layer}"] = _relative(got.prompt_mean[:, k], prompt.mean(1))
        errors[f"prompt_last@{layer}"] = _relative(got.prompt_last[:, k], prompt[:, -1])  # type: ignore[index]
        errors[f"response_mean@{layer}"] = _relative(got.response_mean[:, k], answer.mean(1))
    h = recorder.full(monitor.layer) @ monitor.unit().double()
    errors["prompt_projection"] = _relative(got.prompt_projections["m"], h[:, RESPONSE - 1])
    errors["projections"] = _relative(
        torch.tensor(got.token_projections["m"]), h[:, RESPONSE : RESPONSE + NEW_TOKENS]
    )
    worst = max(errors, key=lambda k: errors[k])
    assert errors[worst] < 1e-5, f"{worst}: relative error {errors[worst]:.3g} ({errors})"
