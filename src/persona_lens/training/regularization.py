"""The projection penalty (the paper's regularisation baseline to preventative steering).

For each ``regularize`` intervention with weight w at layers S, on every training batch:

    w * mean over l in S, over the batch's real tokens, of ((h_l - h_l^base) . u_l)^2

where h_l is the fine-tuned model's block output (with gradients), h_l^base the same forward
with the adapter disabled (no gradients), and u_l the unit persona direction at l. It pulls the
projection onto the trait direction back to where the base model has it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from persona_lens.core.architecture import BlockLayout, block_hidden
from persona_lens.training.interventions import Intervention


@dataclass(frozen=True)
class _Term:
    weight: float
    layers: tuple[int, ...]


class ProjectionPenalty:
    """Taps the block outputs it needs and turns them into the penalty."""

    def __init__(self, interventions: Sequence[Intervention], layout: BlockLayout) -> None:
        self.layout = layout
        self.terms: list[tuple[_Term, dict[int, torch.Tensor]]] = []
        for item in interventions:
            if item.kind != "regularize":
                continue
            layers = tuple(item.resolved_layers(layout.num_layers))
            units = {}
            for layer in layers:
                row = item.vector.vectors[layer]
                units[layer] = row / row.norm().clamp_min(1e-12)
            self.terms.append((_Term(item.coefficient, layers), units))
        self._units_on: dict[tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}

    def __bool__(self) -> bool:
        return bool(self.terms)

    @property
    def layers(self) -> list[int]:
        return sorted({layer for term, _ in self.terms for layer in term.layers})

    def _unit(self, term: int, layer: int, like: torch.Tensor) -> torch.Tensor:
        key = (term, layer, like.device, like.dtype)
        if key not in self._units_on:
            self._units_on[key] = self.terms[term][1][layer].to(like.device, like.dtype)
        return self._units_on[key]

    def projections(self, hidden: dict[int, torch.Tensor]) -> dict[tuple[int, int], torch.Tensor]:
        """(term, layer) -> the [B, T] projection onto that term's unit direction."""
        out = {}
        for index, (term, _) in enumerate(self.terms):
            for layer in term.layers:
                h = hidden[layer]
                out[(index, layer)] = (h @ self._unit(index, layer, h)).float()
        return out

    def tap(self) -> AbstractContextManager[dict[int, torch.Tensor]]:
        """Record the penalised layers' block outputs of the next forward (gradients kept)."""
        return tap_blocks(self.layout, self.layers)

    def reference(
        self, forward: Callable[[], Any], no_adapter: AbstractContextManager[Any]
    ) -> dict[tuple[int, int], torch.Tensor]:
        """The base model's projections: ``forward()`` run inside ``no_adapter``, no grad."""
        with no_adapter, torch.no_grad(), self.tap() as hidden:
            forward()
        return self.projections(hidden)

    def penalty(
        self,
        tuned: dict[tuple[int, int], torch.Tensor],
        base: dict[tuple[int, int], torch.Tensor],
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        """The weighted mean squared projection change over real tokens (a scalar)."""
        mask = attention_mask.to(torch.float32)
        count = mask.sum().clamp_min(1.0)
        total = torch.zeros((), device=attention_mask.device)
        for index, (term, _) in enumerate(self.terms):
            per_layer = [
                (((tuned[(index, layer)] - base[(index, layer)]) ** 2) * mask).sum() / count
                for layer in term.layers
            ]
            total = total + term.weight * torch.stack(per_layer).mean()
        return total


@contextmanager
def tap_blocks(layout: BlockLayout, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Block outputs (1-based layers) of the forwards run inside, as they are (not detached).

    The hooks are prepended, so they see a block's own output before any steering hook."""
    recorded: dict[int, torch.Tensor] = {}
    handles = []

    def make(layer: int) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            recorded[layer] = block_hidden(output)

        return hook

    try:
        for layer in layers:
            block = layout.blocks[layer - 1]
            handles.append(block.register_forward_hook(make(layer), prepend=True))
        yield recorded
    finally:
        for handle in handles:
            handle.remove()
