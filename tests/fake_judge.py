"""Test doubles for evaluation and monitoring-experiment tests: fake judges (no model, no
network) and a spy on the real ``generate``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from persona_lens.core.generation import generate
from persona_lens.judges.base import JudgeItem, JudgeScore
from persona_lens.traits.definitions import TraitDefinition


class FakeJudge:
    """Scores with ``trait_fn(answer)``; coherence 80; REFUSAL where ``refuse(answer)``."""

    learns_from_rollouts = False

    def __init__(
        self,
        trait_fn: Callable[[str], float | None] = lambda answer: 50.0,
        refuse: Callable[[str], bool] = lambda answer: False,
        spec: str = "fake",
    ) -> None:
        self.trait_fn = trait_fn
        self.refuse = refuse
        self.spec = spec
        self.trait_calls: list[list[JudgeItem]] = []
        self.fits: list[tuple[list[JudgeItem], list[JudgeItem]]] = []
        self.coherence_traits: list[TraitDefinition | None] = []

    def score_trait(self, trait: TraitDefinition, items: Sequence[JudgeItem]) -> list[JudgeScore]:
        self.trait_calls.append(list(items))
        return [
            JudgeScore(None, True) if self.refuse(i.answer) else JudgeScore(self.trait_fn(i.answer))
            for i in items
        ]

    def score_coherence(
        self, items: Sequence[JudgeItem], trait: TraitDefinition | None = None
    ) -> list[JudgeScore]:
        self.coherence_traits.append(trait)
        return [JudgeScore(80.0) for _ in items]

    def fit(
        self, trait: TraitDefinition, positives: Sequence[JudgeItem], negatives: Sequence[JudgeItem]
    ) -> None:
        self.fits.append((list(positives), list(negatives)))

    def check(self) -> None:
        return None


class LearningJudge(FakeJudge):
    """A judge that must be fitted on contrastive examples first (like the offline one)."""

    learns_from_rollouts = True


def hello_share(answer: str) -> float:
    """Share of 'hello' among the words, 0-100: a trait score that tiny models can vary."""
    words = answer.split()
    return 100.0 * sum(w == "hello" for w in words) / len(words) if words else 0.0


class GenerateSpy:
    """Wraps the real generate and records every call's prompts and keyword arguments."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, model: Any, tokenizer: Any, prompts: Any, **kwargs: Any) -> Any:
        self.calls.append({"prompts": list(prompts), **kwargs})
        return generate(model, tokenizer, prompts, **kwargs)
