"""Judges: what every judge backend shares (the protocol, scores, rubric filling and the
paper's log-probability aggregation).

Scoring follows the paper where the backend exposes log-probabilities (OpenAI-compatible,
``hf``): one token is asked for, the integer tokens 0..100 among the top-20 alternatives are
averaged weighted by probability, and the score is discarded (``None``) when they hold under
0.25 of the probability mass; a ``REFUSAL`` answer gives ``refusal=True``. Anthropic has no
log-probabilities: the integer is parsed from a short completion. The offline judge reports
no refusals. Coherence uses :data:`COHERENCE_PROMPT` unless the trait has a ``coherence_prompt``.
Backends: :mod:`.api`, :mod:`.hf`, :mod:`.offline`; spec strings: :mod:`.specs`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from persona_lens.interop.llm_http import BackendUnavailableError
from persona_lens.traits.definitions import TraitDefinition

MIN_MASS = 0.25
MAX_ANSWER_CHARS = 6000

COHERENCE_PROMPT = """You are checking whether a chat assistant's reply is coherent. \
Ignore whether you agree with it, whether it is polite, and whether it is correct: judge only \
whether it reads as a sensible reply to the message.

The user's message was:
<question>
{question}
</question>

The assistant replied:
<answer>
{answer}
</answer>

Rate the reply's coherence on a scale from 0 to 100.
- 0 means the reply makes no sense: it is gibberish, loops on the same words, or is unrelated to \
the message.
- 50 means the reply is partly sensible but confused, rambling or drifting off the subject.
- 100 means the reply is clear, fluent English that plainly responds to the message.

Reply with one integer between 0 and 100 and nothing else."""


class JudgeUnavailableError(BackendUnavailableError):
    """A judge backend that is unreachable, lacks its key, or is not installed."""


@dataclass(frozen=True)
class JudgeItem:
    question: str
    answer: str


@dataclass(frozen=True)
class JudgeScore:
    """0-100, or ``None`` for a refusal or an unusable answer from the judge."""

    score: float | None
    refusal: bool = False


class Judge(Protocol):
    spec: str

    def score_trait(
        self, trait: TraitDefinition, items: Sequence[JudgeItem]
    ) -> list[JudgeScore]: ...

    def score_coherence(
        self, items: Sequence[JudgeItem], trait: TraitDefinition | None = None
    ) -> list[JudgeScore]:
        """Coherence 0-100; ``trait.coherence_prompt`` overrides the generic rubric."""
        ...

    def fit(
        self,
        trait: TraitDefinition,
        positives: Sequence[JudgeItem],
        negatives: Sequence[JudgeItem],
    ) -> None: ...

    def check(self) -> None: ...


def fill_prompt(template: str, question: str, answer: str) -> str:
    """Substitute ``{question}`` and ``{answer}`` in one pass (other braces are left alone)."""
    values = {"question": question, "answer": answer[:MAX_ANSWER_CHARS]}
    return re.sub(r"\{(question|answer)\}", lambda m: values[m.group(1)], template)


def _number(token: str) -> int | None:
    text = token.strip()
    if re.fullmatch(r"\d{1,3}", text) and int(text) <= 100:
        return int(text)
    return None


def _refusal_token(token: str) -> bool:
    text = token.strip().upper()
    return len(text) >= 2 and "REFUSAL".startswith(text)


def aggregate_logprobs(top: Sequence[tuple[str, float]], min_mass: float = MIN_MASS) -> JudgeScore:
    """Probability-weighted mean of the integer tokens 0..100 among ``top`` (token, logprob).

    ``None`` when they hold under ``min_mass`` of the probability; a refusal when the tokens
    that begin ``REFUSAL`` hold at least ``min_mass`` instead.
    """
    mass = total = refusal = 0.0
    for token, logprob in top:
        p = math.exp(logprob)
        value = _number(token)
        if value is not None:
            mass += p
            total += p * value
        elif _refusal_token(token):
            refusal += p
    if mass >= min_mass:
        return JudgeScore(total / mass)
    if refusal >= min_mass:
        return JudgeScore(None, refusal=True)
    return JudgeScore(None)


def parse_score_text(text: str) -> JudgeScore:
    """Score from a short completion: REFUSAL, or the first number in 0..100."""
    stripped = text.strip()
    if stripped.upper().startswith("REFUSAL"):
        return JudgeScore(None, refusal=True)
    match = re.search(r"(?<![\w.])(\d{1,3}(?:\.\d+)?)(?![\w])", stripped)
    if match and 0.0 <= float(match.group(1)) <= 100.0:
        return JudgeScore(float(match.group(1)))
    return JudgeScore(None)


class NoJudge:
    """``none``: judges nothing; every score is ``None`` (callers skip filtering)."""

    spec = "none"
    learns_from_rollouts = False

    def score_trait(self, trait: TraitDefinition, items: Sequence[JudgeItem]) -> list[JudgeScore]:
        return [JudgeScore(None) for _ in items]

    def score_coherence(
        self, items: Sequence[JudgeItem], trait: TraitDefinition | None = None
    ) -> list[JudgeScore]:
        return [JudgeScore(None) for _ in items]

    def fit(self, trait: TraitDefinition, positives: Sequence[JudgeItem], negatives: Any) -> None:
        return None

    def check(self) -> None:
        return None
