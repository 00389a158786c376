"""Random-direction controls for real-model tests: an extracted vector must beat what
directions of the same size, chosen at random, do on the same prompts and the same measure."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from persona_lens.core.steering import SteeringSpec
from persona_lens.core.vectors import PersonaVector

CONTROLS = 20  # random directions per test
QUANTILE = 0.95


def random_directions(like: torch.Tensor, count: int = CONTROLS, seed: int = 0) -> torch.Tensor:
    """``count`` random directions [count, d] with the norm of ``like`` (one layer's row)."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(count, like.shape[-1], generator=generator)
    return rows / rows.norm(dim=1, keepdim=True) * like.float().norm()


def control_bar(values: Sequence[float], quantile: float = QUANTILE) -> float:
    """The ``quantile`` of the controls' absolute values: a random direction has no sign, so
    a large negative effect counts as large."""
    return float(torch.tensor([abs(v) for v in values]).quantile(quantile))


def per_row_steering(
    directions: Sequence[torch.Tensor],
    layer: int,
    num_layers: int,
    coefficients: Sequence[float],
    *,
    positions: str = "all",
) -> list[SteeringSpec]:
    """One spec per direction, for a batch of ``len(directions)`` blocks of
    ``len(coefficients)`` prompts: block k is steered along direction k with
    ``coefficients`` (row by row) and every other block not at all."""
    block, total = len(coefficients), len(coefficients) * len(directions)
    specs = []
    for k, direction in enumerate(directions):
        values = [0.0] * total
        values[k * block : (k + 1) * block] = list(coefficients)
        rows = torch.zeros(num_layers + 1, direction.shape[-1])
        rows[layer] = direction
        vector = PersonaVector(rows, f"direction-{k}")
        specs.append(SteeringSpec(vector, values, layer, positions=positions))  # type: ignore[arg-type]
    return specs
