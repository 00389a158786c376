"""Checks riding along generation (core/decoding.py): Ctrl-C stops at the next decoding step
with every hook removed, and steering that breaks the model raises an error naming it."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from persona_lens.core.architecture import BlockLayout
from persona_lens.core.decoding import stop_on_interrupt
from persona_lens.core.errors import NonFiniteError
from persona_lens.core.generation import generate
from persona_lens.core.models import LoadedModel
from persona_lens.core.steering import SteeringSpec
from tests.tiny import load_tiny, random_trait_vector

Tiny = tuple[LoadedModel, BlockLayout, Path]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return load_tiny(tmp_path_factory.mktemp("tiny"), seed=3, num_layers=2)


@pytest.fixture
def interactive_sigint() -> Iterator[None]:
    """Ctrl-C as a terminal delivers it, even when the test run itself was started in the
    background (where SIGINT is inherited as ignored, and the library leaves it so)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.usefixtures("interactive_sigint")
def test_ctrl_c_stops_at_the_next_step_and_removes_hooks(tiny: Tiny) -> None:
    loaded = tiny[0]
    before = _hook_count(loaded.model)
    forwards = []

    def press_ctrl_c(module: torch.nn.Module, args: object, output: object) -> None:
        forwards.append(1)
        if len(forwards) == 3:
            signal.raise_signal(signal.SIGINT)  # as a terminal's Ctrl-C would

    handle = loaded.model.register_forward_hook(press_ctrl_c)
    try:
        with pytest.raises(KeyboardInterrupt):
            generate(loaded.model, loaded.tokenizer, ["hello"] * 2, max_new_tokens=40)
    finally:
        handle.remove()
    assert len(forwards) <= 4  # stopped at the next step, not after 40
    assert _hook_count(loaded.model) == before
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    (again,) = generate(loaded.model, loaded.tokenizer, ["hello"], max_new_tokens=3)
    assert len(again.response_ids) <= 3  # the flag does not leak into the next call


@pytest.mark.usefixtures("interactive_sigint")
def test_second_ctrl_c_raises_at_once() -> None:
    with pytest.raises(KeyboardInterrupt), stop_on_interrupt():
        signal.raise_signal(signal.SIGINT)  # sets the flag
        signal.raise_signal(signal.SIGINT)  # raises here
        raise AssertionError("not reached")


def test_huge_steering_names_the_coefficient(tiny: Tiny) -> None:
    loaded = tiny[0]
    vector = random_trait_vector(tiny, "evil", seed=1, best_layer=1)
    spec = SteeringSpec(vector, 1e30, 1)
    with pytest.raises(NonFiniteError, match=r"coefficient 1e\+30 on 'evil' at layer 1"):
        generate(loaded.model, loaded.tokenizer, ["hello"], max_new_tokens=5, steering=[spec])
    mild = SteeringSpec(vector, 2.0, 1)
    (out,) = generate(loaded.model, loaded.tokenizer, ["hello"], max_new_tokens=3, steering=[mild])
    assert len(out.response_ids) <= 3


def test_sampling_with_masked_tokens_is_not_an_error(tiny: Tiny) -> None:
    """-inf logits (top-p, suppressed tokens) mask tokens; they are not a failure."""
    loaded = tiny[0]
    outs = generate(
        loaded.model,
        loaded.tokenizer,
        ["hello"],
        max_new_tokens=4,
        do_sample=True,
        top_p=0.5,
        seed=0,
    )
    assert len(outs) == 1
