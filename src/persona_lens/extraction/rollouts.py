"""Contrastive rollouts with activations, generated in fixed batches and cached on disk.

Each rollout answers one extraction question under one system prompt of an instruction pair
(``pos`` elicits the trait, ``neg`` suppresses it). The plan is cut into batches up front and
each batch is sampled with its own seed, so a batch's outcome does not depend on which other
batches ran: after a kill, a rerun loads the finished batches from the cache and generates the
rest, giving exactly the vector an uninterrupted run gives. Activations (response mean, prompt
mean, last prompt token, every layer position) come from the generation backend: captured
during generation (``hf``) or read right after it from the sampled tokens (``vllm``).

Cache layout: ``<cache_dir>/<key>/batch-<i>.safetensors`` (activations) and
``batch-<i>.jsonl`` (texts), each written atomically; ``key`` hashes the model fingerprint,
the trait definition, the sampling settings, the seed and the generation backend.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from persona_lens.core.files import atomic_write, atomic_write_text
from persona_lens.extraction.backends import GenerationBackend
from persona_lens.traits.definitions import TraitDefinition

SIDES = ("pos", "neg")


@dataclass(frozen=True)
class RolloutItem:
    """One planned rollout: side, instruction pair, question and sample index."""

    side: str
    pair: int
    question: int
    sample: int


@dataclass
class Rollout:
    item: RolloutItem
    system: str
    question: str
    response: str
    response_mean: torch.Tensor  # [L+1, d]
    prompt_mean: torch.Tensor  # [L+1, d]
    prompt_last: torch.Tensor  # [L+1, d]
    num_tokens: int


@dataclass(frozen=True)
class RolloutSettings:
    pairs: int
    questions: int
    samples: int
    max_new_tokens: int
    temperature: float
    batch_size: int
    seed: int


def plan(settings: RolloutSettings) -> list[RolloutItem]:
    """Every rollout of a run, in a fixed order (question-major, both sides together)."""
    return [
        RolloutItem(side, pair, question, sample)
        for question in range(settings.questions)
        for pair in range(settings.pairs)
        for sample in range(settings.samples)
        for side in SIDES
    ]


def cache_key(
    fingerprint: str, trait: TraitDefinition, settings: RolloutSettings, backend: str
) -> str:
    blob = json.dumps(
        {
            "model": fingerprint,
            "trait": trait.content_hash(),
            "settings": settings.__dict__,
            "backend": backend,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _messages(trait: TraitDefinition, item: RolloutItem) -> tuple[str, str]:
    pair = trait.instructions[item.pair]
    system = pair.pos if item.side == "pos" else pair.neg
    return system, trait.extraction_questions[item.question]


def run_rollouts(
    backend: GenerationBackend,
    trait: TraitDefinition,
    settings: RolloutSettings,
    cache_dir: Path,
    *,
    fingerprint: str,
    progress: Callable[[int], None] | None = None,
) -> list[Rollout]:
    """Generate (or load from the cache) every planned rollout with its activations."""
    items = plan(settings)
    directory = cache_dir / cache_key(fingerprint, trait, settings, backend.name)
    directory.mkdir(parents=True, exist_ok=True)
    rollouts: list[Rollout] = []
    for index in range(0, len(items), settings.batch_size):
        batch = items[index : index + settings.batch_size]
        batch_number = index // settings.batch_size
        cached = _load_batch(directory, batch_number, trait, batch)
        if cached is None:
            cached = _generate_batch(
                backend,
                trait,
                settings,
                batch,
                seed=settings.seed * 100_003 + batch_number,
            )
            _save_batch(directory, batch_number, cached)
        rollouts.extend(cached)
        if progress is not None:
            progress(len(batch))
    return rollouts


def _generate_batch(
    backend: GenerationBackend,
    trait: TraitDefinition,
    settings: RolloutSettings,
    batch: list[RolloutItem],
    *,
    seed: int,
) -> list[Rollout]:
    texts = [_messages(trait, item) for item in batch]
    prompts = [[{"role": "system", "content": s}, {"role": "user", "content": q}] for s, q in texts]
    generations = backend.generate(
        prompts, max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, seed=seed
    )
    rollouts = []
    for item, (system, question), g in zip(batch, texts, generations, strict=True):
        assert g.response_mean is not None and g.prompt_mean is not None
        assert g.prompt_last is not None
        rollouts.append(
            Rollout(
                item,
                system,
                question,
                g.response,
                g.response_mean,
                g.prompt_mean,
                g.prompt_last,
                len(g.response_ids),
            )
        )
    return rollouts


def _save_batch(directory: Path, number: int, rollouts: list[Rollout]) -> None:
    tensors = {
        f"{name}.{i}": getattr(r, name).contiguous()
        for i, r in enumerate(rollouts)
        for name in ("response_mean", "prompt_mean", "prompt_last")
    }
    records = [
        {"item": r.item.__dict__, "response": r.response, "num_tokens": r.num_tokens}
        for r in rollouts
    ]
    # activations first, texts last: a batch counts as done only when its .jsonl exists
    atomic_write(directory / f"batch-{number}.safetensors", lambda p: save_file(tensors, p))
    text = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write_text(directory / f"batch-{number}.jsonl", text)


def _load_batch(
    directory: Path, number: int, trait: TraitDefinition, batch: list[RolloutItem]
) -> list[Rollout] | None:
    texts_path = directory / f"batch-{number}.jsonl"
    tensors_path = directory / f"batch-{number}.safetensors"
    if not texts_path.is_file() or not tensors_path.is_file():
        return None
    try:
        records = [json.loads(line) for line in texts_path.read_text(encoding="utf-8").splitlines()]
        tensors = load_file(str(tensors_path))
    except (OSError, ValueError):
        return None  # damaged: regenerate
    if [RolloutItem(**r["item"]) for r in records] != batch:
        return None
    rollouts = []
    for i, (item, record) in enumerate(zip(batch, records, strict=True)):
        system, question = _messages(trait, item)
        rollouts.append(
            Rollout(
                item,
                system,
                question,
                record["response"],
                tensors[f"response_mean.{i}"],
                tensors[f"prompt_mean.{i}"],
                tensors[f"prompt_last.{i}"],
                int(record["num_tokens"]),
            )
        )
    return rollouts
