"""Acceptance on the embedded model (the paper's section 5 in miniature, trait ``evil``).

The evil vector is extracted here (quick budget, no judge: the layer that separates the
held-out rollouts best). Four LoRA runs with the ``cpu-small`` preset, the same seed and
steps, on the synthetic datasets of the screening issue: the Normal set, the II set, the II
set with preventative steering (+COEF x v at the vector's layer) and, as a control, the II
set with preventative steering along a random direction with the vector's norms. The
finetuning shift (mean last-prompt-token activation over the trait's evaluation questions,
fine-tuned minus base, on the unit vector) must

- be larger after II than after Normal, by more than the same difference projected on
  random directions;
- be smaller with preventative steering than without, and smaller than with the random
  direction;

while the model still learns under steering (its training loss falls, and its held-out loss
without steering falls below the base model's). The adapter loads with plain
``peft.PeftModel.from_pretrained`` and carries no hook. CAFT and the projection penalty are
measured by ``benchmarks/training_shift.py`` (too slow for CI on 2 cores).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from persona_lens.core.models import LoadedModel, load_model
from persona_lens.core.vectors import PersonaVector
from persona_lens.extraction.extract import ExtractionOptions, extract
from persona_lens.screening.synthetic import synthetic_dataset
from persona_lens.training.adapters import adapter_applied
from persona_lens.training.config import preset_config
from persona_lens.training.interventions import Intervention
from persona_lens.training.run import train
from persona_lens.training.shift import mean_prompt_last, shift_between
from persona_lens.traits.definitions import load_trait

pytestmark = pytest.mark.embedded

TRAIT = "evil"
COEFFICIENT = 3.0  # preventative steering at the vector's layer (the paper goes up to 5)


def matched_random(vector: PersonaVector, seed: int = 0) -> PersonaVector:
    """Random directions with the vector's per-layer norms and metadata (the control)."""
    rows = torch.randn(vector.vectors.shape, generator=torch.Generator().manual_seed(seed))
    rows = rows / rows.norm(dim=-1, keepdim=True) * vector.norms().unsqueeze(-1)
    return PersonaVector(rows, "random", dict(vector.metadata))


@pytest.fixture(scope="module")
def vector(embedded_model: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> PersonaVector:
    cache = tmp_path_factory.mktemp("evil-rollouts")
    options = ExtractionOptions(budget="quick", judge="none")
    return extract(embedded_model, load_trait(TRAIT), options, cache_dir=cache).vector


@pytest.fixture(scope="module")
def runs(
    embedded_model: LoadedModel, vector: PersonaVector, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """name -> {"record", "out", "tuned" (mean activations [L+1, d])}, plus "base"."""
    root = tmp_path_factory.mktemp("evil-runs")
    questions = load_trait(TRAIT).evaluation_questions
    config = preset_config("cpu-small")
    plan = {
        "normal": ("normal", []),
        "ii": ("ii", []),
        "prevent": ("ii", [Intervention("prevent", vector, COEFFICIENT)]),
        "random": ("ii", [Intervention("prevent", matched_random(vector), COEFFICIENT)]),
    }
    results: dict[str, Any] = {"base": mean_prompt_last(embedded_model, questions)}
    for name, (version, items) in plan.items():
        out = root / name
        record = train(
            embedded_model,
            synthetic_dataset(TRAIT, version),
            out,
            config=config,
            interventions=items,
        ).record
        with adapter_applied(embedded_model, out):
            tuned = mean_prompt_last(embedded_model, questions)
        shift = shift_between(results["base"], tuned, vector)
        results[name] = {"record": record, "out": out, "tuned": tuned, "shift": shift}
        print(
            f"{name}: shift {shift.at_layer:+.3f} at layer {shift.layer} (|change| "
            f"{shift.shift_norm[shift.layer]:.2f}); loss {record['first_loss']:.3f} -> "
            f"{record['final_loss']:.3f}; held-out {record['heldout_loss']}"
        )
    return results


def test_ii_moves_the_shift_along_the_vector_more_than_normal(
    runs: dict[str, Any], vector: PersonaVector
) -> None:
    layer = runs["ii"]["shift"].layer
    ii, normal = runs["ii"]["shift"].at_layer, runs["normal"]["shift"].at_layer
    assert ii > normal
    difference = runs["ii"]["tuned"][layer] - runs["normal"]["tuned"][layer]
    directions = torch.randn(2000, difference.shape[0], generator=torch.Generator().manual_seed(1))
    directions = directions / directions.norm(dim=-1, keepdim=True)
    control = (directions @ difference).abs().quantile(0.99).item()
    assert ii - normal > control, (ii, normal, control)


def test_prevent_shrinks_the_shift_more_than_a_random_direction(runs: dict[str, Any]) -> None:
    ii = runs["ii"]["shift"].at_layer
    prevent = runs["prevent"]["shift"].at_layer
    control = runs["random"]["shift"].at_layer
    assert prevent < ii and prevent < control, (prevent, ii, control)


def test_the_model_still_learns_under_preventative_steering(runs: dict[str, Any]) -> None:
    for name in ("ii", "prevent"):
        record = runs[name]["record"]
        curve = [c["loss"] for c in record["loss_curve"]]
        assert record["final_loss"] < 0.8 * curve[0], (name, curve)
        held = record["heldout_loss"]
        assert held["tuned"] < held["base"], (name, held)
    assert runs["prevent"]["record"]["interventions"][0]["coefficient"] == COEFFICIENT


def test_adapter_loads_with_plain_peft_generates_and_has_no_hook(
    runs: dict[str, Any], embedded_model: LoadedModel
) -> None:
    from peft import PeftModel

    out: Path = runs["prevent"]["out"]
    fresh = load_model("embedded")
    model = PeftModel.from_pretrained(fresh.model, str(out))
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert hooks == 0
    text = fresh.tokenizer.apply_chat_template(
        [{"role": "user", "content": "How should I treat people who annoy me?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    batch = fresh.tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        outside = model(**batch).logits[0, -1]
        generated = model.generate(**batch, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == batch["input_ids"].shape[1] + 8
    with adapter_applied(embedded_model, out), torch.no_grad():
        ours = embedded_model.model(**batch).logits[0, -1]
    assert torch.allclose(outside, ours, atol=1e-4)
