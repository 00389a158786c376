"""The running batch's KV cache: rows join (left-padded to a common length) and leave.

Only a plain key/value cache can be merged this way: a ``DynamicCache`` whose every layer is a
full-attention ``DynamicLayer`` holding [B, heads, T, head_dim] tensors. Sliding-window, state
space and other recurrent caches keep state that cannot be padded, so for those models the
engine batches only requests that start together (see :mod:`persona_lens.serving.engine`).
Padding columns are masked out by the attention mask; a column that is padding in every row
is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.nn import functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer


def mergeable(cache: Any) -> bool:
    """Whether rows of ``cache`` can be merged, selected and trimmed here."""
    return (
        type(cache) is DynamicCache
        and bool(cache.layers)
        and all(type(layer) is DynamicLayer and layer.is_initialized for layer in cache.layers)
    )


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(tensor, (0, 0, width, 0)) if width else tensor


def merge(
    cache: DynamicCache, mask: torch.Tensor, other: DynamicCache, other_mask: torch.Tensor
) -> torch.Tensor:
    """Append ``other``'s rows to ``cache`` (in place); returns the merged attention mask."""
    length, other_length = mask.shape[1], other_mask.shape[1]
    width = max(length, other_length)
    for layer, extra in zip(cache.layers, other.layers, strict=True):
        for name in ("keys", "values"):
            mine = _pad_left(getattr(layer, name), width - length)
            theirs = _pad_left(getattr(extra, name), width - other_length)
            setattr(layer, name, torch.cat([mine, theirs], dim=0))
    return torch.cat(
        [F.pad(mask, (width - length, 0)), F.pad(other_mask, (width - other_length, 0))], dim=0
    )


def select(cache: DynamicCache, mask: torch.Tensor, keep: Sequence[int]) -> torch.Tensor:
    """Keep rows ``keep`` of ``cache`` (in place), dropping columns that are padding in every
    remaining row; returns the new mask."""
    index = torch.tensor(list(keep), dtype=torch.long, device=mask.device)
    mask = mask.index_select(0, index)
    used = mask.any(dim=0).nonzero()
    start = int(used[0]) if used.numel() else mask.shape[1]
    for layer in cache.layers:
        for name in ("keys", "values"):
            tensor: torch.Tensor = getattr(layer, name)
            setattr(layer, name, tensor.index_select(0, index.to(tensor.device))[..., start:, :])
    return mask[:, start:]
