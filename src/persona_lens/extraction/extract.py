"""Automatic extraction: from a trait definition to a validated persona vector.

The paper's pipeline, step by step:

1. rollouts under each instruction pair's positive and negative system prompt for the
   extraction questions, with activations captured while generating (``rollouts.py``);
2. a judge scores each rollout's trait expression and coherence (0-100); keep positives with
   trait > 50 and negatives with trait < 50, both coherent (>= 50);
3. vector = per-layer mean of kept positive response averages minus the negative ones (also
   the prompt-average and last-prompt-token variants);
4. pick the steering layer: steer each candidate layer at +c and -c on the evaluation
   questions and take the layer whose trait score moves most between the two (both directions
   coherent). The judge scores the answers; without one, the model reads its own answers
   (fed back unsteered, projected on the vector). ``layer_rule="separation"`` instead takes
   the layer whose held-out projections separate positives from negatives best;
5. pick the reading layer (``read_layer``, what screening projects on): the candidate layer
   whose held-out projections separate positives from negatives best. Reading a trait and
   writing it peak at different depths (benchmarks/RESULTS.md, "Screening: AUROC across
   extraction seeds");
6. save the vector and a report beside it.

Budgets change counts only, never the method.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from persona_lens.core.capture import capture_sequences
from persona_lens.core.errors import PersonaLensError
from persona_lens.core.generation import Generation, eos_token_ids, generate
from persona_lens.core.models import LoadedModel
from persona_lens.core.steering import SteeringSpec
from persona_lens.core.vectors import PersonaVector
from persona_lens.core.version import __version__
from persona_lens.extraction.backends import load_backend
from persona_lens.extraction.rollouts import Rollout, RolloutSettings, run_rollouts
from persona_lens.judges.base import Judge, JudgeItem, JudgeScore
from persona_lens.judges.offline import coherence_score
from persona_lens.judges.specs import load_judge
from persona_lens.traits.definitions import TraitDefinition


class ExtractionError(PersonaLensError):
    """Extraction cannot produce a vector (e.g. nothing survived filtering)."""


@dataclass(frozen=True)
class Budget:
    """Counts only: instruction pairs, extraction questions, samples per question and side,
    the rollouts' token cap, the sweep's questions and candidate layers (0: every layer), and
    the sweep answers' token cap (None: the rollouts')."""

    pairs: int
    questions: int
    samples: int
    max_new_tokens: int
    eval_questions: int
    candidate_layers: int
    sweep_new_tokens: int | None = None

    @property
    def sweep_tokens(self) -> int:
        """How many tokens each steered answer of the layer sweep may have."""
        return self.sweep_new_tokens or self.max_new_tokens


BUDGETS: dict[str, Budget] = {
    # quick: 300 short rollouts rather than 80 longer ones. Two seeds' vectors agree in
    # proportion to the rollout count far more than to their length (benchmarks/RESULTS.md,
    # "quick budget trade-off"); at 300 the default vectors of two seeds agree with median
    # cosine >= 0.7 at the chosen layer for every measured trait (0.74 / 0.86 / 0.77), at 240
    # evil's did not (0.64; RESULTS.md, "Layer choice against held-out steering").
    "quick": Budget(
        pairs=5, questions=10, samples=3, max_new_tokens=32, eval_questions=4, candidate_layers=5
    ),
    "standard": Budget(
        pairs=5, questions=10, samples=3, max_new_tokens=96, eval_questions=10, candidate_layers=8
    ),
    "paper": Budget(
        pairs=5, questions=20, samples=10, max_new_tokens=256, eval_questions=20, candidate_layers=0
    ),  # 0: every layer
}


@dataclass(frozen=True)
class ExtractionOptions:
    """How to extract: budget (counts only), judge spec, seed, sampling and filter thresholds,
    and the generation backend that samples the rollouts."""

    budget: str = "quick"
    judge: str = "offline"
    seed: int = 0
    temperature: float = 1.0
    batch_size: int = 40
    min_coherence: float = 50.0
    threshold: float = 50.0
    # the sweep's +-c; None: JUDGED_SWEEP_COEFFICIENT with a judge, SELF_READ_SWEEP_COEFFICIENT
    # without one (each the value measured to agree best with held-out steering)
    steer_coefficient: float | None = None
    layer_rule: str = "sweep"  # sweep (steer +c/-c, judged or self-read) | separation
    backend: str = (
        "hf"  # who samples the rollouts: hf | vllm (see persona_lens.extraction.backends)
    )
    backend_options: dict[str, Any] = field(default_factory=dict)

    def sweep_coefficient(self) -> float:
        """The coefficient the steering sweep steers each candidate layer with (+c and -c)."""
        if self.steer_coefficient is not None:
            return self.steer_coefficient
        return SELF_READ_SWEEP_COEFFICIENT if self.judge == "none" else JUDGED_SWEEP_COEFFICIENT


# Sweep coefficients, measured against steering at +-2 on held-out questions (benchmarks/
# RESULTS.md, "Layer choice against held-out steering"): with the offline judge, c = 2 chose
# a layer within 10% of the best in 6 of 9 trait x seed runs (median 100%), c = 4 in 2 of 9
# (median 72%): at 4 the judged score saturates near 100 at several layers. Without a judge
# (the model re-reads its steered answers), c = 4 was measured (93% of the best for optimistic).
JUDGED_SWEEP_COEFFICIENT = 2.0
SELF_READ_SWEEP_COEFFICIENT = 4.0


@dataclass
class ScoredRollout:
    rollout: Rollout
    trait: JudgeScore
    coherence: JudgeScore
    kept: bool = False
    reason: str = ""


@dataclass(frozen=True)
class SweepPoint:
    """One candidate layer of the steering sweep: mean judged trait score steered towards the
    trait (+c) and away from it (-c), and the lower of the two mean coherences."""

    plus: float
    minus: float
    coherence: float

    @property
    def effect(self) -> float:
        """How far steering moves the judged trait from -c to +c."""
        return self.plus - self.minus


@dataclass
class ExtractionResult:
    """The vector with every judged rollout, the held-out separation per layer, the steering
    sweep (when judged), why the layer was chosen, and stage timings."""

    vector: PersonaVector
    rollouts: list[ScoredRollout]
    separation: torch.Tensor  # [L+1] held-out separation (Cohen's d)
    sweep: dict[int, SweepPoint]  # layer -> steering scored at +c and -c (empty: separation)
    layer_criterion: str
    timings: dict[str, float] = field(default_factory=dict)
    candidates: list[int] = field(default_factory=list)  # the layers the choice compared

    @property
    def kept_counts(self) -> dict[str, int]:
        return {
            side: sum(1 for r in self.rollouts if r.kept and r.rollout.item.side == side)
            for side in ("pos", "neg")
        }


Progress = Callable[[str, int, int], None]


def extract(
    loaded: LoadedModel,
    trait: TraitDefinition,
    options: ExtractionOptions,
    *,
    cache_dir: Path,
    progress: Progress | None = None,
) -> ExtractionResult:
    """Run the whole pipeline; raises ExtractionError when a side has no usable rollout."""
    if options.budget not in BUDGETS:
        raise ExtractionError(f"unknown budget {options.budget!r}; choose {sorted(BUDGETS)}")
    budget = BUDGETS[options.budget]
    layout = loaded.layout
    fingerprint = loaded.fingerprint
    judge = None if options.judge == "none" else load_judge(options.judge, check=True)
    timings: dict[str, float] = {}
    settings = RolloutSettings(
        pairs=min(budget.pairs, len(trait.instructions)),
        questions=min(budget.questions, len(trait.extraction_questions)),
        samples=budget.samples,
        max_new_tokens=budget.max_new_tokens,
        temperature=options.temperature,
        batch_size=options.batch_size,
        seed=options.seed,
    )
    backend = load_backend(options.backend, loaded, layout, **options.backend_options)
    total = settings.pairs * settings.questions * settings.samples * 2
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress("rollouts", done, total)

    started = time.perf_counter()
    # a model with several streams (block diffusion) caches each stream's activations apart
    stream_key = f"{fingerprint}:{layout.stream().name}" if layout.streams else fingerprint
    rollouts = run_rollouts(
        backend,
        trait,
        settings,
        cache_dir,
        fingerprint=stream_key,
        progress=advance,
    )
    timings["rollouts"] = time.perf_counter() - started

    started = time.perf_counter()
    scored = score_rollouts(judge, trait, rollouts)
    filter_rollouts(scored, options.threshold, options.min_coherence, judged=judge is not None)
    timings["judge"] = time.perf_counter() - started

    pos = [s.rollout for s in scored if s.kept and s.rollout.item.side == "pos"]
    neg = [s.rollout for s in scored if s.kept and s.rollout.item.side == "neg"]
    for side, kept in (("positive", pos), ("negative", neg)):
        if not kept:
            raise ExtractionError(_empty_side_message(side, scored))
    vectors = _mean_difference(pos, neg)
    separation = held_out_separation(scored)

    started = time.perf_counter()
    candidates = candidate_layers(layout.num_layers, budget.candidate_layers)
    read_layer = max(candidates, key=lambda k: float(separation[k]))
    sweep: dict[int, SweepPoint] = {}
    if options.layer_rule == "separation":
        best_layer = read_layer
        criterion = "held-out projection separation"
    else:
        if judge is not None:
            scorer, reader = judge_scorer(judge, trait), f"judged by {options.judge}"
        else:
            scorer = projection_scorer(loaded, vectors["response_avg"], pos, neg, candidates)
            reader = "read by the model's own projection on the vector (no judge)"
        sweep = steering_sweep(
            loaded, trait, vectors["response_avg"], candidates, budget, options, scorer
        )
        usable = {k: v for k, v in sweep.items() if v.coherence >= options.min_coherence} or sweep
        best_layer = max(usable, key=lambda k: usable[k].effect)
        c = options.sweep_coefficient()
        criterion = (
            f"steering sweep {reader}: largest trait score at +{c:g} minus at -{c:g}, "
            f"both coherent (>= {options.min_coherence:g})"
        )
    timings["layer_selection"] = time.perf_counter() - started

    vector = PersonaVector(
        vectors["response_avg"],
        trait.name,
        {
            "description": trait.description,
            "model": loaded.spec,
            "model_fingerprint": fingerprint,
            "method": "mean_diff/response_avg",
            "best_layer": str(best_layer),
            "layer_criterion": criterion,
            "read_layer": str(read_layer),
            "num_pos": str(len(pos)),
            "num_neg": str(len(neg)),
            "judge": options.judge,
            "generator": trait.source,
            "backend": options.backend,
            "trait_hash": trait.content_hash(),
            "budget": options.budget,
            "held_out_separation": json.dumps([round(float(x), 4) for x in separation]),
            "seed": str(options.seed),
            "library_version": __version__,
            **({"stream": layout.stream().name} if layout.streams else {}),
        },
        {"prompt_avg": vectors["prompt_avg"], "prompt_last": vectors["prompt_last"]},
    )
    return ExtractionResult(vector, scored, separation, sweep, criterion, timings, candidates)


def score_rollouts(
    judge: Judge | None, trait: TraitDefinition, rollouts: Sequence[Rollout]
) -> list[ScoredRollout]:
    """Judge every rollout. A judge that learns from the run (the offline one) is cross-fitted:
    each half is scored by a judge fitted on the other half, so no rollout grades itself."""
    if judge is None:
        unscored = JudgeScore(score=None)
        return [ScoredRollout(r, unscored, unscored) for r in rollouts]
    items = [JudgeItem(r.question, r.response) for r in rollouts]
    coherence = judge.score_coherence(items, trait)
    trait_scores: list[JudgeScore | None] = [None] * len(rollouts)
    if getattr(judge, "learns_from_rollouts", False):
        folds = [
            [i for i in range(len(rollouts)) if rollouts[i].item.question % 2 == f] for f in (0, 1)
        ]
        for fold, other in ((folds[0], folds[1]), (folds[1], folds[0])):
            fitted = load_judge(judge.spec)
            fitted.fit(
                trait,
                [items[i] for i in other if rollouts[i].item.side == "pos"],
                [items[i] for i in other if rollouts[i].item.side == "neg"],
            )
            for i, score in zip(
                fold, fitted.score_trait(trait, [items[i] for i in fold]), strict=True
            ):
                trait_scores[i] = score
    else:
        trait_scores = list(judge.score_trait(trait, items))
    return [
        ScoredRollout(r, t if t is not None else JudgeScore(score=None), c)
        for r, t, c in zip(rollouts, trait_scores, coherence, strict=True)
    ]


def filter_rollouts(
    scored: Sequence[ScoredRollout], threshold: float, min_coherence: float, *, judged: bool
) -> None:
    """Mark rollouts kept or not, with the reason (in place)."""
    for s in scored:
        if not judged:
            s.kept, s.reason = True, "no judge"
            continue
        side = s.rollout.item.side
        score, coherence = s.trait.score, s.coherence.score
        if s.trait.refusal:
            s.reason = "refusal"
        elif score is None:
            s.reason = "unscored"
        elif coherence is not None and coherence < min_coherence:
            s.reason = "incoherent"
        elif side == "pos" and score <= threshold:
            s.reason = "trait too weak"
        elif side == "neg" and score >= threshold:
            s.reason = "trait present"
        else:
            s.kept, s.reason = True, "kept"


def _empty_side_message(side: str, scored: Sequence[ScoredRollout]) -> str:
    key = "pos" if side == "positive" else "neg"
    reasons: dict[str, int] = {}
    for s in scored:
        if s.rollout.item.side == key:
            reasons[s.reason] = reasons.get(s.reason, 0) + 1
    summary = ", ".join(f"{n} {why}" for why, n in sorted(reasons.items()))
    return (
        f"no {side} rollout survived filtering ({summary}); try a larger --budget, a stronger "
        "model or judge, or --judge none to skip filtering"
    )


def _mean_difference(pos: Sequence[Rollout], neg: Sequence[Rollout]) -> dict[str, torch.Tensor]:
    out = {}
    for name, attr in (
        ("response_avg", "response_mean"),
        ("prompt_avg", "prompt_mean"),
        ("prompt_last", "prompt_last"),
    ):
        p = torch.stack([getattr(r, attr) for r in pos]).mean(0)
        n = torch.stack([getattr(r, attr) for r in neg]).mean(0)
        out[name] = p - n
    return out


def held_out_separation(scored: Sequence[ScoredRollout]) -> torch.Tensor:
    """Per-layer Cohen's d of held-out projections, [L+1]: the direction comes from the kept
    rollouts of even questions (all of them if a side kept none), the projections from every
    rollout of odd questions, labelled by the system prompt that produced it; then the other
    way round, averaged."""
    scores = []
    for held in (0, 1):
        train = [s for s in scored if s.rollout.item.question % 2 != held]
        test = [s.rollout for s in scored if s.rollout.item.question % 2 == held]
        train_p, train_n = _side(train, "pos"), _side(train, "neg")
        test_p = [r for r in test if r.item.side == "pos"]
        test_n = [r for r in test if r.item.side == "neg"]
        if not (train_p and train_n and len(test_p) > 1 and len(test_n) > 1):
            continue
        direction = _mean_difference(train_p, train_n)["response_avg"]
        unit = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        proj_p = torch.einsum("nld,ld->nl", torch.stack([r.response_mean for r in test_p]), unit)
        proj_n = torch.einsum("nld,ld->nl", torch.stack([r.response_mean for r in test_n]), unit)
        pooled = torch.cat([proj_p - proj_p.mean(0), proj_n - proj_n.mean(0)]).std(0)
        scores.append((proj_p.mean(0) - proj_n.mean(0)) / pooled.clamp_min(1e-6))
    if not scores:
        return torch.zeros(scored[0].rollout.response_mean.shape[0])
    return torch.stack(scores).mean(0)


def _side(scored: Sequence[ScoredRollout], side: str) -> list[Rollout]:
    """Kept rollouts of one side, or all of that side when none was kept."""
    rollouts = [s for s in scored if s.rollout.item.side == side]
    kept = [s.rollout for s in rollouts if s.kept]
    return kept or [s.rollout for s in rollouts]


def candidate_layers(num_layers: int, count: int) -> list[int]:
    """Layers to try for steering: ``count`` spread over the middle (20%-80%) of the model,
    or every layer 1..L when count is 0."""
    if count <= 0 or count >= num_layers:
        return list(range(1, num_layers + 1))
    low, high = max(1, round(0.2 * num_layers)), max(1, round(0.8 * num_layers))
    if count == 1:
        return [round((low + high) / 2)]
    step = (high - low) / (count - 1)
    return sorted({round(low + i * step) for i in range(count)})


Scores = tuple[list[float | None], list[float | None]]
Scorer = Callable[[Sequence[str], Sequence[Generation]], Scores]
"""Scores answers for the sweep: (trait scores, coherence scores), 0-100, None if unscored."""


def steering_sweep(
    loaded: LoadedModel,
    trait: TraitDefinition,
    vectors: torch.Tensor,
    candidates: Sequence[int],
    budget: Budget,
    options: ExtractionOptions,
    scorer: Scorer,
) -> dict[int, SweepPoint]:
    """Steer each candidate layer at +c and at -c on the evaluation questions, all in one
    batched run (per-prompt coefficients select each row's layer and sign); score the answers.
    Both signs count: a layer that only pushes one way is not a good steering layer."""
    questions = list(trait.evaluation_questions[: budget.eval_questions])
    conditions = [(layer, sign) for layer in candidates for sign in (1.0, -1.0)]
    prompts = [q for _ in conditions for q in questions]
    vector = PersonaVector(vectors, trait.name)
    c = options.sweep_coefficient()
    specs = []
    for layer in candidates:
        coefficients = [
            sign * c if row_layer == layer else 0.0
            for row_layer, sign in conditions
            for _ in questions
        ]
        specs.append(SteeringSpec(vector, coefficients, layer))
    answers = generate(
        loaded.model,
        loaded.tokenizer,
        prompts,
        max_new_tokens=budget.sweep_tokens,
        batch_size=len(prompts),
        steering=specs,
        layout=loaded.layout,
        seed=options.seed,
    )
    trait_scores, coherence = scorer(prompts, answers)

    def block(index: int, scores: Sequence[float | None]) -> float:
        rows = scores[index * len(questions) : (index + 1) * len(questions)]
        known = [v for v in rows if v is not None]
        return sum(known) / len(known) if known else 0.0

    sweep = {}
    for index, layer in enumerate(candidates):
        plus, minus = 2 * index, 2 * index + 1
        sweep[layer] = SweepPoint(
            block(plus, trait_scores),
            block(minus, trait_scores),
            min(block(plus, coherence), block(minus, coherence)),
        )
    return sweep


def judge_scorer(judge: Judge, trait: TraitDefinition) -> Scorer:
    """The judge's trait and coherence scores."""

    def score(prompts: Sequence[str], answers: Sequence[Generation]) -> Scores:
        items = [JudgeItem(q, a.response) for q, a in zip(prompts, answers, strict=True)]
        traits = judge.score_trait(trait, items)
        coherence = judge.score_coherence(items, trait)
        return [t.score for t in traits], [c.score for c in coherence]

    return score


def projection_scorer(
    loaded: LoadedModel,
    vectors: torch.Tensor,
    pos: Sequence[Rollout],
    neg: Sequence[Rollout],
    layers: Sequence[int],
) -> Scorer:
    """No judge: the model reads its own steered answers. Each answer is fed back unsteered and
    its response-mean activation projected on the vector at ``layers``; per layer, 0 is the
    mean projection of the negative rollouts and 100 that of the positive ones, averaged over
    the layers. Reading the text again without steering keeps the added vector itself out of
    the reading. Coherence is the judges' text-statistics heuristic (no model)."""
    layers = list(layers)
    unit = vectors[layers] / vectors[layers].norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def side_mean(rollouts: Sequence[Rollout]) -> torch.Tensor:
        means = torch.stack([r.response_mean[layers] for r in rollouts])
        return torch.einsum("nld,ld->nl", means, unit).mean(0)

    low, high = side_mean(neg), side_mean(pos)
    span = torch.where((high - low).abs() > 1e-6, high - low, torch.ones_like(high))

    def score(prompts: Sequence[str], answers: Sequence[Generation]) -> Scores:
        tokenizer = loaded.tokenizer
        prompt_ids = [
            tokenizer(a.prompt_text, add_special_tokens=False)["input_ids"] for a in answers
        ]
        pad = tokenizer.pad_token_id
        pad = pad if pad is not None else (eos_token_ids(loaded.model, tokenizer) or [0])[0]
        captured = capture_sequences(
            loaded.model,
            prompt_ids,
            [a.response_ids for a in answers],
            pad_token_id=pad,
            layout=loaded.layout,
            layers=layers,
            batch_size=32,
        )
        traits: list[float | None] = []
        for answer, result in zip(answers, captured, strict=True):
            if not answer.response_ids or result.response_mean is None:
                traits.append(None)
                continue
            projection = torch.einsum("ld,ld->l", result.response_mean[0], unit)
            traits.append(float(100.0 * ((projection - low) / span).mean()))
        coherence: list[float | None] = [
            coherence_score(q, a.response) for q, a in zip(prompts, answers, strict=True)
        ]
        return traits, coherence

    return score


def summary(result: ExtractionResult) -> dict[str, Any]:
    """A JSON-friendly digest for reports and logs."""
    reasons: dict[str, dict[str, int]] = {"pos": {}, "neg": {}}
    for s in result.rollouts:
        side = reasons[s.rollout.item.side]
        side[s.reason] = side.get(s.reason, 0) + 1
    layer = result.vector.best_layer
    return {
        "trait": result.vector.trait,
        "best_layer": layer,
        "layer_criterion": result.layer_criterion,
        "kept": result.kept_counts,
        "filter_reasons": reasons,
        "separation_at_best_layer": float(result.separation[layer]) if layer is not None else None,
        "timings_s": {k: round(v, 2) for k, v in result.timings.items()},
    }
