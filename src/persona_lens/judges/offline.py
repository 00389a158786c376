"""The offline judge: trait scores from sentence embeddings, coherence from text statistics.

Needs neither network nor key. Answers are embedded (:mod:`persona_lens.judges.embeddings`: the
bundled all-MiniLM-L6-v2, else the embedded SmolLM2's states) and scored by a per-trait logistic
model ``p = sigmoid(w . e + b)``, reported as ``100 * p``.

* **Prior (before ``fit``)**: ``w0 = k * (mean(pos) - mean(neg))`` where ``pos``/``neg`` are the
  unit centroids of the trait's eliciting and suppressing system prompts: an answer scores above
  50 when it is closer to the eliciting instructions than to the suppressing ones.
* **fit(trait, positives, negatives)**: L2-regularized logistic regression on the run's own
  labelled rollouts (answers written under the eliciting vs the suppressing prompts), shrunk
  toward the prior: minimize ``sum BCE + lam/2 * |w - w0|^2 + lam/2 * b^2`` (Newton steps), so a
  few noisy rollouts move the prior a little and many move it a lot. ``lam`` is chosen from a
  small grid by 5-fold cross-validated log-loss on the fitting data itself.

Coherence (no model): 100 times the product of factors in [0, 1]:
  * repetition: share of distinct word trigrams (ramped from 0.3 to 0.8), so loops score low;
  * runs: the longest run of one repeated word (-0.2 per word beyond 3);
  * characters: share of letters and digits among non-space characters (ramped 0.35 to 0.7);
  * words: share of word-like tokens (ramped 0.5 to 0.9): Latin letters with a vowel and at
    most 20 characters, any other script, or numbers and punctuation;
  * length: 0.3 for a one-word answer, 0 for none.
Fluent prose in any language scores 100; loops, symbol soup and keyboard mash score under 50.
The heuristic judges form only, not relevance to the question.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from persona_lens.judges.base import JudgeItem, JudgeScore, JudgeUnavailableError
from persona_lens.judges.embeddings import Embedder, load_embedder
from persona_lens.traits.definitions import TraitDefinition

PRIOR_SCALE = 40.0
L2 = 1.0
L2_GRID = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
CHOOSE_MAX = 300
CACHE_SIZE = 50_000
_CACHE: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_WORD = re.compile(r"[^\W\d_][\w'\-]*|\d+")


@dataclass
class TraitModel:
    """A linear logistic scorer over unit embeddings."""

    prior: torch.Tensor
    weight: torch.Tensor
    bias: float = 0.0
    fitted: bool = False
    l2: float = L2

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings.double() @ self.weight + self.bias


def _sigmoid(x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(x)


def fit_logistic(
    x: Any, y: Any, prior: Any, lam: float = L2, steps: int = 50
) -> tuple[torch.Tensor, float]:
    """MAP logistic regression, weights shrunk toward ``prior`` and bias toward 0 (damped
    Newton, numpy float64). Minimizes ``sum BCE + lam/2 * (|w - prior|^2 + b^2)``.

    The optimum is ``prior + X^T a`` for some ``a`` (the penalty's gradient must cancel the
    data's), so with fewer examples than dimensions Newton runs on the n coefficients ``a``.
    """
    xs = _np(x)
    ys = _np(y).reshape(-1)
    n, d = xs.shape
    xb = np.concatenate([xs, np.ones((n, 1))], 1)
    center = np.concatenate([_np(prior).reshape(-1), np.zeros(1)])
    gram = xb @ xb.T if n < d + 1 else None
    base = xb @ center
    coef = np.zeros(n if gram is not None else d + 1)  # alpha (dual) or theta - center

    def logits(c: np.ndarray) -> np.ndarray:
        return base + (gram @ c if gram is not None else xb @ c)

    def objective(c: np.ndarray) -> float:
        z = logits(c)
        penalty = c @ (gram @ c) if gram is not None else c @ c
        return float((np.logaddexp(0.0, z) - ys * z).sum() + lam / 2 * penalty)

    current = objective(coef)
    for _ in range(steps):
        p = _expit(logits(coef))
        w = p * (1 - p)
        if gram is not None:  # Newton on alpha, reduced by the (possibly singular) Gram matrix
            step = np.linalg.solve(w[:, None] * gram + lam * np.eye(n), p - ys + lam * coef)
        else:
            grad = xb.T @ (p - ys) + lam * coef
            hess = (xb * w[:, None]).T @ xb + lam * np.eye(d + 1)
            step = np.linalg.solve(hess, grad)
        size, accepted = 1.0, False
        while size > 1e-4:  # damped Newton: halve the step until the objective decreases
            trial = coef - size * step
            value = objective(trial)
            if value <= current:
                accepted = True
                break
            size /= 2
        if not accepted:
            break
        coef, improvement, current = trial, current - value, value
        if improvement < 1e-10 * max(1.0, abs(current)):
            break
    theta = center + (xb.T @ coef if gram is not None else coef)
    return torch.from_numpy(theta[:-1].copy()), float(theta[-1])


def _one_blas_thread() -> contextlib.AbstractContextManager[Any]:
    """These problems are small: threaded BLAS only adds overhead (badly so on a busy machine).
    Limited with threadpoolctl where it is installed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _np(t: Any) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return np.asarray(t.detach().cpu().double().numpy(), dtype=np.float64)
    return np.asarray(t, dtype=np.float64)


def _expit(z: np.ndarray) -> np.ndarray:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * z)))


