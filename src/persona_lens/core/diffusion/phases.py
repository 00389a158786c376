"""Which forward of a block-diffusion model is running: the prompt, a committed canvas, or a
denoising step.

``generate`` calls the encoder once per canvas (first over the prompt, then over each canvas
it commits) and the decoder once per denoising step. A :class:`PhaseTracker` reads each call
from pre-hooks on the two stream modules, so hooks on the blocks know what they see:

- ``prompt``: an encoder forward that starts a sequence (no cache yet, or an empty one);
- ``committed``: an encoder forward that extends the cache (a canvas just committed);
- ``canvas``: a decoder forward (one denoising step of the next canvas).

The phase comes from the cache itself, so two ``generate`` calls in a row need no reset.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from persona_lens.core.architecture import BlockLayout
from persona_lens.core.errors import ArchitectureError

Phase = Literal["prompt", "committed", "canvas"]
PHASES: tuple[str, ...] = ("prompt", "committed", "canvas")
# which phases each SteeringSpec.positions value selects
POSITION_PHASES: dict[str, frozenset[str]] = {
    "all": frozenset(PHASES),
    "prompt": frozenset({"prompt"}),
    "generated": frozenset({"committed", "canvas"}),
}
_CACHE_KWARGS = ("cache", "past_key_values")


@dataclass
class DecoderStep:
    """What one denoising step was given: the canvas and the previous step's logits."""

    canvas_ids: torch.Tensor  # [B, C]
    self_conditioning: torch.Tensor | None  # [B, C, V] or None at a canvas's first step


def _cache_length(kwargs: dict[str, Any]) -> int:
    for key in _CACHE_KWARGS:
        cache = kwargs.get(key)
        if cache is not None:
            return int(cache.get_seq_length())
    return 0


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any], key: str) -> torch.Tensor:
    value = kwargs.get(key)
    if value is None and args and isinstance(args[0], torch.Tensor):
        value = args[0]
    if not isinstance(value, torch.Tensor):
        raise ArchitectureError(f"a block-diffusion stream forward without {key}")
    return value


class PhaseTracker:
    """Follows one block-diffusion model's forwards (attach once, read ``phase``).

    ``on_encoder(phase, input_ids)`` and ``on_decoder(step)`` are called before the stream's
    blocks run; ``canvas`` counts committed canvases, ``step`` the denoising steps of the
    canvas being denoised.
    """

    def __init__(
        self,
        layout: BlockLayout,
        *,
        on_encoder: Callable[[str, torch.Tensor], None] | None = None,
        on_decoder: Callable[[DecoderStep], None] | None = None,
    ) -> None:
        if not layout.is_block_diffusion:
            raise ArchitectureError(f"{layout.family} is not a block-diffusion model")
        self.layout = layout
        self.phase: str | None = None
        self.canvas = 0
        self.step = -1
        self._on_encoder = on_encoder
        self._on_decoder = on_decoder
        self._handles: list[RemovableHandle] = []

    def attach(self) -> None:
        if self._handles:
            return
        encoder = self.layout.stream("encoder").module
        decoder = self.layout.stream("decoder").module
        self._handles = [
            encoder.register_forward_pre_hook(self._encoder_pre_hook, with_kwargs=True),
            decoder.register_forward_pre_hook(self._decoder_pre_hook, with_kwargs=True),
        ]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _encoder_pre_hook(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        ids = _first_tensor(args, kwargs, "input_ids")
        if _cache_length(kwargs) == 0:
            self.phase, self.canvas = "prompt", 0
        else:
            self.phase, self.canvas = "committed", self.canvas + 1
        self.step = -1
        if self._on_encoder is not None:
            self._on_encoder(self.phase, ids)

    def _decoder_pre_hook(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        self.phase = "canvas"
        self.step += 1
        if self._on_decoder is not None:
            logits = kwargs.get("self_conditioning_logits")
            step = DecoderStep(
                _first_tensor(args, kwargs, "decoder_input_ids"),
                logits if isinstance(logits, torch.Tensor) else None,
            )
            self._on_decoder(step)

    def selects(self, positions: str) -> bool:
        """Whether ``positions`` (a SteeringSpec value) covers the forward now running."""
        return self.phase is not None and self.phase in POSITION_PHASES[positions]
