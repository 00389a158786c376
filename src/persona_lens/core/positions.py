"""Which token positions a forward pass covers: prompt or generated.

Steering and capture hooks see one forward at a time. :class:`PositionTracker` reads each
forward's inputs from a pre-hook on the top-level model (and the cache it returns from a
forward hook) and keeps the absolute offset of its first token, so hooks can select prompt
positions (< prompt length) or generated ones (>= prompt length).

It finds where a sequence starts by itself, in every family and with or without a cache,
from what ``generate`` passes to each forward:

- *a cached decoding step* carries the cache object that the previous forward was given or
  returned (transformers keeps one object per ``generate`` call; RWKV, xLSTM and MiniMax
  return theirs from the prompt forward, which carries none): it continues at the next
  position;
- *an uncached decoding step* (``use_cache=False``) carries no cache and repeats the previous
  uncached forward's tokens with one more appended: the same sequence, from position 0;
- anything else starts a new sequence whose prompt is this forward (a cache object never seen
  before, or tokens that do not extend the previous ones).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
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
    cache: Any = None

    @property
    def has_cache(self) -> bool:
        return self.cache is not None


def read_forward_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> ForwardInputs:
    """Parse a CausalLM forward's arguments (ids or embeddings, mask, cache)."""
    input_ids = kwargs.get("input_ids")
    if input_ids is None and args and isinstance(args[0], torch.Tensor):
        input_ids = args[0]
    embeds = kwargs.get("inputs_embeds")
    reference = input_ids if input_ids is not None else embeds
    length = int(reference.shape[1]) if isinstance(reference, torch.Tensor) else 0
    mask = kwargs.get("attention_mask")
    cache = next((kwargs[k] for k in _CACHE_KWARGS if kwargs.get(k) is not None), None)
    return ForwardInputs(
        input_ids=input_ids if isinstance(input_ids, torch.Tensor) else None,
        attention_mask=mask if isinstance(mask, torch.Tensor) else None,
        length=length,
        cache=cache,
    )


def returned_cache(output: Any) -> Any:
    """The cache object a forward returned (``past_key_values``, ``cache_params``...), if any."""
    for key in _CACHE_KWARGS:
        value = getattr(output, key, None)
        if value is not None and not isinstance(value, torch.Tensor):
            return value
    return None


def _reference(obj: Any) -> Callable[[], Any]:
    """A weak reference where the object allows one (RWKV's state is a plain list)."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj


SequenceStep = Literal["new", "step", "regrow"]


class PositionTracker:
    """Tracks the absolute position of each forward's tokens on one model.

    The prompt length is the length of the forward that starts a sequence (see the module
    docstring for how one is recognised), unless :meth:`reset` gives it explicitly.
    """

    def __init__(self) -> None:
        self.offset = 0
        self.length = 0
        self.prompt_length: int | None = None
        self._explicit_prompt_length: int | None = None
        self._force_new = True
        self._next = 0
        self._last_cache: Callable[[], Any] | None = None
        self._last_ids: torch.Tensor | None = None  # tokens of the last uncached forward
        self._last_uncached_length: int | None = None
        self._handles: list[RemovableHandle] = []

    def attach(self, model: nn.Module) -> None:
        self._handles = [
            model.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            model.register_forward_hook(self._post_hook),
        ]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._last_cache = self._last_ids = None

    def reset(self, prompt_length: int | None = None) -> None:
        """Declare that the next forward starts a new sequence (optionally its prompt length).

        Not needed between ``generate`` calls, which are recognised by themselves.
        """
        self._explicit_prompt_length = prompt_length
        self._force_new = True

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.update(read_forward_inputs(args, kwargs))

    def _post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        cache = returned_cache(output)
        if cache is not None:
            self._last_cache = _reference(cache)

    def classify(self, inputs: ForwardInputs) -> SequenceStep:
        """``new`` sequence, cached decoding ``step``, or uncached ``regrow`` (the whole
        sequence again, one token longer)."""
        if self._force_new:
            return "new"
        if inputs.cache is not None:
            last = self._last_cache() if self._last_cache is not None else None
            return "step" if last is inputs.cache else "new"
        previous = self._last_uncached_length
        if previous is None or inputs.length != previous + 1:
            return "new"
        ids, last_ids = inputs.input_ids, self._last_ids
        if ids is None or last_ids is None:
            return "regrow"  # embeddings only: the length is all there is to go by
        same = ids.shape[0] == last_ids.shape[0] and torch.equal(ids[:, :previous], last_ids)
        return "regrow" if same else "new"

    def update(self, inputs: ForwardInputs) -> None:
        """Record one forward of the top-level model."""
        kind = self.classify(inputs)
        length = inputs.length
        if kind == "new":
            explicit = self._explicit_prompt_length
            self.prompt_length = explicit if explicit is not None else length
            self._explicit_prompt_length = None
            self._force_new = False
        self.offset = self._next if kind == "step" else 0
        self.length = length
        self._next = self.offset + length
        if inputs.cache is not None:
            self._last_cache = _reference(inputs.cache)
            self._last_ids, self._last_uncached_length = None, None
        else:
            self._last_cache = None
            self._last_ids, self._last_uncached_length = inputs.input_ids, length

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