def choose_l2(x: Any, y: Any, prior: Any, grid: Sequence[float] = L2_GRID) -> float:
    """The shrinkage strength with the lowest 5-fold cross-validated log-loss on the fitting
    data itself (on a fixed random subset of at most ``CHOOSE_MAX`` examples: ``lam`` is a
    prior precision, which does not scale with n); ``L2`` with under 2 of a class."""
    xs, ys = _np(x), _np(y).reshape(-1)
    if len(ys) > CHOOSE_MAX:
        keep = np.sort(np.random.default_rng(0).permutation(len(ys))[:CHOOSE_MAX])
        xs, ys = xs[keep], ys[keep]
    n = len(ys)
    folds = min(5, int(ys.sum()), int((1 - ys).sum()))
    if folds < 2:
        return L2
    order = np.concatenate([np.nonzero(ys > 0.5)[0], np.nonzero(ys <= 0.5)[0]])
    fold_of = np.empty(n, dtype=np.int64)
    fold_of[order] = np.arange(n) % folds
    best, best_loss = L2, math.inf
    for lam in grid:
        loss = 0.0
        for f in range(folds):
            test = fold_of == f
            w, b = fit_logistic(xs[~test], ys[~test], prior, lam=lam)
            p = np.clip(_expit(xs[test] @ w.numpy() + b), 1e-6, 1 - 1e-6)
            t = ys[test]
            loss -= float((t * np.log(p) + (1 - t) * np.log(1 - p)).sum())
        if loss < best_loss - 1e-9:
            best, best_loss = lam, loss
    return best


def _wordlike(token: str) -> bool:
    """A plausible word: Latin letters with a vowel (at most 20 characters), any non-Latin
    script (no vowel test there), or numbers and punctuation."""
    if re.fullmatch(r"[\W\d_]+", token):
        return True
    if any(c.isalpha() and ord(c) > 0x24F for c in token):
        return True
    return len(token) <= 20 and re.search(r"[aeiouyAEIOUY]", token) is not None


def coherence_score(question: str, answer: str) -> float:
    """Heuristic coherence in 0..100 (see module docstring)."""
    del question  # the heuristic judges the text alone
    text = answer.strip()
    words = [w.lower() for w in _WORD.findall(text)]
    if not words:
        return 0.0
    length = 0.3 if len(words) == 1 else 1.0
    trigrams = list(zip(words, words[1:], words[2:], strict=False))
    if len(trigrams) >= 4:
        distinct = len(set(trigrams)) / len(trigrams)
        repetition = min(1.0, max(0.0, (distinct - 0.3) / 0.5))
    else:
        repetition = 1.0
    run = longest = 1
    for a, b in itertools.pairwise(words):
        run = run + 1 if a == b else 1
        longest = max(longest, run)
    runs = 1.0 if longest <= 3 else max(0.0, 1.0 - 0.2 * (longest - 3))
    chars = [c for c in text if not c.isspace()]
    letters = sum(c.isalnum() for c in chars) / max(1, len(chars))
    alpha = min(1.0, max(0.0, (letters - 0.35) / 0.35))
    tokens = text.split()
    wordlike = sum(_wordlike(t) for t in tokens) / max(1, len(tokens))
    wordish = min(1.0, max(0.0, (wordlike - 0.5) / 0.4))
    return 100.0 * length * repetition * runs * alpha * wordish


