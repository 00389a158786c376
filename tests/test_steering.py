"""Steering semantics on a tiny Llama: operators, positions, per-row coefficients, errors."""

from __future__ import annotations

import pytest
import torch

from persona_lens.core.architecture import block_hidden, find_blocks
from persona_lens.core.capture import Monitor, capture_forward
from persona_lens.core.errors import InputError, LayerError, VectorMismatchError
from persona_lens.core.steering import SteeringSpec, compile_specs, steer
from persona_lens.core.vectors import PersonaVector
from tests import zoo

LAYER = 2


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return zoo.build("llama")


@pytest.fixture(scope="module")
def vector(model: torch.nn.Module) -> PersonaVector:
    layout = find_blocks(model)
    rows = torch.randn(
        layout.num_layers + 1, layout.hidden_size, generator=torch.Generator().manual_seed(5)
    )
    return PersonaVector(rows * 3, "trait", {"best_layer": str(LAYER)})


def _ids(rows: int = 2, length: int = 8) -> torch.Tensor:
    return torch.randint(
        3, zoo.VOCAB_SIZE, (rows, length), generator=torch.Generator().manual_seed(0)
    )


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_default_layer_is_best_layer(model: torch.nn.Module, vector: PersonaVector) -> None:
    plan = compile_specs([SteeringSpec(vector, 2.0)], find_blocks(model))
    assert list(plan) == [LAYER]
    assert torch.allclose(plan[LAYER][0].direction, 2.0 * vector.vectors[LAYER])


def test_all_layers_adds_incremental_vectors(model: torch.nn.Module, vector: PersonaVector) -> None:
    layout = find_blocks(model)
    plan = compile_specs([SteeringSpec(vector, 1.5, "all")], layout)
    assert sorted(plan) == list(range(1, layout.num_layers + 1))
    total = torch.zeros(layout.hidden_size)
    for layer in range(1, layout.num_layers + 1):
        total = total + plan[layer][0].direction
        expected = 1.5 * (vector.vectors[layer] - vector.vectors[0])
        torch.testing.assert_close(total, expected)


def test_two_adds_equal_their_sum(model: torch.nn.Module, vector: PersonaVector) -> None:
    ids = _ids()
    other = PersonaVector(vector.vectors.flip(0), "other")
    with steer(model, [SteeringSpec(vector, 1.0, LAYER), SteeringSpec(other, 0.5, LAYER)]):
        both = _logits(model, ids)
    summed = PersonaVector(vector.vectors + 0.5 * other.vectors, "sum")
    with steer(model, SteeringSpec(summed, 1.0, LAYER)):
        single = _logits(model, ids)
    torch.testing.assert_close(both, single)


def test_generated_positions_leave_prompt_untouched(
    model: torch.nn.Module, vector: PersonaVector
) -> None:
    ids = _ids()
    plain = _logits(model, ids)
    with steer(model, SteeringSpec(vector, 2.0, LAYER, positions="generated")) as handle:
        handle.reset_positions(prompt_length=5)
        generated = _logits(model, ids)
    with steer(model, SteeringSpec(vector, 2.0, LAYER, positions="prompt")) as handle:
        handle.reset_positions(prompt_length=5)
        prompt_only = _logits(model, ids)
    assert torch.equal(plain[:, :5], generated[:, :5])
    assert not torch.allclose(plain[:, 5:], generated[:, 5:])
    assert not torch.allclose(plain[:, :5], prompt_only[:, :5])


def test_per_row_coefficients(model: torch.nn.Module, vector: PersonaVector) -> None:
    ids = _ids(1).repeat(3, 1)
    plain = _logits(model, ids)
    with steer(model, SteeringSpec(vector, [0.0, 2.0, -1.0], LAYER)):
        mixed = _logits(model, ids)
    with steer(model, SteeringSpec(vector, 2.0, LAYER)):
        scalar = _logits(model, ids)
    torch.testing.assert_close(mixed[0], plain[0])
    torch.testing.assert_close(mixed[1], scalar[1])
    assert not torch.allclose(mixed[2], plain[2])
    with steer(model, SteeringSpec(vector, [1.0, 2.0], LAYER)), pytest.raises(InputError):
        _logits(model, ids)


