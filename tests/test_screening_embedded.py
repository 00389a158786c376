"""Acceptance of data screening on the embedded model (SmolLM2-135M-Instruct).

Vectors come from ``persona extract TRAIT`` with every default (quick budget, offline judge,
seed 0), run inside the test session (shared with the other embedded tests, see conftest.py);
screening reads each at its read_layer. On a CI subset of the shipped synthetic datasets (the
first QUESTIONS questions of each trait, in all three versions), in diff mode:

- the II samples rank above their Normal twins: AUROC of ΔP (II vs Normal) above the trait's
  MIN_AUROC;
- that AUROC is above every one of CONTROLS random directions of the same norm at the same
  layer;
- the dataset-level ΔP orders Normal < I < II for every trait.

MIN_AUROC comes from the seed-to-seed spread measured by ``python benchmarks/bench_screen.py
--parts seeds`` (benchmarks/RESULTS.md, "Screening: AUROC across extraction seeds"): per trait,
the mean AUROC of seeds 0-2 on this subset minus twice their standard deviation (evil 0.907 -
2 x 0.013, sycophantic 0.706 - 2 x 0.016, optimistic 0.773 - 2 x 0.050), so an extraction as
good as the measured ones passes and one that ranks at chance (0.5) does not.

The random-direction control does not depend on those numbers, and for optimistic it is
expected to fail: the optimistic II answers differ from their Normal twins along many
directions at once, so random directions rank them nearly as well as the vector. Seed 0 on
this subset: 0.723 against a control maximum of 0.730 at layer 24; over all 160 questions the
seeds give 0.712 / 0.826 / 0.792 against 0.749. At the steering layer 20 it is no better: 20
random directions reach 0.854 there on the first 64 questions. (With the earlier 240-rollout
quick budget, seed 0 passed at layer 20, 0.682 against 0.665, only because of which 10
directions were drawn.)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from persona_lens.core.models import LoadedModel
from persona_lens.core.vectors import PersonaVector
from persona_lens.screening.screen import screen
from persona_lens.screening.synthetic import SYNTHETIC_TRAITS, synthetic_dataset

pytestmark = pytest.mark.embedded

QUESTIONS = 32  # per version, of 160: the CI subset
CONTROLS = 10  # random directions per trait
MIN_AUROC = {"evil": 0.88, "sycophantic": 0.67, "optimistic": 0.67}  # mean - 2 sd over seeds


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counting one half (Mann-Whitney U)."""
    diff = positive[:, None] - negative[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


@pytest.fixture(scope="module")
def extracted_vectors(default_vector: Callable[[str], Path]) -> dict[str, Path]:
    """One vector per synthetic trait: ``persona extract TRAIT`` with the defaults."""
    return {trait: default_vector(trait) for trait in SYNTHETIC_TRAITS}


def _controls(vector: PersonaVector, count: int) -> list[PersonaVector]:
    """Random directions with the vector's norm at every layer (and its metadata)."""
    gen = torch.Generator().manual_seed(7)
    out = []
    for k in range(count):
        rows = torch.randn(vector.vectors.shape, generator=gen)
        rows = rows / rows.norm(dim=-1, keepdim=True) * vector.norms().unsqueeze(-1)
        out.append(PersonaVector(rows, f"{vector.trait}-random{k}", dict(vector.metadata)))
    return out


@pytest.fixture(scope="module")
def screened(embedded_model: LoadedModel, extracted_vectors: dict[str, Path]) -> dict[str, Any]:
    """One diff-mode run over every trait's Normal, I and II subsets with every vector (each
    question's own answer y' is generated once and shared by its three versions)."""
    records = []
    for trait in SYNTHETIC_TRAITS:
        for version in ("normal", "i", "ii"):
            lines = synthetic_dataset(trait, version).read_text().splitlines()[:QUESTIONS]
            records += [{**json.loads(line), "trait": trait, "version": version} for line in lines]
    vectors: list[Any] = []
    for trait in SYNTHETIC_TRAITS:
        vector = PersonaVector.load(extracted_vectors[trait])
        vectors += [vector, *_controls(vector, CONTROLS)]
    result = screen(
        records, vectors, model=embedded_model, mode="diff", max_new_tokens=16, shard_size=512
    )
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in result.records:
        groups.setdefault((record["trait"], record["version"]), []).append(record)
    names = [t.name for t in result.summary.traits]
    ordered = {}
    for key, rows in groups.items():
        rows.sort(key=lambda r: r["id"].rsplit("-", 1)[1])  # question k of every version at k
        ordered[key] = {
            n: np.array([r["screening"]["traits"][n]["delta_p"] for r in rows]) for n in names
        }
    return {"scores": ordered, "summary": result.summary}


@pytest.mark.parametrize("trait", SYNTHETIC_TRAITS)
def test_ii_samples_rank_above_their_normal_twins(screened: dict[str, Any], trait: str) -> None:
    scores = screened["scores"]
    ii, normal = scores[(trait, "ii")], scores[(trait, "normal")]
    real = auroc(ii[trait], normal[trait])
    twins = float((ii[trait] > normal[trait]).mean())  # sorted by id: question k vs question k
    print(f"{trait}: AUROC {real:.3f}, twin win rate {twins:.3f}")
    assert real > MIN_AUROC[trait], (real, twins)


_GENERIC = "optimistic II answers differ from their twins along many directions (docstring)"


@pytest.mark.parametrize(
    "trait",
    [
        pytest.param(t, marks=pytest.mark.xfail(reason=_GENERIC, strict=False))
        if t == "optimistic"
        else t
        for t in SYNTHETIC_TRAITS
    ],
)
def test_the_vector_ranks_better_than_random_directions(
    screened: dict[str, Any], trait: str
) -> None:
    scores = screened["scores"]
    ii, normal = scores[(trait, "ii")], scores[(trait, "normal")]
    real = auroc(ii[trait], normal[trait])
    controls = [
        auroc(ii[f"{trait}-random{k}"], normal[f"{trait}-random{k}"]) for k in range(CONTROLS)
    ]
    layer = screened["summary"].trait(trait).layer
    print(f"{trait} at layer {layer}: AUROC {real:.3f}, controls max {max(controls):.3f}")
    assert real > max(controls), (real, controls)


@pytest.mark.parametrize("trait", SYNTHETIC_TRAITS)
def test_dataset_level_delta_p_orders_normal_i_ii(screened: dict[str, Any], trait: str) -> None:
    means = {v: float(screened["scores"][(trait, v)][trait].mean()) for v in ("normal", "i", "ii")}
    print(f"{trait}: mean ΔP {means}")
    assert means["normal"] < means["i"] < means["ii"], means
