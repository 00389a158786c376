"""Which token positions a forward pass covers: prompt or generated.

Steering and capture hooks see one forward at a time. During cached generation the first
forward holds the whole (left-padded) prompt and each later one a single new token; without a
cache every forward holds the full sequence. :class:`PositionTracker` reads each forward's
inputs from a pre-hook on the top-level model and keeps the absolute offset of its first token,
so hooks can select prompt positions (< prompt length) or generated ones (>= prompt length).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

Positions = Literal["all", "prompt", "generated"]
POSITIONS: tuple[str, ...] = ("all", "prompt", "generated")

_CACHE_KWARGS = ("cache", "past_key_values", "cache_params", "state")


@dataclass
class ForwardInputs:
    """What one forward call of the top-level model was given."""

    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    length: int
    has_cache: bool


def read_forward_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> ForwardInputs:
    """Parse a CausalLM forward's arguments (ids or embeddings, mask, cache)."""
    input_ids = kwargs.get("input_ids")
    if input_ids is None and args and isinstance(args[0], torch.Tensor):
        input_ids = args[0]
    embeds = kwargs.get("inputs_embeds")
    reference = input_ids if input_ids is not None else embeds
    length = int(reference.shape[1]) if isinstance(reference, torch.Tensor) else 0
    mask = kwargs.get("attention_mask")
    has_cache = any(kwargs.get(k) is not None for k in _CACHE_KWARGS)
    return ForwardInputs(
        input_ids=input_ids if isinstance(input_ids, torch.Tensor) else None,
        attention_mask=mask if isinstance(mask, torch.Tensor) else None,
        length=length,
        has_cache=has_cache,
    )


class PositionTracker:
    """Tracks the absolute position of each forward's tokens on one model.

    A forward of several tokens, or one without a cache, starts at position 0; a single token
    with a cache continues where the last forward ended. The prompt length is the length of
    the first forward after :meth:`reset`, unless given explicitly.
    """

    def __init__(self) -> None:
        self.offset = 0
        self.length = 0
        self.prompt_length: int | None = None
        self._explicit_prompt_length: int | None = None
        self._next = 0
        self._handle: RemovableHandle | None = None

    def attach(self, model: nn.Module) -> None:
        self._handle = model.register_forward_pre_hook(self._pre_hook, with_kwargs=True)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def reset(self, prompt_length: int | None = None) -> None:
        """Start a new sequence; the next forward is its prompt."""
        self._explicit_prompt_length = prompt_length
        self.prompt_length = prompt_length
        self._next = 0

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        inputs = read_forward_inputs(args, kwargs)
        self.update(inputs.length, inputs.has_cache)

    def update(self, length: int, has_cache: bool) -> None:
        """Record a forward of ``length`` tokens."""
        fresh = length > 1 or not has_cache or self._next == 0
        if fresh:
            self.offset = 0
            new_sequence = has_cache or self._next == 0 or self.prompt_length is None
            if self._explicit_prompt_length is None and new_sequence:
                self.prompt_length = length
        else:
            self.offset = self._next
        self.length = length
        self._next = self.offset + length

    def select(self, positions: str) -> slice | None:
        """Slice of the current forward's positions that ``positions`` selects.

        ``None`` selects nothing; ``slice(None)`` everything.
        """
        if positions == "all":
            return slice(None)
        prompt_length = self.prompt_length if self.prompt_length is not None else self.length
        split = min(max(prompt_length - self.offset, 0), self.length)
        if positions == "prompt":
            return slice(None, split) if split > 0 else None
        return slice(split, None) if split < self.length else None
