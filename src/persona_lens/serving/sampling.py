"""Choosing each row's next token: greedy or seeded sampling (temperature, top-p), with the
log-probabilities OpenAI clients can ask for.

Every row samples from its own logits with its own generator, so a row's tokens never depend
on which other requests share its batch. Log-probabilities are those of the model's raw
distribution (before temperature and top-p), as OpenAI reports them.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from persona_lens.serving.resolve import Sampling

MIN_TEMPERATURE = 1e-4
"""Below this, sampling is greedy (dividing logits by a tinier temperature overflows)."""


@dataclass(frozen=True)
class Choice:
    """One chosen token with its log-probability and the most likely alternatives."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class RowSampler:
    """Draws the tokens of one request."""

    sampling: Sampling
    generator: torch.Generator | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.sampling.temperature >= MIN_TEMPERATURE:
            seed = self.sampling.seed if self.sampling.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator().manual_seed(seed % (1 << 63))

    def choose(self, logits: torch.Tensor, banned: Sequence[int] = ()) -> Choice:
        """The next token from one row's logits [V] (float32, on the CPU); ``banned`` tokens
        (end-of-sequence before ``min_tokens``) cannot be chosen."""
        sampling = self.sampling
        if banned:
            logits = logits.clone()
            logits[list(banned)] = float("-inf")
        if sampling.temperature < MIN_TEMPERATURE:  # 0, or so close that it is greedy
            token = int(torch.argmax(logits))
        else:
            token = _sample(logits, sampling.temperature, sampling.top_p, self.generator)
        if not sampling.logprobs:
            return Choice(token, float("nan"))
        logprobs = torch.log_softmax(logits, dim=-1)
        top: tuple[tuple[int, float], ...] = ()
        if sampling.top_logprobs:
            values, indices = torch.topk(logprobs, min(sampling.top_logprobs, logprobs.numel()))
            top = tuple(zip(indices.tolist(), values.tolist(), strict=True))
        return Choice(token, float(logprobs[token]), top)


def _sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        keep = before < top_p
        keep[0] = True  # the likeliest token always stays (a top_p that rounds to 0 included)
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
