"""Which batches a model decodes exactly: left-padded, padding-free, or one row at a time.

transformers decodes some families wrongly in a batch (5.24: RWKV's cached decoding mixes the
rows of a batch; xLSTM and RWKV ignore the attention mask, so left padding leaks into the
recurrent state; MiniMax and RecurrentGemma mask it only approximately). Rather than a list of
names, :func:`batching_mode` asks the loaded model, once (cached per model and dtype): a probe
of five 3-token greedy ``generate`` calls on random token ids compares

- two rows of equal length, unpadded, against each row alone: a difference beyond numerical
  noise means batched decoding itself is wrong: ``"single"`` (one row at a time);
- a left-padded row with two different pad fillings (same shapes, same kernels: an exactly
  masked model gives identical logits in any dtype), and against the row alone: a difference
  means padding leaks: ``"equal-length"`` (batches of prompts of one length, no padding);
- otherwise ``"padded"`` (left-padded batches of any lengths).

:func:`batch_groups` turns prompt lengths into batches for a mode; ``generate`` and
``capture_sequences`` use it, so every family gets exact rollouts.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from persona_lens.core.architecture import find_blocks, input_device
from persona_lens.core.ownership import owning

BatchingMode = Literal["padded", "equal-length", "single"]
BATCHING_MODES: tuple[str, ...] = ("padded", "equal-length", "single")

BATCHING_NOTES: dict[str, str] = {
    "padded": "left-padded batches (exact)",
    "equal-length": "padding leaks in this family: batches of equal-length prompts, no padding",
    "single": "batched decoding is wrong in this family: one row at a time",
}

PROBE_TOKENS = 3
LEAK_TOLERANCE = 1e-3  # relative; exactly masked models differ by < 1e-6 (MoE routing order)
_NOISE_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-3}  # relative; 16-bit: 5e-2
_LOW_PRECISION_NOISE = 5e-2

_MODES: weakref.WeakKeyDictionary[nn.Module, tuple[torch.dtype, str]] = weakref.WeakKeyDictionary()


def batching_mode(model: nn.Module, pad_token_id: int | None = None) -> BatchingMode:
    """How ``model`` must be batched to decode exactly (probed once per model and dtype)."""
    dtype = next(model.parameters()).dtype
    cached = _MODES.get(model)
    if cached is not None and cached[0] == dtype:
        return cached[1]  # type: ignore[return-value]
    if find_blocks(model).is_block_diffusion:
        # not probed: its sampler has no greedy mode; its forward-mode capture reads the
        # encoder, an attention stack that masks left padding (the diffusion family tests)
        mode: BatchingMode = "padded"
    else:
        mode = probe_batching(model, pad_token_id)
    _MODES[model] = (dtype, mode)
    return mode


def probe_batching(model: nn.Module, pad_token_id: int | None = None) -> BatchingMode:
    """Run the probe described in the module docstring (uncached; about 15 forwards)."""
    pad = _pad_id(model, pad_token_id)
    vocab = _vocab_size(model)
    low = 3 if vocab > 8 else 0
    generator = torch.Generator().manual_seed(0)

    def tokens(length: int) -> torch.Tensor:
        return torch.randint(low, vocab, (1, length), generator=generator)

    a, b, c, filler = tokens(6), tokens(3), tokens(6), tokens(3)
    width = a.shape[1]
    gap = width - b.shape[1]
    left = torch.ones(2, width, dtype=torch.long)
    left[1, :gap] = 0
    padded = torch.cat([a, torch.cat([torch.full((1, gap), pad), b], dim=1)])
    refilled = padded.clone()
    refilled[1, :gap] = filler
    with owning(model), hooks_suspended(model):
        alone = [_logits(model, x, torch.ones_like(x), pad) for x in (a, b, c)]
        equal = _logits(model, torch.cat([a, c]), torch.ones(2, width, dtype=torch.long), pad)
        with_pad = _logits(model, padded, left, pad)
        with_filler = _logits(model, refilled, left, pad)
    scale = max(float(x.abs().max()) for x in alone) or 1.0
    noise = _NOISE_TOLERANCE.get(next(model.parameters()).dtype, _LOW_PRECISION_NOISE)

    def gap_between(x: torch.Tensor, y: torch.Tensor) -> float:
        return float((x - y).abs().max()) / scale

    batched = max(gap_between(equal[0], alone[0][0]), gap_between(equal[1], alone[2][0]))
    if batched > noise:
        return "single"
    leak = gap_between(with_pad, with_filler)
    shifted = max(gap_between(with_pad[0], alone[0][0]), gap_between(with_pad[1], alone[1][0]))
    if leak > LEAK_TOLERANCE or shifted > noise:
        return "equal-length"
    return "padded"


def batch_groups(lengths: Sequence[int], mode: str, batch_size: int) -> list[list[int]]:
    """Row indices in batches, longest prompts first: any lengths together (``padded``),
    only equal lengths together (``equal-length``) or one row each (``single``)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if mode == "single":
        return [[i] for i in order]
    if mode == "padded":
        return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[groups[-1][0]] == lengths[i] and len(groups[-1]) < batch_size:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


@contextmanager
def hooks_suspended(model: nn.Module) -> Iterator[None]:
    """Run ``model`` without any forward hook of its modules (restored on exit): the probe
    must not reach steering, capture or guard hooks a caller has attached."""
    saved = []
    for module in model.modules():
        saved.append((module, module._forward_hooks, module._forward_pre_hooks))
        module._forward_hooks = OrderedDict()
        module._forward_pre_hooks = OrderedDict()
    try:
        yield
    finally:
        for module, hooks, pre_hooks in saved:
            module._forward_hooks = hooks
            module._forward_pre_hooks = pre_hooks


def _logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, pad: int) -> torch.Tensor:
    """[B, PROBE_TOKENS, V] float32 logits of greedy cached decoding."""
    device = input_device(model)
    with torch.no_grad():
        out: Any = model.generate(  # type: ignore[operator]
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=PROBE_TOKENS,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad,
            eos_token_id=None,
            use_cache=True,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return torch.stack(out.logits, dim=1).float().cpu()


def _pad_id(model: nn.Module, pad_token_id: int | None) -> int:
    if pad_token_id is not None:
        return int(pad_token_id)
    config = getattr(model, "generation_config", None)
    for value in (getattr(config, "pad_token_id", None), getattr(config, "eos_token_id", None)):
        if isinstance(value, int):
            return value
        if isinstance(value, (list, tuple)) and value:
            return int(value[0])
    return 0


def _vocab_size(model: nn.Module) -> int:
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    size = getattr(embeddings, "num_embeddings", None)
    if isinstance(size, int) and size > 0:
        return size
    config: Any = getattr(model, "config", None)
    return int(config.vocab_size)
