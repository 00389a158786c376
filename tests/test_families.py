"""Capture and steering on every autoregressive family of the zoo (tiny random models).

Block-diffusion families run the same checks in ``tests/test_families_diffusion.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from persona_lens.core.architecture import find_blocks
from persona_lens.core.capture import (
    ActivationCapture,
    Monitor,
    capture_forward,
    padded_forward_kwargs,
)
from persona_lens.core.steering import SteeringSpec, steer
from persona_lens.core.vectors import PersonaVector
from tests import zoo
from tests.matrix import assert_generation_capture_equals_forward
from tests.model_hooks import hook_ids

PROMPT_LEN = 7
NEW_TOKENS = 5


def _params() -> list[object]:
    params = []
    for name, entry in zoo.ZOO.items():
        if entry.generation != "autoregressive":
            continue
        marks = [pytest.mark.xfail(reason=entry.xfail, strict=True)] if entry.xfail else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture(scope="module", params=_params())
def family(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    model = zoo.build(request.param)
    with torch.no_grad():  # transformers adds its own recording hooks on first use; let it
        model(input_ids=torch.ones(1, 2, dtype=torch.long) * 3, output_hidden_states=True)
    return request.param, model


def _batch(
    name: str | None = None, length: int | None = None, rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts (or ``rows``), row 0 left-padded - within what transformers decodes
    exactly for the family (see ``ZooEntry.decoding``) - of ``length`` tokens (default: the
    family's)."""
    entry = zoo.ZOO[name] if name else None
    decoding = entry.decoding if entry else "exact"
    length = length or (entry.prompt_length if entry else None) or PROMPT_LEN
    rows = rows or (1 if decoding == "batch-1" else 2)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, zoo.VOCAB_SIZE, (rows, length), generator=generator)
    mask = torch.ones_like(ids)
    if decoding == "exact":
        ids[0, 0], mask[0, 0] = zoo.PAD_ID, 0
    return ids, mask


def _random_vector(model: nn.Module, scale: float = 4.0, seed: int = 2) -> PersonaVector:
    layout = find_blocks(model)
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(layout.num_layers + 1, layout.hidden_size, generator=generator)
    return PersonaVector(rows * scale, "random")


@pytest.fixture(autouse=True)
def _no_hooks_left(family: tuple[str, nn.Module]) -> object:
    """Every test must leave the model with exactly the hooks it had before."""
    before = hook_ids(family[1])
    yield
    assert hook_ids(family[1]) == before, "hooks left on the model"


