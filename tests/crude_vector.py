"""A crude persona vector for smoke tests on a real model: response means under one
instruction pair's positive vs negative system prompt, no judge, a handful of tokens."""

from __future__ import annotations

import torch

from persona_lens.core.generation import generate
from persona_lens.core.models import LoadedModel, model_fingerprint
from persona_lens.core.vectors import PersonaVector
from persona_lens.traits.definitions import load_trait


def crude_vector(loaded: LoadedModel, trait_name: str, best_layer: int = 15) -> PersonaVector:
    trait = load_trait(trait_name)
    pair = trait.instructions[0]
    questions = list(trait.extraction_questions[:2])
    prompts = [
        [{"role": "system", "content": s}, {"role": "user", "content": q}]
        for s in (pair.pos, pair.neg)
        for q in questions
    ]
    gens = generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=6, capture_layers=None)
    means = torch.stack([g.response_mean for g in gens if g.response_mean is not None])
    return PersonaVector(
        means[:2].mean(0) - means[2:].mean(0),
        trait_name,
        {
            "best_layer": str(best_layer),
            "model_fingerprint": model_fingerprint(loaded.model, loaded.tokenizer),
        },
    )
