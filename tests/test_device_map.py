"""Models loaded with a ``device_map``: steering and capture follow each block's device.

On a CPU the map puts every module on ``cpu`` (the loading and device-following code still
runs); with a GPU (marker ``cuda``, run by ``benchmarks/gpu.sh``) the model is split over
``cuda:0`` and ``cpu`` and must give what an unsplit model gives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from persona_lens.core.capture import Monitor, capture_sequences
from persona_lens.core.generation import Generation, generate
from persona_lens.core.models import LoadedModel, load_model
from persona_lens.core.steering import SteeringSpec
from persona_lens.core.vectors import PersonaVector
from tests.tiny import tiny_model_dir

pytest.importorskip("accelerate")

PROMPTS = ["hello world", "world hello hello", "hello"]
NUM_LAYERS = 4


def _device_map(first: str | int, second: str | int) -> dict[str, Any]:
    """Embeddings and blocks 1-2 on ``first``; blocks 3-4, the norm and the head on ``second``."""
    return {
        "model.embed_tokens": first,
        "model.rotary_emb": first,
        "model.layers.0": first,
        "model.layers.1": first,
        "model.layers.2": second,
        "model.layers.3": second,
        "model.norm": second,
        "lm_head": second,
    }


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("split"), seed=11, num_layers=NUM_LAYERS)


def _run(loaded: LoadedModel) -> tuple[list[Generation], list[Any]]:
    layout = loaded.layout
    rows = torch.randn(
        layout.num_layers + 1, layout.hidden_size, generator=torch.Generator().manual_seed(4)
    )
    vector = PersonaVector(3 * rows, "noise")
    monitor = Monitor("m", rows[3], 3)
    steering = [SteeringSpec(vector, [1.0, -1.0, 0.5], 3), SteeringSpec(vector, 0.5, 1)]
    generations = generate(
        loaded.model,
        loaded.tokenizer,
        PROMPTS,
        max_new_tokens=5,
        capture_layers=None,
        monitors=[monitor],
        steering=steering,
        layout=layout,
    )
    tok = loaded.tokenizer
    prompt_ids = [tok(g.prompt_text, add_special_tokens=False)["input_ids"] for g in generations]
    captured = capture_sequences(
        loaded.model,
        prompt_ids,
        [g.response_ids for g in generations],
        pad_token_id=int(tok.pad_token_id),
        layout=layout,
        monitors=[monitor],
    )
    return generations, captured


def _compare(got: tuple[list[Generation], list[Any]], expected: Any, tol: float) -> None:
    (gens, caps), (ref_gens, ref_caps) = got, expected
    assert [g.response_ids for g in gens] == [g.response_ids for g in ref_gens]
    for g, r in zip(gens, ref_gens, strict=True):
        for key in ("prompt_last", "prompt_mean", "response_mean"):
            torch.testing.assert_close(getattr(g, key), getattr(r, key), rtol=tol, atol=tol)
        torch.testing.assert_close(
            torch.tensor(g.token_projections["m"]),
            torch.tensor(r.token_projections["m"]),
            rtol=tol,
            atol=tol,
        )
    for c, r in zip(caps, ref_caps, strict=True):
        torch.testing.assert_close(c.response_mean, r.response_mean, rtol=tol, atol=tol)


def test_explicit_device_map_on_cpu(model_dir: Path) -> None:
    plain = load_model(str(model_dir), device="cpu")
    mapped = load_model(str(model_dir), device_map=_device_map("cpu", "cpu"))
    assert mapped.device == torch.device("cpu")
    assert {p.device.type for p in mapped.model.parameters()} == {"cpu"}
    _compare(_run(mapped), _run(plain), 1e-5)


def test_device_and_device_map_together_is_refused(model_dir: Path) -> None:
    from persona_lens.core.errors import InputError

    with pytest.raises(InputError, match="device_map"):
        load_model(str(model_dir), device="cpu", device_map="auto")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_split_over_cuda_and_cpu_equals_unsplit(model_dir: Path) -> None:
    """Blocks 1-2 on cuda:0, blocks 3-4 and the head on the CPU, float32: capture (prompt,
    response, projections, forward mode) and steering (scalar and per-row) equal an unsplit
    model on cuda:0."""
    whole = load_model(str(model_dir), device="cuda", dtype="fp32")
    split = load_model(str(model_dir), dtype="fp32", device_map=_device_map(0, "cpu"))
    devices = {p.device.type for p in split.model.parameters()}
    assert devices == {"cuda", "cpu"}, devices
    assert split.device.type == "cuda"
    _compare(_run(split), _run(whole), 1e-4)