def _all_positions(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over all real tokens of every layer position, shape [B, L+1, d]."""
    result = capture_forward(model, ids, mask, mask.bool())
    assert result.response_mean is not None
    return result.response_mean


def test_blocks_found(family: tuple[str, nn.Module]) -> None:
    name, model = family
    layout = find_blocks(model)
    assert layout.num_layers == model.config.get_text_config().num_hidden_layers or name == "rwkv"
    assert layout.hidden_size > 0
    assert layout.describe()["layout"]


def _final_norm(model: nn.Module) -> nn.Module:
    """The final norm: the one norm module outside the blocks (found by name here, in the
    test, so that the reference shares nothing with persona-lens' block discovery)."""
    inside = {
        id(m)
        for module in model.modules()
        if isinstance(module, nn.ModuleList)
        for m in module.modules()
    }
    found = [
        module
        for name, module in model.named_modules()
        if id(module) not in inside
        and ("norm" in name.rsplit(".", 1)[-1].lower() or name.endswith(("ln_f", "ln_out")))
    ]
    assert len(found) == 1, f"expected one final norm, found {len(found)}"
    return found[0]


def test_capture_equals_reference_forward(family: tuple[str, nn.Module]) -> None:
    name, model = family
    ids, mask = _batch(name)
    entry = zoo.ZOO[name]
    with torch.no_grad():
        kwargs = padded_forward_kwargs(model, mask)
        reference = model(input_ids=ids, output_hidden_states=True, **kwargs)
    captured = capture_forward(model, ids, mask, torch.ones_like(mask, dtype=torch.bool))
    assert captured.response_mean is not None
    exact = entry.hidden_states_exact
    assert exact is not None, "zoo entry must say which hidden states are exact"
    # exact == 0: the family records no embeddings entry, entry i is the output of block i+1
    pairs = [(i, i) for i in range(exact)] or [
        (i + 1, i) for i in range(len(reference.hidden_states) - 1)
    ]
    if exact == 0:
        pairs.append((0, -1))
    # position L, the last block's output, is the input of the final norm: read it there
    norm_inputs: list[torch.Tensor] = []
    norm = _final_norm(model)
    handle = norm.register_forward_pre_hook(lambda m, args: norm_inputs.append(args[0]))
    try:
        with torch.no_grad():
            model(input_ids=ids, **kwargs)
    finally:
        handle.remove()
    assert len(norm_inputs) == 1, f"{name}: the final norm ran {len(norm_inputs)} times"
    last = norm_inputs[0].float()
    last = (last * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    layers = find_blocks(model).num_layers
    torch.testing.assert_close(
        captured.response_mean[:, layers],
        last,
        rtol=1e-5,
        atol=1e-5,
        msg=lambda m: f"{name}: position L ({layers}) vs the final norm's input: {m}",
    )
    for index, entry_index in pairs:
        if entry_index < 0:
            expected = model.get_input_embeddings()(ids).float()
        else:
            expected = reference.hidden_states[entry_index].float()
        expected = (expected * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        torch.testing.assert_close(
            captured.response_mean[:, index],
            expected,
            rtol=1e-5,
            atol=1e-5,
            msg=f"{name}: layer position {index}",
        )


def test_zero_vector_is_exact_noop(family: tuple[str, nn.Module]) -> None:
    name, model = family
    ids, mask = _batch(length=zoo.ZOO[name].prompt_length)
    layout = find_blocks(model)
    zero = PersonaVector(torch.zeros(layout.num_layers + 1, layout.hidden_size), "zero")
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with steer(model, SteeringSpec(zero, 3.0, "all")):
            steered = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(plain, steered)


def test_steering_changes_only_later_layers(family: tuple[str, nn.Module]) -> None:
    name, model = family
    ids, mask = _batch(length=zoo.ZOO[name].prompt_length)
    layout = find_blocks(model)
    layer = max(1, layout.num_layers // 2)
    vector = _random_vector(model)
    plain = _all_positions(model, ids, mask)
    with steer(model, SteeringSpec(vector, 1.0, layer)):
        steered = _all_positions(model, ids, mask)
    assert torch.equal(plain[:, :layer], steered[:, :layer])
    for index in range(layer, layout.num_layers + 1):
        assert not torch.allclose(plain[:, index], steered[:, index]), f"position {index}"


@pytest.mark.parametrize("positions", ["all", "generated"])
def test_cached_steered_generation_equals_recomputation(
    family: tuple[str, nn.Module], positions: str
) -> None:
    name, model = family
    ids, mask = _batch(name)
    vector = _random_vector(model, scale=2.0)
    layer = max(1, find_blocks(model).num_layers // 2)
    spec = SteeringSpec(vector, 1.0, layer, positions=positions)  # type: ignore[arg-type]
    prompt_len = ids.shape[1]
    with steer(model, spec) as handle, torch.no_grad():
        handle.reset_positions(prompt_len)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=zoo.PAD_ID,
            eos_token_id=None,
            use_cache=True,
            output_logits=True,
            return_dict_in_generate=True,
        )
        step_logits = torch.stack(out.logits, dim=1)  # [B, N, V]
        full_mask = torch.cat([mask, torch.ones_like(mask[:, :NEW_TOKENS])], dim=1)
        handle.reset_positions(prompt_len)
        recomputed = model(
            input_ids=out.sequences[:, :-1], **padded_forward_kwargs(model, full_mask[:, :-1])
        ).logits[:, prompt_len - 1 :]
    torch.testing.assert_close(step_logits, recomputed, rtol=1e-4, atol=1e-4, msg=name)


def _generate_logits(model: nn.Module, ids: torch.Tensor, use_cache: bool) -> torch.Tensor:
    """Logits of a bare greedy ``model.generate`` call of 3 tokens, [1, 3, V]."""
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=3,
            do_sample=False,
            pad_token_id=zoo.PAD_ID,
            eos_token_id=None,
            use_cache=use_cache,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
@pytest.mark.parametrize("positions", ["prompt", "generated"])
def test_reused_handle_finds_each_new_sequence(
    family: tuple[str, nn.Module], positions: str, use_cache: bool
) -> None:
    """Two bare ``model.generate`` calls inside one steering handle (prompts of 7, then 4
    tokens; no ``reset_positions``): the second is steered exactly as by a fresh handle."""
    name, model = family
    generator = torch.Generator().manual_seed(7)
    first, second = (
        torch.randint(3, zoo.VOCAB_SIZE, (1, length), generator=generator)
        for length in (PROMPT_LEN, PROMPT_LEN - 3)
    )
    vector = _random_vector(model, scale=2.0)
    layer = max(1, find_blocks(model).num_layers // 2)
    spec = SteeringSpec(vector, 1.0, layer, positions=positions)  # type: ignore[arg-type]
    with steer(model, spec):
        _generate_logits(model, first, use_cache)
        reused = _generate_logits(model, second, use_cache)
    with steer(model, spec):
        fresh = _generate_logits(model, second, use_cache)
    plain = _generate_logits(model, second, use_cache)
    assert not torch.allclose(plain, fresh, rtol=1e-4, atol=1e-4), "steering had no effect"
    torch.testing.assert_close(reused, fresh, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_hooks_removed_after_exception(family: tuple[str, nn.Module]) -> None:
    _, model = family
    vector = _random_vector(model)
    with pytest.raises(RuntimeError, match="boom"), steer(model, SteeringSpec(vector, 1.0, 1)):
        raise RuntimeError("boom")


def test_capture_during_generation_equals_forward(family: tuple[str, nn.Module]) -> None:
    name, model = family
    ids, mask = _batch(name)
    layout = find_blocks(model)
    monitor = Monitor(
        "m",
        torch.randn(layout.hidden_size, generator=torch.Generator().manual_seed(3)),
        layout.num_layers // 2,
    )
    capture = ActivationCapture(model, layout, monitors=[monitor])  # generate ignores EOS too
    capture.begin(max_response_tokens=NEW_TOKENS)
    with capture, torch.no_grad():
        sequences = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=NEW_TOKENS + 1,
            do_sample=False,
            pad_token_id=zoo.PAD_ID,
            eos_token_id=None,
            use_cache=True,
        )
    during = capture.result()
    assert_generation_capture_equals_forward(
        model, layout, monitor, during, sequences, mask, ids.shape[1], NEW_TOKENS, name
    )


# what transformers' own limits (ZooEntry.decoding) mean for batching
EXPECTED_BATCHING = {"exact": "padded", "no-left-padding": "equal-length", "batch-1": "single"}
WORD_PROMPTS = ["w10 w11 w12", "w20 w21 w22 w23 w24 w25", "w30 w31", "w40 w41 w42 w43 w44 w45"]


def test_batching_probe_finds_the_family(family: tuple[str, nn.Module]) -> None:
    """The probe flags exactly the families that transformers decodes wrongly in a padded
    batch (and no other), by what the loaded model does."""
    from persona_lens.core.batching import batching_mode

    name, model = family
    assert batching_mode(model, zoo.PAD_ID) == EXPECTED_BATCHING[zoo.ZOO[name].decoding]


def test_generate_equals_unbatched(family: tuple[str, nn.Module]) -> None:
    """``generate()`` of four prompts of three lengths in one call equals four calls of one
    prompt each (tokens and captured activations); so does ``capture_sequences``."""
    from persona_lens.core.capture import capture_sequences
    from persona_lens.core.generation import generate

    name, model = family
    tok = zoo.tokenizer()
    options: dict[str, object] = {"max_new_tokens": 4, "capture_layers": None}
    batched = generate(model, tok, WORD_PROMPTS, batch_size=4, **options)  # type: ignore[arg-type]
    alone = [generate(model, tok, [p], **options)[0] for p in WORD_PROMPTS]  # type: ignore[arg-type]
    assert [g.response_ids for g in batched] == [g.response_ids for g in alone], name
    for k, (got, expected) in enumerate(zip(batched, alone, strict=True)):
        for key in ("prompt_last", "prompt_mean", "response_mean"):
            torch.testing.assert_close(
                getattr(got, key),
                getattr(expected, key),
                rtol=1e-4,
                atol=1e-4,
                msg=lambda m, k=k, key=key: f"{name} prompt {k} {key}: {m}",
            )
    prompt_ids = [tok(g.prompt_text, add_special_tokens=False)["input_ids"] for g in alone]
    responses = [g.response_ids for g in alone]
    together = capture_sequences(model, prompt_ids, responses, pad_token_id=zoo.PAD_ID)
    for k, (got, expected) in enumerate(zip(together, alone, strict=True)):
        assert got.response_mean is not None and expected.response_mean is not None
        torch.testing.assert_close(
            got.response_mean[0],
            expected.response_mean,
            rtol=1e-4,
            atol=1e-4,
            msg=lambda m, k=k: f"{name} capture_sequences row {k}: {m}",
        )


EXPECTED_LETTERS = {
    "dense": set("A"),
    "sliding-window": set("S"),
    "moe": set("as"),
    "ssm": set("M"),
    "hybrid-inter": None,
    "hybrid-intra": set("H"),
    "linear-attention": set("Ll"),
    "linear-rnn": set("R"),
    "sparse-dynamic": set("Dd"),
}


def test_layout_matches_category(family: tuple[str, nn.Module]) -> None:
    name, model = family
    layout = find_blocks(model).describe()["layout"]
    category = zoo.ZOO[name].category
    if category == "hybrid-inter":
        assert len(set(layout.upper())) >= 2, f"{name}: {layout} mixes no block kinds"
    else:
        assert set(layout) & EXPECTED_LETTERS[category], f"{name}: {layout} for {category}"


def _greedy(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=zoo.PAD_ID,
            eos_token_id=None,
            use_cache=True,
        )


def test_steering_changes_generated_tokens(family: tuple[str, nn.Module]) -> None:
    name, model = family
    ids, mask = _batch(name)
    plain = _greedy(model, ids, mask)
    with steer(model, SteeringSpec(_random_vector(model), 1.0, "all", positions="generated")):
        steered = _greedy(model, ids, mask)
    assert torch.equal(steered[:, : ids.shape[1]], plain[:, : ids.shape[1]])
    assert (steered[:, ids.shape[1] :] != plain[:, ids.shape[1] :]).any(dim=1).all(), name


def test_per_row_coefficients(family: tuple[str, nn.Module]) -> None:
    """Row 0 steered with coefficient 0 equals the unsteered run of the same batch; row 1
    (coefficient 1) does not."""
    name, model = family
    ids, mask = _batch(name, rows=2)
    plain = _greedy(model, ids, mask)
    with steer(model, SteeringSpec(_random_vector(model), [0.0, 1.0], "all")):
        steered = _greedy(model, ids, mask)
    if zoo.ZOO[name].decoding == "batch-1":  # transformers mixes the rows' recurrent states
        assert not torch.equal(steered[0], plain[0]), "batched decoding is exact now"
        pytest.xfail("transformers' batched decoding leaks row 1's steering into row 0")
    assert torch.equal(steered[0], plain[0]), name
    assert not torch.equal(steered[1], plain[1]), name
