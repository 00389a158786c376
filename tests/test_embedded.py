"""The primitives on the real embedded model (SmolLM2-135M-Instruct, 30 blocks, d=576)."""

from __future__ import annotations

import pytest
import torch

from persona_lens.core.architecture import find_blocks
from persona_lens.core.capture import Monitor, capture_forward
from persona_lens.core.generation import generate, render_chat, to_messages
from persona_lens.core.models import LoadedModel
from persona_lens.core.steering import SteeringSpec
from persona_lens.core.vectors import PersonaVector

pytestmark = pytest.mark.embedded

PROMPTS = [
    "Name a colour.",
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "What is the capital of France and why is it famous?"},
    ],
    {"prompt": "Say hello."},
]


def test_layout_and_chat_template(embedded_model: LoadedModel) -> None:
    layout = find_blocks(embedded_model.model)
    assert (layout.family, layout.num_layers, layout.hidden_size) == ("llama", 30, 576)
    assert layout.path == "model.layers"
    text = render_chat(embedded_model.tokenizer, to_messages("Hi there", system="Be brief."))
    assert "Hi there" in text and "Be brief." in text
    assert text.index("Be brief.") < text.index("Hi there")
    assert embedded_model.tokenizer.padding_side == "left"


def test_batched_generation_matches_single(embedded_model: LoadedModel) -> None:
    model, tok = embedded_model.model, embedded_model.tokenizer
    batched = generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=3)
    single = [generate(model, tok, [p], max_new_tokens=12)[0] for p in PROMPTS]
    assert [g.response_ids for g in batched] == [g.response_ids for g in single]
    assert "Paris" in batched[1].response


def test_capture_during_generation_equals_forward(embedded_model: LoadedModel) -> None:
    model, tok = embedded_model.model, embedded_model.tokenizer
    layout = find_blocks(model)
    direction = torch.randn(576, generator=torch.Generator().manual_seed(0))
    monitor = Monitor("m", direction, 15)
    generations = generate(
        model,
        tok,
        PROMPTS,
        max_new_tokens=16,
        capture_layers=None,
        monitors=[monitor],
        batch_size=3,
    )
    for generation in generations:
        assert generation.response_mean is not None and generation.prompt_last is not None
        assert len(generation.token_projections["m"]) == len(generation.response_ids)
        prompt_ids = tok(generation.prompt_text, add_special_tokens=False, return_tensors="pt")[
            "input_ids"
        ]
        response = torch.tensor([generation.response_ids])
        ids = torch.cat([prompt_ids, response], dim=1)
        mask = torch.ones_like(ids)
        response_mask = torch.zeros_like(ids, dtype=torch.bool)
        response_mask[:, prompt_ids.shape[1] :] = True
        reference = capture_forward(
            model, ids, mask, response_mask, layout=layout, monitors=[monitor]
        )
        assert reference.response_mean is not None and reference.prompt_last is not None
        torch.testing.assert_close(
            generation.response_mean, reference.response_mean[0], rtol=1e-3, atol=1e-3
        )
        torch.testing.assert_close(
            generation.prompt_last, reference.prompt_last[0], rtol=1e-3, atol=1e-3
        )
        torch.testing.assert_close(
            torch.tensor(generation.token_projections["m"]),
            torch.tensor(reference.token_projections["m"][0]),
            rtol=1e-3,
            atol=1e-3,
        )


def test_eos_ends_the_response(embedded_model: LoadedModel) -> None:
    model, tok = embedded_model.model, embedded_model.tokenizer
    generation = generate(
        model, tok, ["Reply with the single word: yes"], max_new_tokens=40, capture_layers=[10]
    )[0]
    assert len(generation.response_ids) < 40, "expected the model to stop by itself"
    assert generation.response_mean is not None


def test_steering_changes_text_and_restores(embedded_model: LoadedModel) -> None:
    model, tok = embedded_model.model, embedded_model.tokenizer
    layout = find_blocks(model)
    rows = torch.randn(31, 576, generator=torch.Generator().manual_seed(1))
    vector = PersonaVector(rows * 0.5, "noise", {"best_layer": "12"})
    prompts = ["Describe a sunny day in two sentences."]
    plain = generate(model, tok, prompts, max_new_tokens=20)[0]
    steered = generate(
        model, tok, prompts, max_new_tokens=20, steering=[SteeringSpec(vector, 8.0)], layout=layout
    )[0]
    again = generate(model, tok, prompts, max_new_tokens=20)[0]
    assert steered.response != plain.response
    assert again.response_ids == plain.response_ids
