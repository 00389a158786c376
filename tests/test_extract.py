"""Extraction pipeline on a tiny model: determinism, resumability, filtering, layer choice."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import persona_lens.extraction.extract as extract_module
import persona_lens.extraction.rollouts as rollouts_module
from persona_lens.core.models import LoadedModel, prepare_tokenizer
from persona_lens.extraction.extract import (
    ExtractionError,
    ExtractionOptions,
    ScoredRollout,
    candidate_layers,
    extract,
    filter_rollouts,
)
from persona_lens.extraction.rollouts import Rollout, RolloutItem
from persona_lens.judges.base import JudgeItem, JudgeScore
from persona_lens.traits.definitions import TraitDefinition, load_trait
from tests.tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    tokenizer = prepare_tokenizer(tiny_tokenizer())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    return LoadedModel(model, tokenizer, "tiny", torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def trait() -> TraitDefinition:
    return load_trait("optimistic")


SMALL = extract_module.Budget(
    pairs=2, questions=4, samples=2, max_new_tokens=8, eval_questions=2, candidate_layers=3
)


@pytest.fixture(autouse=True)
def _small_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(extract_module.BUDGETS, "small", SMALL)


def _run(
    tiny: LoadedModel, trait: TraitDefinition, cache: Path, **kw: object
) -> extract_module.ExtractionResult:
    options = ExtractionOptions(budget="small", judge="none", batch_size=8, **kw)  # type: ignore[arg-type]
    return extract(tiny, trait, options, cache_dir=cache)


def test_same_seed_same_vector_and_cache_reuse(
    tiny: LoadedModel, trait: TraitDefinition, tmp_path: Path
) -> None:
    first = _run(tiny, trait, tmp_path / "a")
    again = _run(tiny, trait, tmp_path / "b")
    assert torch.equal(first.vector.vectors, again.vector.vectors)
    other_seed = _run(tiny, trait, tmp_path / "c", seed=1)
    assert not torch.equal(first.vector.vectors, other_seed.vector.vectors)
    assert first.vector.vectors.shape == (5, 64)
    assert set(first.vector.variants) == {"prompt_avg", "prompt_last"}
    assert first.kept_counts == {"pos": 16, "neg": 16}
    assert first.layer_criterion.startswith("steering sweep read by the model's own")
    assert set(first.sweep) == set(candidate_layers(4, 3))
    assert first.vector.best_layer in candidate_layers(4, 3)


def test_resume_after_interruption_gives_same_vector(
    tiny: LoadedModel, trait: TraitDefinition, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = _run(tiny, trait, tmp_path / "uninterrupted")
    real = rollouts_module._generate_batch
    calls = {"n": 0}

    def dies_on_third_batch(*args: object, **kwargs: object) -> list[Rollout]:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # like a kill in the middle of the run
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(rollouts_module, "_generate_batch", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny, trait, tmp_path / "resumed")
    batches = sorted(p.name for p in (tmp_path / "resumed").rglob("batch-*.jsonl"))
    assert batches == ["batch-0.jsonl", "batch-1.jsonl"]

    generated = {"n": 0}

    def counting(*args: object, **kwargs: object) -> list[Rollout]:
        generated["n"] += 1
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(rollouts_module, "_generate_batch", counting)
    resumed = _run(tiny, trait, tmp_path / "resumed")
    assert generated["n"] == 2  # 32 rollouts in batches of 8: 4 batches, 2 were cached
    assert torch.equal(resumed.vector.vectors, reference.vector.vectors)


def _scored(
    side: str, trait: float | None, coherence: float, refusal: bool = False
) -> ScoredRollout:
    zeros = torch.zeros(3, 4)
    rollout = Rollout(RolloutItem(side, 0, 0, 0), "sys", "q", "a", zeros, zeros, zeros, 1)
    return ScoredRollout(rollout, JudgeScore(trait, refusal), JudgeScore(coherence))


def test_filtering_rules_and_reasons() -> None:
    scored = [
        _scored("pos", 80, 90),
        _scored("pos", 40, 90),
        _scored("pos", 90, 20),
        _scored("pos", None, 90, refusal=True),
        _scored("neg", 10, 90),
        _scored("neg", 70, 90),
        _scored("neg", None, 90),
    ]
    filter_rollouts(scored, threshold=50, min_coherence=50, judged=True)
    assert [s.kept for s in scored] == [True, False, False, False, True, False, False]
    assert [s.reason for s in scored] == [
        "kept",
        "trait too weak",
        "incoherent",
        "refusal",
        "kept",
        "trait present",
        "unscored",
    ]


@dataclass
class FakeJudge:
    """Scores answers by length parity - deterministic and independent of the model."""

    spec: str = "fake"
    positive: bool = True
    learns_from_rollouts: bool = False

    def score_trait(self, trait: TraitDefinition, items: Sequence[JudgeItem]) -> list[JudgeScore]:
        return [JudgeScore(90.0 if self.positive else 10.0) for _ in items]

    def score_coherence(
        self, items: Sequence[JudgeItem], trait: TraitDefinition | None = None
    ) -> list[JudgeScore]:
        return [JudgeScore(80.0) for _ in items]

    def fit(self, trait: TraitDefinition, positives: object, negatives: object) -> None:
        return None


def test_empty_side_names_side_and_fix(
    tiny: LoadedModel, trait: TraitDefinition, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(extract_module, "load_judge", lambda spec, **kw: FakeJudge(positive=False))
    options = ExtractionOptions(budget="small", judge="fake", batch_size=40)
    with pytest.raises(
        ExtractionError,
        match=r"no positive rollout survived filtering \(16 trait too weak\).*--budget",
    ):
        extract(tiny, trait, options, cache_dir=tmp_path)


def test_judged_run_picks_layer_by_steering_sweep(
    tiny: LoadedModel, trait: TraitDefinition, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class SweepJudge(FakeJudge):
        def score_trait(
            self, trait: TraitDefinition, items: Sequence[JudgeItem]
        ) -> list[JudgeScore]:
            # rollouts: pos rows get 90, neg rows 10 (by the system prompt's question order we
            # cannot see here, so alternate); the sweep rows all score by position
            return [JudgeScore(90.0 if i % 2 == 0 else 10.0) for i in range(len(items))]

    monkeypatch.setattr(extract_module, "load_judge", lambda spec, **kw: SweepJudge())
    options = ExtractionOptions(budget="small", judge="fake", batch_size=40)
    result = extract(tiny, trait, options, cache_dir=tmp_path)
    assert result.sweep and set(result.sweep) == set(candidate_layers(4, 3))
    assert result.layer_criterion.startswith("steering sweep")
    assert result.vector.best_layer in result.sweep
    # the reading layer is the separation's choice, whatever the sweep chose
    best_separated = max(candidate_layers(4, 3), key=lambda k: float(result.separation[k]))
    assert result.vector.read_layer == best_separated


def test_sweep_counts_both_directions(
    tiny: LoadedModel, trait: TraitDefinition, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chosen layer moves the judged trait most from -c to +c: a layer that scores highest
    at +c but as high at -c (it raises the trait either way, or not at all) loses."""
    layers = candidate_layers(4, 3)
    questions = SMALL.eval_questions
    # sweep rows: blocks of `questions` rows per (layer, sign), signs + then -
    wanted = {layers[0]: (90.0, 85.0), layers[1]: (70.0, 20.0), layers[2]: (60.0, 50.0)}
    sweep_scores = [
        wanted[layer][sign] for layer in layers for sign in (0, 1) for _ in range(questions)
    ]

    class SweepJudge(FakeJudge):
        def score_trait(
            self, trait: TraitDefinition, items: Sequence[JudgeItem]
        ) -> list[JudgeScore]:
            if len(items) == len(sweep_scores):
                return [JudgeScore(v) for v in sweep_scores]
            return [JudgeScore(90.0 if i % 2 == 0 else 10.0) for i in range(len(items))]

    monkeypatch.setattr(extract_module, "load_judge", lambda spec, **kw: SweepJudge())
    options = ExtractionOptions(budget="small", judge="fake", batch_size=40)
    result = extract(tiny, trait, options, cache_dir=tmp_path)
    assert result.sweep[layers[0]].plus == 90.0 and result.sweep[layers[0]].minus == 85.0
    assert result.vector.best_layer == layers[1]
    assert "minus at -2" in result.layer_criterion  # a judge sweeps at +-2


