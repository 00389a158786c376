"""API judges: OpenAI-compatible servers (OpenAI, vLLM, llama.cpp, ollama; with
log-probabilities) and Anthropic (a parsed short completion).

API judges send ``PERSONA_LENS_JUDGE_CONCURRENCY`` requests at a time (default 8), time out
after ``PERSONA_LENS_HTTP_TIMEOUT`` seconds (default 60) and retry 408/409/429/5xx answers and
connection errors 4 times with exponential backoff; a refused key, an unknown model or a
server that stays down raises :class:`JudgeUnavailableError` naming the variables to set.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from persona_lens.interop.llm_http import ChatClient, OpenAIClient
from persona_lens.judges.base import (
    COHERENCE_PROMPT,
    JudgeItem,
    JudgeScore,
    aggregate_logprobs,
    fill_prompt,
    parse_score_text,
)
from persona_lens.traits.definitions import TraitDefinition

CONCURRENCY_ENV = "PERSONA_LENS_JUDGE_CONCURRENCY"


def _concurrency() -> int:
    try:
        return max(1, int(os.environ.get(CONCURRENCY_ENV, "8")))
    except ValueError:
        return 8


class APIJudge:
    """A judge that asks a chat API, one request per item, a few in parallel."""

    learns_from_rollouts = False

    def __init__(self, spec: str, client: ChatClient, concurrency: int | None = None) -> None:
        self.spec = spec
        self.client = client
        self.concurrency = concurrency or _concurrency()

    def _score(self, prompt: str) -> JudgeScore:
        if isinstance(self.client, OpenAIClient):
            completion = self.client.complete(prompt, max_tokens=1, temperature=0.0, logprobs=True)
            if completion.top_logprobs:
                return aggregate_logprobs(completion.top_logprobs)
            return parse_score_text(completion.text)  # a server without log-probabilities
        completion = self.client.complete(prompt, max_tokens=8, temperature=0.0)
        return parse_score_text(completion.text)

    def _map(self, prompts: list[str]) -> list[JudgeScore]:
        if len(prompts) <= 1 or self.concurrency == 1:
            return [self._score(p) for p in prompts]
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(prompts)))
        try:
            return list(pool.map(self._score, prompts))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def score_trait(self, trait: TraitDefinition, items: Sequence[JudgeItem]) -> list[JudgeScore]:
        return self._map([fill_prompt(trait.judge_prompt, i.question, i.answer) for i in items])

    def score_coherence(
        self, items: Sequence[JudgeItem], trait: TraitDefinition | None = None
    ) -> list[JudgeScore]:
        template = (trait.coherence_prompt if trait else None) or COHERENCE_PROMPT
        return self._map([fill_prompt(template, i.question, i.answer) for i in items])

    def fit(self, trait: TraitDefinition, positives: Sequence[JudgeItem], negatives: Any) -> None:
        return None

    def check(self) -> None:
        self.client.check()
