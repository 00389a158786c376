"""The paper's trait-expression score, with and without steering, and coefficient sweeps.

Trait-expression score: the mean judged trait score (0-100) over a trait's evaluation
questions x N sampled rollouts; coherence is averaged the same way. Refusals and answers the
judge could not score are counted, not averaged.

Every condition (baseline, steered, each sweep coefficient) runs in ONE batched ``generate``
call: each steering spec gets a per-prompt coefficient list, so a row's coefficients select its
condition, and conditions with the same coefficients share their rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from persona_lens.core.errors import InputError
from persona_lens.core.files import OutputTarget, atomic_write, atomic_write_text, check_output
from persona_lens.core.generation import PromptLike, generate
from persona_lens.core.steering import SteeringSpec
from persona_lens.traits.definitions import TraitDefinition

if TYPE_CHECKING:
    from torch import nn

    from persona_lens.core.architecture import BlockLayout
    from persona_lens.judges.base import Judge, JudgeItem, JudgeScore

Advance = Callable[[int], None]
FIT_QUESTIONS = 6
"""Extraction questions answered under each side to fit a learning judge."""


@dataclass(frozen=True)
class EvalSettings:
    """Counts and sampling; ``questions`` caps the trait's evaluation questions (20)."""

    questions: int = 20
    samples: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    seed: int = 0
    batch_size: int = 32

    def check(self) -> None:
        if self.questions < 1 or self.samples < 1 or self.max_new_tokens < 1:
            raise InputError("questions, samples and max-new-tokens must be at least 1")
        if self.batch_size < 1:
            raise InputError("batch size must be at least 1")
        if self.temperature < 0:
            raise InputError("temperature must be 0 (greedy) or positive")


@dataclass(frozen=True)
class Condition:
    """A named setting of the steering specs: one coefficient per spec, in order."""

    name: str
    coefficients: tuple[float, ...]


@dataclass
class Sample:
    """One judged rollout."""

    question: str
    response: str
    trait: float | None
    coherence: float | None
    refusal: bool


@dataclass
class ConditionResult:
    condition: Condition
    samples: list[Sample] = field(default_factory=list)

    @property
    def trait_score(self) -> float | None:
        return _mean([s.trait for s in self.samples if not s.refusal])

    @property
    def coherence(self) -> float | None:
        return _mean([s.coherence for s in self.samples if not s.refusal])

    @property
    def refusals(self) -> int:
        return sum(s.refusal for s in self.samples)

    def summary(self) -> dict[str, Any]:
        scored = [s.trait for s in self.samples if not s.refusal and s.trait is not None]
        return {
            "trait_score": self.trait_score,
            "trait_std": _std(scored),
            "coherence": self.coherence,
            "n": len(self.samples),
            "scored": len(scored),
            "refusals": self.refusals,
            "unscored": sum(1 for s in self.samples if not s.refusal and s.trait is None),
        }


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return sum(kept) / len(kept) if kept else None


def _std(values: Sequence[float]) -> float | None:
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def judge_items(
    judge: Judge, trait: TraitDefinition, items: Sequence[JudgeItem]
) -> list[tuple[JudgeScore, JudgeScore]]:
    """(trait score, coherence score) for every item."""
    trait_scores = judge.score_trait(trait, items)
    coherence = judge.score_coherence(items, trait)
    if len(trait_scores) != len(items) or len(coherence) != len(items):
        raise InputError("the judge returned a different number of scores than answers")
    return list(zip(trait_scores, coherence, strict=True))


class Sampling(Protocol):
    """How answers are sampled: what EvalSettings and ExperimentSettings both carry."""

    @property
    def max_new_tokens(self) -> int: ...
    @property
    def temperature(self) -> float: ...
    @property
    def seed(self) -> int: ...
    @property
    def batch_size(self) -> int: ...


def contrast_answers(
    model: nn.Module,
    tokenizer: Any,
    layout: BlockLayout,
    trait: TraitDefinition,
    questions: Mapping[str, Sequence[str]],
    sampling: Sampling,
    *,
    pair: int = 0,
) -> dict[str, list[str]]:
    """Answers under instruction pair ``pair``'s system prompts: ``questions`` maps a side
    (``pos``/``neg``) to the questions to ask under it; one batched generate call, sampled as
    ``sampling`` says with its seed + 1 (so they differ from the run's own answers). Used for
    many-shot examples and to fit a learning judge."""
    instruction = trait.instructions[pair % len(trait.instructions)]
    sides = [(side, list(qs)) for side, qs in questions.items() if qs]
    if not sides:
        return {side: [] for side in questions}
    prompts: list[PromptLike] = [
        [{"role": "system", "content": getattr(instruction, side)}, {"role": "user", "content": q}]
        for side, qs in sides
        for q in qs
    ]
    generations = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=sampling.max_new_tokens,
        batch_size=sampling.batch_size,
        do_sample=sampling.temperature > 0,
        temperature=sampling.temperature if sampling.temperature > 0 else 1.0,
        seed=sampling.seed + 1,
        layout=layout,
    )
    answers: dict[str, list[str]] = {side: [] for side in questions}
    start = 0
    for side, qs in sides:
        answers[side] = [g.response for g in generations[start : start + len(qs)]]
        start += len(qs)
    return answers


