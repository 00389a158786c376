"""Agreement of the offline judge with the hand-labelled responses in tests/data
(labelled_responses.jsonl).

Protocols (per trait; accuracy of score > 50 against the pos/neg label, Spearman with the hand
scores; overall = all 154 rows pooled):

* ``zero_shot``: the prior only - similarity to the trait's eliciting vs suppressing system
  prompts. No labelled response is used for anything.
* ``zero_shot_generated``: the same, for a definition written by the offline trait generator
  from the trait's name and one-line description (the path for a new trait with no network).
* ``rollouts``: the product path. The judge is fitted (``fit``) on the embedded SmolLM2's own
  answers to the trait's 20 *extraction* questions under the pos vs neg system prompts
  (benchmarks/data/judge_rollouts.jsonl, made by ``--make-rollouts``), then scores the labelled
  responses, which answer the trait's *evaluation* questions. No labelled response is used.
* ``cv``: leave-one-question-out cross-validation on the labelled set itself: each question's
  two responses are scored by a judge fitted (from the same prior) on the other ten questions'
  twenty responses of that trait. This measures what the classifier does with in-domain labels;
  it is not a zero-label figure.

Usage::

    python benchmarks/judge_agreement.py                 # writes benchmarks/judge_agreement.md
    python benchmarks/judge_agreement.py --embedder embedded
    python benchmarks/judge_agreement.py --make-rollouts # regenerate the SmolLM2 rollouts (slow)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from persona_lens.judges.agreement import (  # noqa: E402
    Row,
    agreement,
    leave_one_question_out,
    load_labelled,
)
from persona_lens.judges.offline import OfflineJudge  # noqa: E402
from persona_lens.traits.definitions import load_trait  # noqa: E402
from persona_lens.traits.generator import generate_trait  # noqa: E402

LABELLED = ROOT / "tests" / "data" / "labelled_responses.jsonl"
ROLLOUTS = ROOT / "benchmarks" / "data" / "judge_rollouts.jsonl"
REPORT = ROOT / "benchmarks" / "judge_agreement.md"
PROTOCOLS = ("zero_shot", "zero_shot_generated", "rollouts", "cv")


def make_rollouts(path: Path = ROLLOUTS, max_new_tokens: int = 64, seed: int = 0) -> None:
    """SmolLM2 answers to each trait's extraction questions, question i under instruction pair
    i % 5, once under ``pos`` and once under ``neg`` (sampled, temperature 1)."""
    from persona_lens.core.generation import generate
    from persona_lens.core.models import load_model

    loaded = load_model("embedded")
    traits = sorted({r["trait"] for r in load_labelled(LABELLED)})
    rows: list[dict[str, Any]] = []
    for trait_name in traits:
        started = time.perf_counter()
        trait = load_trait(trait_name)
        plan = [
            (side, i % 5, q)
            for i, q in enumerate(trait.extraction_questions)
            for side in ("pos", "neg")
        ]
        prompts = [
            {
                "messages": [
                    {"role": "system", "content": getattr(trait.instructions[pair], side)},
                    {"role": "user", "content": q},
                ]
            }
            for side, pair, q in plan
        ]
        outs = generate(
            loaded.model,
            loaded.tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            batch_size=20,
            do_sample=True,
            temperature=1.0,
            seed=seed,
            capture_layers=(),
        )
        for (side, pair, q), out in zip(plan, outs, strict=True):
            rows.append(
                {
                    "trait": trait_name,
                    "side": side,
                    "pair": pair,
                    "question": q,
                    "response": out.response,
                }
            )
        print(
            f"{trait_name}: {len(outs)} rollouts in {time.perf_counter() - started:.0f}s",
            flush=True,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def evaluate(embedder: str = "minilm", rollouts: Path | None = ROLLOUTS) -> dict[str, Any]:
    """Agreement figures for each protocol (``rollouts`` only when the rollout file exists)."""
    rows = load_labelled(LABELLED)
    judge = OfflineJudge(embedder)
    vectors = judge.embed([r["response"] for r in rows])
    index = {id(r): i for i, r in enumerate(rows)}

    def emb(subset: list[Row] | Any) -> torch.Tensor:
        return vectors[[index[id(r)] for r in subset]]

    def zero_shot(trait_name: str, subset: Any) -> list[float | None]:
        trait = load_trait(trait_name)
        judge.fit_embeddings(trait, torch.zeros(0, 1), torch.zeros(0))
        return [100.0 * p for p in judge.probabilities_of(trait, emb(subset))]

    def cross_validated(trait_name: str, subset: Any) -> list[float | None]:
        trait = load_trait(trait_name)

        def fold(train: Any, test: Any) -> list[float | None]:
            labels = torch.tensor([1.0 if r["label"] == "pos" else 0.0 for r in train])
            judge.fit_embeddings(trait, emb(train), labels)
            return [100.0 * p for p in judge.probabilities_of(trait, emb(test))]

        return leave_one_question_out(list(subset), fold)

    def zero_shot_generated(trait_name: str, subset: Any) -> list[float | None]:
        builtin = load_trait(trait_name)
        trait = generate_trait(trait_name, builtin.description, "offline")
        return [100.0 * p for p in judge.probabilities_of(trait, emb(subset))]

    results: dict[str, Any] = {
        "embedder": judge.embedder.name,
        "zero_shot": agreement(rows, zero_shot),
        "zero_shot_generated": agreement(rows, zero_shot_generated),
        "cv": agreement(rows, cross_validated),
    }
    if rollouts is not None and rollouts.is_file():
        made = load_labelled(rollouts)
        lambdas: dict[str, float] = {}

        def fitted_on_rollouts(trait_name: str, subset: Any) -> list[float | None]:
            trait = load_trait(trait_name)
            own = [r for r in made if r["trait"] == trait_name]
            model = judge.fit(
                trait,
                [r["response"] for r in own if r["side"] == "pos"],
                [r["response"] for r in own if r["side"] == "neg"],
            )
            lambdas[trait_name] = model.l2
            return [100.0 * p for p in judge.probabilities_of(trait, emb(subset))]

        results["rollouts"] = agreement(rows, fitted_on_rollouts)
        results["rollouts_l2"] = lambdas
    return results


def _table(result: dict[str, dict[str, float]]) -> list[str]:
    lines = ["| trait | n | accuracy | Spearman |", "| --- | ---: | ---: | ---: |"]
    for trait, s in result.items():
        name = f"**{trait}**" if trait == "overall" else trait
        lines.append(f"| {name} | {s['n']} | {s['accuracy']:.2f} | {s['spearman']:.2f} |")
    return lines


def write_report(all_results: list[dict[str, Any]], path: Path = REPORT) -> None:
    titles = {
        "zero_shot": "Zero-shot (prior from the trait's instructions; no labels used)",
        "zero_shot_generated": "Zero-shot with an offline-generated definition (name + the "
        "built-in one-line description through `generate_trait(..., 'offline')`)",
        "rollouts": "Fitted on SmolLM2 pos/neg rollouts of the extraction questions (product path)",
        "cv": "Leave-one-question-out cross-validation on the labelled set (uses labels)",
    }
    out = [
        "# Offline judge: agreement with the hand-labelled responses",
        "",
        "Written by `python benchmarks/judge_agreement.py`; protocols in that script's docstring.",
        "154 responses, 7 traits, 11 questions x (pos, neg) each. Accuracy: score > 50 vs label;",
        "Spearman: judge score vs hand score (ties averaged). Chance accuracy is 0.50.",
        "",
        "Reading: sentence embeddings carry topic more than stance or tone, so the offline judge",
        "is a fallback that runs anywhere, not a substitute for an LLM judge: it is usable for",
        "traits with distinctive content (evil, optimistic, apathetic, hallucinating) and near",
        "chance for tone (humorous, impolite). A prior built from an offline-generated",
        "definition, whose pos and neg prompts share the description, carries no trait signal;",
        "there the judge depends on `fit` with the run's own rollouts. SmolLM2-135M follows",
        "the system prompts only loosely, so its rollouts move the fit little; a larger model",
        "under study gives cleaner rollouts. The SmolLM2-state embedder (`offline:embedded`,",
        "the fallback when MiniLM is not installed) is weaker still.",
        "",
    ]
    for res in all_results:
        out.append(f"## Embedder: {res['embedder']}")
        out.append("")
        summary = ["| protocol | accuracy | Spearman |", "| --- | ---: | ---: |"]
        for key in PROTOCOLS:
            if key in res:
                o = res[key]["overall"]
                summary.append(f"| {key} | {o['accuracy']:.2f} | {o['spearman']:.2f} |")
        out += [*summary, ""]
        for key in PROTOCOLS:
            if key in res:
                out += [f"### {titles[key]}", "", *_table(res[key]), ""]
        if "rollouts_l2" in res:
            chosen = ", ".join(f"{k} {v:g}" for k, v in res["rollouts_l2"].items())
            out += [f"Shrinkage chosen by the fit's internal cross-validation: {chosen}.", ""]
    path.write_text("\n".join(out), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--embedder", action="append", choices=["minilm", "embedded"])
    parser.add_argument("--make-rollouts", action="store_true")
    parser.add_argument("--out", type=Path, default=REPORT)
    args = parser.parse_args()
    if args.make_rollouts:
        make_rollouts()
    results = []
    for embedder in args.embedder or ["minilm"]:
        started = time.perf_counter()
        res = evaluate(embedder)
        for key in PROTOCOLS:
            if key in res:
                o = res[key]["overall"]
                print(
                    f"{embedder} {key}: accuracy {o['accuracy']:.3f} spearman {o['spearman']:.3f}"
                )
        print(f"{embedder}: {time.perf_counter() - started:.0f}s")
        results.append(res)
    write_report(results, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
