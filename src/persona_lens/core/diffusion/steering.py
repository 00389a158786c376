"""Steering a block-diffusion model: the same SteeringSpec on both streams.

Block l of the encoder and block l of the decoder get the same operations (``add``, ``ablate``,
``cap``; ``layers="all"`` adds the layer-incremental vectors on each stream). Token positions
map onto the model's forwards (:data:`~.phases.POSITION_PHASES`):

- ``generated``: the decoder at **every denoising step**, at every canvas position, and the
  encoder when it commits a canvas (the cache later canvases read);
- ``prompt``: the encoder over the prompt;
- ``all``: both.

The decoder is the stream that writes tokens, so steering there is what changes the text;
steering the committed canvases keeps the cache consistent with an autoregressive model's,
whose steered tokens are also the keys later tokens attend to. Per-row coefficients work as
in :mod:`persona_lens.core.steering`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from persona_lens.core.architecture import BlockLayout, block_hidden, with_block_hidden
from persona_lens.core.diffusion.phases import PhaseTracker
from persona_lens.core.ownership import ModelClaim
from persona_lens.core.steering import SteeringHandle


class DiffusionSteeringHandle(SteeringHandle):
    """Hooks applying a steering plan to both streams; a context manager that removes them."""

    def __init__(self, model: nn.Module, plan: dict[int, list[Any]], layout: BlockLayout):
        super().__init__(model, plan, layout)
        self.phases = PhaseTracker(layout)

    def _attach_positions(self) -> None:
        self.phases.attach()  # positions are phases of the model's forwards, for every op

    def _detach_positions(self) -> None:
        self.phases.detach()

    def _steered_blocks(self, layer: int) -> list[nn.Module]:
        return [stream.blocks[layer - 1] for stream in self.layout.streams]

    def reset_positions(self, prompt_length: int | None = None) -> None:
        """Nothing to reset: each forward's phase is read from the model's cache."""

    def _make_hook(self, ops: list[Any], claim: ModelClaim) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            claim.check()  # a forward of another thread, already running when we attached
            hidden = block_hidden(output)
            steered = hidden
            for op in ops:
                # SteeringHandle._apply acts on every position: this handle has no tracker
                if self.phases.selects(op.positions):
                    steered = self._apply(op, steered)
            return output if steered is hidden else with_block_hidden(output, steered)

        return hook