def judge_learns(judge: Judge) -> bool:
    """Whether the judge learns from contrastive examples (``learns_from_rollouts``; without
    that attribute: the offline embedding judge, whose prior a fit sharpens)."""
    learns = getattr(judge, "learns_from_rollouts", None)
    if learns is None:
        return str(getattr(judge, "spec", "")).split(":")[0].strip().lower() == "offline"
    return bool(learns)


def fit_judge(
    judge: Judge,
    trait: TraitDefinition,
    questions: Sequence[str],
    positives: Sequence[str],
    negatives: Sequence[str],
) -> None:
    """Fit a learning judge on answers to ``questions`` given under the trait's pos and neg
    instructions (answers pair with questions in order)."""
    from persona_lens.judges.base import JudgeItem

    judge.fit(
        trait,
        [JudgeItem(q, a) for q, a in zip(questions, positives, strict=False)],
        [JudgeItem(q, a) for q, a in zip(questions, negatives, strict=False)],
    )


def calibrate_judge(
    judge: Judge,
    model: nn.Module,
    tokenizer: Any,
    layout: BlockLayout,
    trait: TraitDefinition,
    settings: EvalSettings,
    *,
    questions: int = FIT_QUESTIONS,
) -> None:
    """Fit a learning judge (the offline one) on pos/neg answers to extraction questions, which
    never overlap the evaluation questions; a no-op for other judges."""
    if not judge_learns(judge):
        return
    chosen = list(trait.extraction_questions[:questions])
    answers = contrast_answers(
        model, tokenizer, layout, trait, {"pos": chosen, "neg": chosen}, settings
    )
    fit_judge(judge, trait, chosen, answers["pos"], answers["neg"])


def run_conditions(
    model: nn.Module,
    tokenizer: Any,
    layout: BlockLayout,
    judge: Judge,
    trait: TraitDefinition,
    specs: Sequence[SteeringSpec],
    conditions: Sequence[Condition],
    settings: EvalSettings,
    *,
    progress: Advance | None = None,
) -> list[ConditionResult]:
    """Generate and judge every condition in one batched generate call.

    ``specs`` are templates (vector, layers, operator); their coefficients are replaced by
    per-prompt lists built from the conditions. Conditions with equal coefficients share rows.
    """
    settings.check()
    if not conditions:
        raise InputError("no conditions to evaluate")
    for c in conditions:
        if len(c.coefficients) != len(specs):
            raise InputError(
                f"condition {c.name!r} has {len(c.coefficients)} coefficients "
                f"for {len(specs)} steering specs"
            )
    questions = list(trait.evaluation_questions[: settings.questions])
    unique: list[tuple[float, ...]] = []
    for c in conditions:
        if c.coefficients not in unique:
            unique.append(c.coefficients)
    per_block = len(questions) * settings.samples
    prompts = [q for _ in unique for q in questions for _ in range(settings.samples)]
    row_specs = [
        replace(spec, coefficient=[coefs[i] for coefs in unique for _ in range(per_block)])
        for i, spec in enumerate(specs)
    ]
    generations = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=settings.max_new_tokens,
        batch_size=settings.batch_size,
        do_sample=settings.temperature > 0,
        temperature=settings.temperature if settings.temperature > 0 else 1.0,
        seed=settings.seed,
        steering=row_specs,
        layout=layout,
        progress=progress,
    )
    from persona_lens.judges.base import JudgeItem

    items = [JudgeItem(q, g.response) for q, g in zip(prompts, generations, strict=True)]
    scores = judge_items(judge, trait, items)
    samples = [
        Sample(item.question, item.answer, t.score, c.score, t.refusal)
        for item, (t, c) in zip(items, scores, strict=True)
    ]
    results = []
    for c in conditions:
        block = unique.index(c.coefficients)
        results.append(ConditionResult(c, samples[block * per_block : (block + 1) * per_block]))
    return results