def _projections(model: torch.nn.Module, vector: PersonaVector, ids: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(ids)
    monitor = Monitor("trait", vector.at(LAYER), LAYER)
    result = capture_forward(model, ids, mask, mask.bool(), layers=[LAYER], monitors=[monitor])
    return torch.tensor(result.token_projections["trait"])


def test_ablate_projects_the_direction_out(model: torch.nn.Module, vector: PersonaVector) -> None:
    ids = _ids()
    assert _projections(model, vector, ids).abs().max() > 1e-2
    with steer(model, SteeringSpec(vector, 1.0, LAYER, operator="ablate")):
        projections = _projections(model, vector, ids)
    assert projections.abs().max() < 1e-4


def test_cap_clamps_projection(model: torch.nn.Module, vector: PersonaVector) -> None:
    ids = _ids()
    plain = _projections(model, vector, ids)
    low, high = float(plain.quantile(0.3)), float(plain.quantile(0.7))
    with steer(model, SteeringSpec(vector, 1.0, LAYER, operator="cap", cap_range=(low, high))):
        capped = _projections(model, vector, ids)
    assert capped.min() >= low - 1e-4 and capped.max() <= high + 1e-4
    inside = (plain >= low) & (plain <= high)
    torch.testing.assert_close(capped[inside], plain[inside], rtol=1e-4, atol=1e-4)


def _block_output(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The output of block LAYER as the rest of the model sees it (after any steering)."""
    seen: list[torch.Tensor] = []
    block = find_blocks(model).blocks[LAYER - 1]
    handle = block.register_forward_hook(lambda m, a, out: seen.append(block_hidden(out)))
    try:
        _logits(model, ids)
    finally:
        handle.remove()
    return seen[0]


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


@pytest.mark.parametrize("middle", ["ablate", "cap"])
def test_operators_apply_in_the_order_given(
    model: torch.nn.Module, vector: PersonaVector, middle: str
) -> None:
    """[add A, ablate A, add B] (or cap in the middle) at one block: B is added after the
    ablation, so its component along A survives; only runs of consecutive adds are merged."""
    ids = _ids()
    a = PersonaVector(vector.vectors, "a")
    b_rows = vector.vectors.flip(0) + 0.8 * vector.vectors  # a clear component along A
    b = PersonaVector(b_rows, "b")
    bounds = (-1.0, 1.0)
    specs = [
        SteeringSpec(a, 1.0, LAYER),
        SteeringSpec(a, 1.0, LAYER, operator=middle, cap_range=bounds),  # type: ignore[arg-type]
        SteeringSpec(b, 1.0, LAYER),
    ]
    plain = _block_output(model, ids)
    with steer(model, specs):
        got = _block_output(model, ids)
    va, vb, ua = vector.vectors[LAYER], b_rows[LAYER], _unit(vector.vectors[LAYER])
    h = plain + va
    projection = h @ ua
    if middle == "ablate":
        h = h - projection.unsqueeze(-1) * ua
    else:
        h = h + (projection.clamp(*bounds) - projection).unsqueeze(-1) * ua
    expected = h + vb
    along = float((got @ ua - expected @ ua).abs().max())
    assert along < 1e-4, f"component along A off by {along:.3g} (expected about {vb @ ua:.3g})"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_only_consecutive_adds_are_merged(model: torch.nn.Module, vector: PersonaVector) -> None:
    layout = find_blocks(model)
    a = PersonaVector(vector.vectors, "a")
    b = PersonaVector(vector.vectors.flip(0), "b")
    specs = [
        SteeringSpec(a, 1.0, LAYER),
        SteeringSpec(b, 0.5, LAYER),
        SteeringSpec(a, 1.0, LAYER, operator="ablate"),
        SteeringSpec(b, 2.0, LAYER),
        SteeringSpec(a, -1.0, LAYER),
    ]
    ops = compile_specs(specs, layout)[LAYER]
    assert [op.operator for op in ops] == ["add", "ablate", "add"]
    torch.testing.assert_close(ops[0].direction, a.vectors[LAYER] + 0.5 * b.vectors[LAYER])
    torch.testing.assert_close(ops[2].direction, 2.0 * b.vectors[LAYER] - a.vectors[LAYER])


def test_bad_specs_fail_before_hooking(model: torch.nn.Module, vector: PersonaVector) -> None:
    layout = find_blocks(model)
    with pytest.raises(LayerError, match=r"1\.\.4"):
        steer(model, SteeringSpec(vector, 1.0, 0))
    with pytest.raises(LayerError, match=r"1\.\.4"):
        steer(model, SteeringSpec(vector, 1.0, layout.num_layers + 1))
    with pytest.raises(LayerError, match="best_layer"):
        steer(model, SteeringSpec(PersonaVector(vector.vectors, "x"), 1.0))
    with pytest.raises(InputError, match="finite"):
        steer(model, SteeringSpec(vector, float("nan"), 1))
    with pytest.raises(InputError, match="cap_range"):
        steer(model, SteeringSpec(vector, 1.0, 1, operator="cap"))
    with pytest.raises(InputError, match="operator"):
        steer(model, SteeringSpec(vector, 1.0, 1, operator="rotate"))  # type: ignore[arg-type]
    wrong = PersonaVector(torch.ones(3, layout.hidden_size), "wrong", {"model": "other-model"})
    with pytest.raises(VectorMismatchError, match="other-model"):
        steer(model, SteeringSpec(wrong, 1.0, 1))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
