"""Hooks that read every row's projections and run its guards, for one batch composition.

A :class:`BatchProbe` hooks the blocks of the monitored and guarded layers. It is registered
after the steering hooks (which are prepended), so it sees the steered stream. On the prompt
forward it records the projection of every prompt token; on each decoding forward (one fed
token per row) it records the fed token's projection. Guards follow
:mod:`persona_lens.monitoring.guard`: a row's guard fires on the first reply token whose
projection at the vector's best layer exceeds its threshold; from that token's own forward on,
the row is steered with the guard's coefficient at that layer (after the reading). Rows without
a guard get a zero coefficient, so their stream is bit-identical to an unguarded one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from persona_lens.core.architecture import BlockLayout, block_hidden, with_block_hidden
from persona_lens.core.capture import Monitor


@dataclass
class GuardRows:
    """One guard vector across the rows of a batch (threshold +inf where a row has none)."""

    name: str
    layer: int
    direction: torch.Tensor  # [d], the raw vector at ``layer``
    threshold: torch.Tensor  # [B]
    coefficient: torch.Tensor  # [B]
    fired: torch.Tensor  # [B] bool, before the next forward
    crossed: torch.Tensor | None = field(default=None)  # [B] bool, in the last forward
    value: torch.Tensor | None = field(default=None)  # [B] projection in the last forward

    def __post_init__(self) -> None:
        d = self.direction.float()
        self.unit = d / d.norm().clamp_min(1e-12)

    def to(self, device: torch.device) -> None:
        for name in ("direction", "threshold", "coefficient", "fired", "unit"):
            setattr(self, name, getattr(self, name).to(device))

    def steered(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``hidden`` plus the guard's steering on ``rows`` (others unchanged)."""
        if not bool(rows.any()):
            return hidden
        coef = torch.where(rows, self.coefficient, torch.zeros_like(self.coefficient))
        return hidden + coef.to(hidden.dtype).view(-1, 1, 1) * self.direction.to(hidden.dtype)


class BatchProbe:
    """Projection and guard hooks; a context manager that always removes them."""

    def __init__(
        self, layout: BlockLayout, monitors: Sequence[Monitor], guards: Sequence[GuardRows]
    ) -> None:
        self.layout = layout
        self.monitors = tuple(monitors)
        self.guards = tuple(guards)
        self.decoding = False
        self.values: dict[str, torch.Tensor] = {}
        self._units: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []

    def attach(self) -> BatchProbe:
        layers = {m.layer for m in self.monitors} | {g.layer for g in self.guards}
        for layer in sorted(layers):
            block = self.layout.blocks[layer - 1]
            self._handles.append(block.register_forward_hook(self._hook(layer)))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> BatchProbe:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _unit(self, monitor: Monitor, device: torch.device) -> torch.Tensor:
        key = (monitor.name, device)
        if key not in self._units:
            self._units[key] = monitor.unit().to(device)
        return self._units[key]

    def _hook(self, layer: int) -> Callable[..., Any]:
        monitors = [m for m in self.monitors if m.layer == layer]
        guards = [g for g in self.guards if g.layer == layer]

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            hidden = block_hidden(output)
            steered = hidden
            with torch.no_grad():
                if self.decoding:
                    for guard in guards:
                        steered = guard.steered(steered, guard.fired)
                for monitor in monitors:
                    source = steered[:, -1] if self.decoding else steered
                    self.values[monitor.name] = source.float() @ self._unit(monitor, hidden.device)
                if self.decoding:
                    for guard in guards:
                        value = steered[:, -1].float() @ guard.unit
                        guard.crossed = ~guard.fired & (value > guard.threshold)
                        guard.value = value
                        steered = guard.steered(steered, guard.crossed)
                        guard.fired = guard.fired | guard.crossed
            return None if steered is hidden else with_block_hidden(output, steered)

        return hook