# --- the eval command's report ----------------------------------------------------------------
@dataclass
class ModelResult:
    """Another version of the model (e.g. a fine-tuned adapter) under the same conditions."""

    name: str
    baseline: ConditionResult
    steered: ConditionResult | None = None


@dataclass
class EvalReport:
    """Baseline (no steering), steered (all --steer specs) and sweep results, and the same
    baseline/steered conditions for other versions of the model (``models``)."""

    trait: str
    baseline: ConditionResult
    steered: ConditionResult | None = None
    sweep: list[tuple[float, ConditionResult]] = field(default_factory=list)
    sweep_vector: str | None = None
    sweep_layer: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    models: list[ModelResult] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        samples = []
        seen: set[int] = set()
        results = [self.baseline, *([self.steered] if self.steered else [])]
        results += [r for _, r in self.sweep]
        for result in results:
            for s in result.samples:
                if id(s) in seen:  # shared rows (e.g. sweep coefficient 0 = baseline)
                    continue
                seen.add(id(s))
                samples.append({"condition": result.condition.name, **s.__dict__})
        for model in self.models:
            for result in (model.baseline, *([model.steered] if model.steered else [])):
                samples += [
                    {"model": model.name, "condition": result.condition.name, **s.__dict__}
                    for s in result.samples
                ]
        return {
            "trait": self.trait,
            **self.metadata,
            "baseline": self.baseline.summary(),
            "steered": self.steered.summary() if self.steered else None,
            "sweep": (
                {
                    "vector": self.sweep_vector,
                    "layer": self.sweep_layer,
                    "points": [{"coefficient": c, **r.summary()} for c, r in self.sweep],
                }
                if self.sweep
                else None
            ),
            "models": [
                {
                    "name": m.name,
                    "baseline": m.baseline.summary(),
                    "steered": m.steered.summary() if m.steered else None,
                }
                for m in self.models
            ],
            "samples": samples,
        }

    def markdown(self, plot: Path | None = None) -> str:
        lines = [f"# Trait expression: {self.trait}", ""]
        for key in ("model", "judge", "settings", "steering"):
            if self.metadata.get(key):
                lines.append(f"- {key}: `{self.metadata[key]}`")
        lines += [
            "",
            "| condition | trait score | coherence | n | refusals |",
            "|---|---|---|---|---|",
        ]
        for result in [self.baseline, *([self.steered] if self.steered else [])]:
            lines.append(_row(result.condition.name, result))
        if self.models:
            lines += [
                "",
                "## Models",
                "",
                "| model | condition | trait score | coherence | n | refusals |",
                "|---|---|---|---|---|---|",
            ]
            rows = [("base", self.baseline, self.steered)]
            rows += [(m.name, m.baseline, m.steered) for m in self.models]
            for name, baseline, steered in rows:
                for result in (baseline, *([steered] if steered else [])):
                    lines.append(f"| {name} " + _row(result.condition.name, result))
        if self.sweep:
            lines += [
                "",
                f"## Coefficient sweep: `{self.sweep_vector}` at layer {self.sweep_layer}",
                "",
                "| coefficient | trait score | coherence | n | refusals |",
                "|---|---|---|---|---|",
            ]
            lines += [_row(f"{c:g}", r) for c, r in self.sweep]
            if plot is not None:
                lines += ["", f"![sweep]({plot.name})"]
        return "\n".join(lines) + "\n"

    def plot_sweep(self, path: Path) -> Path:
        """Trait score and coherence vs coefficient (PNG, Agg backend)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        coefs = [c for c, _ in self.sweep]
        nan = float("nan")
        trait = [r.trait_score if r.trait_score is not None else nan for _, r in self.sweep]
        coherence = [r.coherence if r.coherence is not None else nan for _, r in self.sweep]
        fig, ax = plt.subplots(figsize=(5.2, 3.6))
        ax.plot(coefs, trait, marker="o", label=f"{self.trait} score")
        ax.plot(coefs, coherence, marker="s", label="coherence")
        ax.set(
            xlabel="steering coefficient",
            ylabel="judge score (0-100)",
            ylim=(-3, 103),
            title=f"{self.trait}: sweep at layer {self.sweep_layer}",
        )
        ax.axvline(0, color="gray", linewidth=0.8)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
        plt.close(fig)
        return path


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _row(name: str, r: ConditionResult) -> str:
    cells = [name, _fmt(r.trait_score), _fmt(r.coherence), str(len(r.samples)), str(r.refusals)]
    return "| " + " | ".join(cells) + " |"


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    layout: BlockLayout,
    judge: Judge,
    trait: TraitDefinition,
    settings: EvalSettings,
    *,
    steering: Sequence[SteeringSpec] = (),
    sweep: SteeringSpec | None = None,
    coefficients: Sequence[float] = (),
    progress: Advance | None = None,
) -> EvalReport:
    """Baseline, steered (if ``steering``) and a sweep of ``sweep`` over ``coefficients``, all
    in one generate call (sweep coefficient 0 reuses the baseline rows)."""
    specs = [*steering, *([sweep] if sweep is not None else [])]
    conditions, main = build_conditions(steering, sweep is not None, coefficients)
    calibrate_judge(judge, model, tokenizer, layout, trait, settings)
    results = run_conditions(
        model, tokenizer, layout, judge, trait, specs, conditions, settings, progress=progress
    )
    report = EvalReport(trait.name, results[0])
    if steering:
        report.steered = results[1]
    if sweep is not None:
        report.sweep = list(zip([float(c) for c in coefficients], results[main:], strict=True))
        report.sweep_vector = sweep.vector.trait
        layers = sweep.layers if sweep.layers is not None else sweep.vector.best_layer
        report.sweep_layer = layers if isinstance(layers, int) else None
    return report


def build_conditions(
    steering: Sequence[SteeringSpec], sweep: bool, coefficients: Sequence[float]
) -> tuple[list[Condition], int]:
    """Baseline, steered (with ``steering``) and one condition per sweep coefficient; the
    coefficient tuples follow the spec order ``[*steering, sweep]``. Also returns how many
    conditions come before the sweep."""
    if sweep and not coefficients:
        raise InputError("a sweep needs at least one coefficient")
    tail = (0.0,) if sweep else ()
    conditions = [Condition("baseline", (0.0,) * len(steering) + tail)]
    if steering:
        steered = tuple(_scalar(s.coefficient) for s in steering)
        conditions.append(Condition("steered", steered + tail))
    main = len(conditions)
    if sweep:
        conditions += [
            Condition(f"sweep {c:g}", (0.0,) * len(steering) + (float(c),)) for c in coefficients
        ]
    return conditions, main


def distinct_settings(conditions: Sequence[Condition]) -> int:
    """How many row blocks the conditions need (equal coefficients share one)."""
    return len({c.coefficients for c in conditions})


def _scalar(coefficient: Any) -> float:
    if not isinstance(coefficient, (int, float)):
        raise InputError("steering specs for eval need one coefficient, not a per-prompt list")
    return float(coefficient)


def parse_coefficients(text: str) -> list[float]:
    """``-2,-1,0,1,2`` -> floats; InputError on anything else."""
    values = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = float(part)
        except ValueError:
            raise InputError(
                f"--coefficients: {part!r} is not a number (e.g. -2,-1,0,1,2)"
            ) from None
        if not math.isfinite(value):
            raise InputError("--coefficients must be finite numbers")
        values.append(value)
    if len(set(values)) != len(values):
        raise InputError("--coefficients repeats a value")
    return values


def write_eval(report: EvalReport, out: Path) -> list[Path]:
    """Write ``out`` (JSON), ``<stem>.md`` and, with a sweep, ``<stem>.sweep.png``; into a
    stream (``-``, a FIFO), the JSON alone."""
    import json

    from persona_lens.interop.prompts_io import json_safe

    text = json.dumps(json_safe(report.to_json()), indent=2, ensure_ascii=False, allow_nan=False)
    if check_eval_output(out).stream:  # stdout or a FIFO: the JSON alone
        return [atomic_write_text(out, text + "\n", "--out")]
    stem = out.with_suffix("") if out.suffix else out
    written = []
    png = None
    if report.sweep:
        png = report.plot_sweep(Path(f"{stem}.sweep.png"))
        written.append(png)
    md = atomic_write_text(Path(f"{stem}.md"), report.markdown(png))
    written += [md, atomic_write_text(out, text + "\n")]
    return written


def check_eval_output(out: Path) -> OutputTarget:
    """Check ``--out`` and the ``.md``/``.png`` files beside it before any work (InputError).
    A stream (``-``, a FIFO) gets the JSON alone."""
    target = check_output(out, "--out")
    if target.stream:
        return target
    if out.suffix in (".md", ".png"):
        raise InputError(f"--out {out}: give a .json file (the .md and .png go beside it)")
    stem = out.with_suffix("") if out.suffix else out
    for beside in (Path(f"{stem}.md"), Path(f"{stem}.sweep.png")):
        check_output(beside, "--out")
    return target
