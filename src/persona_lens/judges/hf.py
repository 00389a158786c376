"""``hf:MODEL_SPEC``: a local causal LM as judge, read from its next-token probabilities.

The judge prompt is rendered with the model's chat template and the probability of every
integer answer 0..100 is computed exactly where the tokenizer writes it as one token, and by
walking a token trie where it does not (SmolLM2, Qwen and others write ``85`` as ``8`` ``5``):

* level 1: one forward over the prompt gives ``P(t1)`` for every first token of a number;
* each number prefix that can continue (``8`` -> ``85``; ``10`` -> ``100``) and holds at least
  ``prune`` (1e-3) of the probability is expanded by one more forward over prompt + prefix;
* ``P(n) = P(t1) * P(t2 | t1) * ...``, times the probability that a prefix which is itself a
  number *stops* there (``1 - P(any digit continuing it)``) where that prefix was expanded.
  Prefixes under ``prune`` count as complete numbers without a stop factor (under 0.1%).

The result is aggregated like the API judges: the probability-weighted mean over 0..100,
``None`` when numbers hold under 0.25 of the mass, a refusal when the first token of
``REFUSAL`` holds at least 0.25 instead. Forwards are batched with left padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from persona_lens.core.errors import PersonaLensError
from persona_lens.judges.base import (
    COHERENCE_PROMPT,
    MIN_MASS,
    JudgeItem,
    JudgeScore,
    JudgeUnavailableError,
    fill_prompt,
)
from persona_lens.traits.definitions import TraitDefinition

PRUNE = 1e-3


class NumberTrie:
    """Token sequences of the integers 0..100 under one tokenizer."""

    def __init__(self, tokenizer: Any, top: int = 100) -> None:
        self.values: dict[tuple[int, ...], int] = {}
        self.children: dict[tuple[int, ...], set[int]] = {}
        for n in range(top + 1):
            ids = tuple(tokenizer.encode(str(n), add_special_tokens=False))
            if not ids:
                continue
            self.values.setdefault(ids, n)
            for k in range(len(ids)):
                self.children.setdefault(ids[:k], set()).add(ids[k])
        refusal = tokenizer.encode("REFUSAL", add_special_tokens=False)
        self.refusal_token: int | None = refusal[0] if refusal else None


class HFJudge:
    """A local causal LM scoring by next-token probabilities."""

    learns_from_rollouts = False

    def __init__(
        self, spec: str, model: Any, tokenizer: Any, batch_size: int = 8, prune: float = PRUNE
    ) -> None:
        self.spec = spec
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.prune = prune
        self.trie = NumberTrie(tokenizer)

    @classmethod
    def from_spec(cls, spec: str, model_spec: str) -> HFJudge:
        from persona_lens.core.models import load_model

        try:
            loaded = load_model(model_spec)
        except PersonaLensError as exc:
            raise JudgeUnavailableError(
                f"hf judge: {exc}; pass hf:embedded, hf:<local dir>, hf:<file.gguf> or a cached "
                "Hugging Face id"
            ) from exc
        return cls(spec, loaded.model, loaded.tokenizer)

    def _device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    @torch.inference_mode()
    def next_token_probs(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """[len(sequences), vocab] next-token probabilities (float32, CPU)."""
        from persona_lens.core.capture import padded_forward_kwargs

        out: list[torch.Tensor] = []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for start in range(0, len(sequences), self.batch_size):
            chunk = sequences[start : start + self.batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), int(pad), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, seq in enumerate(chunk):
                ids[row, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
                mask[row, width - len(seq) :] = 1
            device = self._device()
            ids, mask = ids.to(device), mask.to(device)
            logits = self.model(input_ids=ids, **padded_forward_kwargs(self.model, mask)).logits
            out.append(torch.softmax(logits[:, -1].float(), dim=-1).cpu())
        return torch.cat(out)

    def number_distribution(
        self, prompts: Sequence[Sequence[int]]
    ) -> list[tuple[dict[int, float], float]]:
        """Per prompt: ``{n: P(n)}`` over 0..100 and the refusal mass (see module docstring)."""
        trie = self.trie
        # path probability of every reached prefix, per prompt
        reach: list[dict[tuple[int, ...], float]] = [{} for _ in prompts]
        stop: list[dict[tuple[int, ...], float]] = [{} for _ in prompts]
        refusal = [0.0] * len(prompts)
        frontier: list[tuple[int, tuple[int, ...]]] = [(i, ()) for i in range(len(prompts))]
        path: list[dict[tuple[int, ...], float]] = [{(): 1.0} for _ in prompts]
        while frontier:
            probs = self.next_token_probs([[*prompts[i], *prefix] for i, prefix in frontier])
            nxt: list[tuple[int, tuple[int, ...]]] = []
            for (i, prefix), row in zip(frontier, probs, strict=True):
                here = path[i][prefix]
                kids = sorted(trie.children.get(prefix, ()))
                cont = row[kids].tolist() if kids else []
                if not prefix and trie.refusal_token is not None:
                    refusal[i] = float(row[trie.refusal_token])
                if prefix in trie.values:
                    stop[i][prefix] = max(0.0, 1.0 - sum(cont))
                for tok, p in zip(kids, cont, strict=True):
                    child = (*prefix, tok)
                    path[i][child] = here * p
                    if child in trie.values:
                        reach[i][child] = here * p
                    if trie.children.get(child) and here * p >= self.prune:
                        nxt.append((i, child))
            frontier = nxt
        result = []
        for i in range(len(prompts)):
            dist: dict[int, float] = {}
            for seq, p in reach[i].items():
                n = trie.values[seq]
                dist[n] = dist.get(n, 0.0) + p * stop[i].get(seq, 1.0)
            result.append((dist, refusal[i]))
        return result

    def _render(self, prompt: str) -> list[int]:
        from persona_lens.core.generation import render_chat

        text = render_chat(self.tokenizer, [{"role": "user", "content": prompt}])
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def score_token_prompts(self, prompts: Sequence[Sequence[int]]) -> list[JudgeScore]:
        """Scores for already tokenized prompts (the 0.25 rule and REFUSAL as the API judges)."""
        scores = []
        for dist, refusal in self.number_distribution(prompts):
            mass = sum(dist.values())
            if mass >= MIN_MASS:
                scores.append(JudgeScore(sum(n * p for n, p in dist.items()) / mass))
            elif refusal >= MIN_MASS:
                scores.append(JudgeScore(None, refusal=True))
            else:
                scores.append(JudgeScore(None))
        return scores

    def score_prompts(self, prompts: Sequence[str]) -> list[JudgeScore]:
        return self.score_token_prompts([self._render(p) for p in prompts])

    def score_trait(self, trait: TraitDefinition, items: Sequence[JudgeItem]) -> list[JudgeScore]:
        return self.score_prompts(
            [fill_prompt(trait.judge_prompt, i.question, i.answer) for i in items]
        )

    def score_coherence(
        self, items: Sequence[JudgeItem], trait: TraitDefinition | None = None
    ) -> list[JudgeScore]:
        template = (trait.coherence_prompt if trait else None) or COHERENCE_PROMPT
        return self.score_prompts([fill_prompt(template, i.question, i.answer) for i in items])

    def fit(self, trait: TraitDefinition, positives: Any, negatives: Any) -> None:
        return None

    def check(self) -> None:
        return None