def test_sweep_coefficient_depends_on_who_reads() -> None:
    """The measured defaults: +-2 when a judge scores the sweep, +-4 when the model re-reads
    its own answers; an explicit coefficient wins."""
    assert ExtractionOptions().sweep_coefficient() == 2.0
    assert ExtractionOptions(judge="none").sweep_coefficient() == 4.0
    assert ExtractionOptions(judge="none", steer_coefficient=3.0).sweep_coefficient() == 3.0


def test_sweep_answers_share_the_rollouts_cap_unless_set() -> None:
    assert SMALL.sweep_tokens == SMALL.max_new_tokens
    assert replace(SMALL, sweep_new_tokens=5).sweep_tokens == 5


def test_separation_rule_still_available(
    tiny: LoadedModel, trait: TraitDefinition, tmp_path: Path
) -> None:
    result = _run(tiny, trait, tmp_path, layer_rule="separation")
    assert result.layer_criterion.startswith("held-out") and not result.sweep
    best = max(candidate_layers(4, 3), key=lambda k: float(result.separation[k]))
    assert result.vector.best_layer == best


def test_candidate_layers() -> None:
    assert candidate_layers(30, 5) == [6, 10, 15, 20, 24]
    assert candidate_layers(30, 0) == list(range(1, 31))
    assert all(1 <= k <= 4 for k in candidate_layers(4, 5))