class OfflineJudge:
    """Embedding classifier per trait (prior from the instructions, refined by ``fit``)."""

    def __init__(self, embedder: str = "auto", spec: str = "offline") -> None:
        self.spec = spec
        self._embedder_kind = embedder
        self._embedder: Embedder | None = None
        self._models: dict[str, TraitModel] = {}
        self._lock = threading.Lock()

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = load_embedder(self._embedder_kind)
        return self._embedder

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit embeddings, cached per process by (embedder, text): a run scores and fits on
        the same rollouts several times (cross-fitting), each time with a fresh judge."""
        embedder = self.embedder
        keyed = [(embedder.name, t if t.strip() else "(empty)") for t in texts]
        with _CACHE_LOCK:
            missing = list(dict.fromkeys(k for k in keyed if k not in _CACHE))
        if missing:
            fresh = embedder.encode([text for _, text in missing])
            with _CACHE_LOCK:
                for key, row in zip(missing, fresh, strict=True):
                    _CACHE[key] = row
                while len(_CACHE) > CACHE_SIZE:
                    _CACHE.popitem(last=False)
        with _CACHE_LOCK:
            rows = [_CACHE.get(k) for k in keyed]
        if any(r is None for r in rows):  # evicted meanwhile (a huge batch): encode directly
            return embedder.encode([text for _, text in keyed])
        if not rows:
            return torch.zeros(0, 1)
        return torch.stack([r for r in rows if r is not None])

    def _centroid(self, texts: Sequence[str]) -> torch.Tensor:
        mean = self.embed(texts).double().mean(0)
        return mean / mean.norm().clamp_min(1e-12)

    def model_for(self, trait: TraitDefinition) -> TraitModel:
        key = trait.content_hash()
        with self._lock:
            if key not in self._models:
                pos = self._centroid([p.pos for p in trait.instructions])
                neg = self._centroid([p.neg for p in trait.instructions])
                prior = PRIOR_SCALE * (pos - neg)
                self._models[key] = TraitModel(prior=prior, weight=prior.clone())
            return self._models[key]

    def trait_probabilities(self, trait: TraitDefinition, answers: Sequence[str]) -> list[float]:
        if not answers:
            return []
        return self.probabilities_of(trait, self.embed(answers))

    def probabilities_of(self, trait: TraitDefinition, embeddings: torch.Tensor) -> list[float]:
        """Trait probabilities for answers already embedded with :meth:`embed`."""
        return _sigmoid(self.model_for(trait).logits(embeddings)).tolist()

    def fit(
        self, trait: TraitDefinition, positives: Sequence[str], negatives: Sequence[str]
    ) -> TraitModel:
        """Refit the trait's scorer on labelled answers (pos: 1, neg: 0), shrunk to the prior.
        Each call replaces the previous fit; no answers resets the scorer to the prior."""
        if not positives and not negatives:
            return self.fit_embeddings(trait, torch.zeros(0, 1), torch.zeros(0))
        x = self.embed([*positives, *negatives])
        y = torch.tensor([1.0] * len(positives) + [0.0] * len(negatives))
        return self.fit_embeddings(trait, x, y)

    def fit_embeddings(
        self, trait: TraitDefinition, x: torch.Tensor, y: torch.Tensor
    ) -> TraitModel:
        """:meth:`fit` on embedded answers ``x`` with labels ``y`` (1 = shows the trait)."""
        model = self.model_for(trait)
        if len(y) == 0:
            weight, bias, lam, fitted = model.prior.clone(), 0.0, L2, False
        else:
            with _one_blas_thread():
                lam = choose_l2(x, y, model.prior)
                weight, bias = fit_logistic(x, y, model.prior, lam=lam)
            fitted = True
        with self._lock:
            model.weight, model.bias, model.fitted, model.l2 = weight, bias, fitted, lam
        return model

    def coherence(self, question: str, answer: str) -> float:
        value = coherence_score(question, answer)
        return 0.0 if math.isnan(value) else value


class OfflineJudgeAdapter:
    """``offline``: the embedding classifier of :mod:`persona_lens.judges.offline`."""

    learns_from_rollouts = True  # ``fit`` on the run's own pos/neg rollouts sharpens it

    def __init__(self, spec: str, embedder: str) -> None:
        self.spec = spec
        self.core = OfflineJudge(embedder, spec)

    def score_trait(self, trait: TraitDefinition, items: Sequence[JudgeItem]) -> list[JudgeScore]:
        probs = self.core.trait_probabilities(trait, [i.answer for i in items])
        return [JudgeScore(100.0 * p) for p in probs]

    def score_coherence(
        self, items: Sequence[JudgeItem], trait: TraitDefinition | None = None
    ) -> list[JudgeScore]:
        return [JudgeScore(self.core.coherence(i.question, i.answer)) for i in items]

    def fit(
        self,
        trait: TraitDefinition,
        positives: Sequence[JudgeItem],
        negatives: Sequence[JudgeItem],
    ) -> None:
        self.core.fit(trait, [i.answer for i in positives], [i.answer for i in negatives])

    def check(self) -> None:
        try:
            _ = self.core.embedder
        except Exception as exc:
            raise JudgeUnavailableError(f"offline judge: {exc}") from exc
