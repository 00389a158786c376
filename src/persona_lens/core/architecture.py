"""Structural discovery of a causal LM's residual blocks.

The project's layer convention (DESIGN.md): a model with L blocks has L+1 positions; index 0
is the input of block 1 (the embedding output), index l in 1..L is the output of block l,
the last one before any final norm. Blocks are found by structure - the ``nn.ModuleList``
whose length is the model's layer count and that holds most parameters - never from a list
of attribute names, so new families work without code changes. ``block_path`` overrides it.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from persona_lens.core.errors import ArchitectureError

_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclass(frozen=True)
class BlockLayout:
    """Where a model's residual blocks are and what kind each one is."""

    path: str
    blocks: tuple[nn.Module, ...]
    family: str
    hidden_size: int
    block_kinds: tuple[str, ...]

    @property
    def num_layers(self) -> int:
        """L, the number of residual blocks (vectors have L+1 rows)."""
        return len(self.blocks)

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary for ``persona info``."""
        counts: dict[str, int] = {}
        for kind in self.block_kinds:
            counts[kind] = counts.get(kind, 0) + 1
        return {
            "family": self.family,
            "block_path": self.path,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "block_classes": sorted({type(b).__name__ for b in self.blocks}),
            "block_kinds": counts,
            "layout": "".join(_layout_letter(k) for k in self.block_kinds),
        }


_KIND_LETTER = {
    "attention": "A",
    "sliding-attention": "S",
    "linear-attention": "L",
    "ssm": "M",
    "conv": "C",
    "recurrent": "R",
    "hybrid": "H",
    "mlp": "F",
}


def _layout_letter(kind: str) -> str:
    letter = _KIND_LETTER.get(kind.split("+")[0], "?")
    return letter.lower() if kind.endswith("+moe") else letter


def text_config(model: nn.Module) -> Any:
    """The text part of a model's config (multimodal configs nest it)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


def declared_num_layers(model: nn.Module) -> int | None:
    """Layer count declared by the config, if any."""
    config = text_config(model)
    for key in _LAYER_COUNT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, BlockLayout] = weakref.WeakKeyDictionary()


def find_blocks(model: nn.Module, block_path: str | None = None) -> BlockLayout:
    """Locate the ordered residual blocks of ``model`` (cached per model while its blocks
    stay the same modules).

    Raises ArchitectureError when no plausible block list exists or ``block_path`` is wrong.
    """
    cached = _LAYOUTS.get(model)
    if cached is not None and block_path in (None, cached.path):
        current = tuple(model.get_submodule(cached.path).children())
        if len(current) == cached.num_layers and all(
            a is b for a, b in zip(current, cached.blocks, strict=True)
        ):
            return cached
    layout = _find_blocks(model, block_path)
    _LAYOUTS[model] = layout
    return layout


def _find_blocks(model: nn.Module, block_path: str | None) -> BlockLayout:
    if block_path is not None:
        try:
            found = model.get_submodule(block_path)
        except AttributeError as exc:
            raise ArchitectureError(
                f"no submodule {block_path!r} in {type(model).__name__}"
            ) from exc
        if not isinstance(found, nn.ModuleList) or len(found) == 0:
            raise ArchitectureError(f"{block_path!r} is not a non-empty nn.ModuleList")
        path, blocks = block_path, found
    else:
        path, blocks = _discover(model)
    return BlockLayout(
        path=path,
        blocks=tuple(blocks),
        family=str(getattr(text_config(model), "model_type", type(model).__name__)),
        hidden_size=_hidden_size(model),
        block_kinds=tuple(classify_block(b, i, model) for i, b in enumerate(blocks)),
    )


def _discover(model: nn.Module) -> tuple[str, nn.ModuleList]:
    declared = declared_num_layers(model)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and _param_count(module) > 0
    ]
    if not candidates:
        raise ArchitectureError(f"{type(model).__name__} has no list of blocks (nn.ModuleList)")
    matching = [c for c in candidates if len(c[1]) == declared] if declared else []
    pool = matching or candidates
    name, blocks = max(pool, key=lambda c: _param_count(c[1]))
    return name, blocks


def _hidden_size(model: nn.Module) -> int:
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if isinstance(embeddings, nn.Embedding):
        return int(embeddings.embedding_dim)
    config = text_config(model)
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise ArchitectureError(f"cannot tell the hidden size of {type(model).__name__}")


_RECURRENT_MARKERS = ("rwkv", "rglru", "recurrentblock", "xlstm", "mlstm", "slstm")
_LINEAR_MARKERS = ("lightning", "deltanet", "gateddelta", "deltaattention")
_CONV_MARKERS = ("shortconv",)
_MOE_MARKERS = ("experts", "moe", "router")


def _class_names(module: nn.Module) -> list[str]:
    return [type(m).__name__.lower() for m in module.modules()]


def classify_block(block: nn.Module, index: int, model: nn.Module | None = None) -> str:
    """Coarse kind of one block from the classes it contains: recurrent, linear-attention,
    hybrid (attention and SSM in one block), ssm, conv, sliding-attention, attention or mlp,
    with ``+moe`` when it routes to experts."""
    names = _class_names(block)[1:]
    joined = " ".join(names)
    attention = any(n.endswith("attention") for n in names)
    if _any(joined, _RECURRENT_MARKERS):
        kind = "recurrent"
    elif _any(joined, _LINEAR_MARKERS):
        kind = "linear-attention"
    elif any("mamba" in n or n.endswith(("mixer", "ssm")) for n in names):
        kind = "hybrid" if attention else "ssm"
    elif _any(joined, _CONV_MARKERS):
        kind = "conv"
    elif attention:
        layer_type = _declared_layer_type(model, index)
        sliding = "sliding" in layer_type or "chunked" in layer_type
        if not layer_type:
            sliding = _uses_sliding_window(block, model)
        kind = "sliding-attention" if sliding else "attention"
    else:
        kind = "mlp"
    if _any(joined, _MOE_MARKERS):
        kind += "+moe"
    return kind


def _any(text: str, markers: Iterable[str]) -> bool:
    return any(m in text for m in markers)


def _declared_layer_type(model: nn.Module | None, index: int) -> str:
    config = text_config(model) if model is not None else None
    for key in ("layer_types", "layers_block_type", "block_types"):
        types = getattr(config, key, None)
        if isinstance(types, (list, tuple)) and index < len(types):
            return str(types[index]).lower()
    return ""


def _uses_sliding_window(block: nn.Module, model: nn.Module | None) -> bool:
    for module in block.modules():
        window = getattr(module, "sliding_window", None)
        if isinstance(window, int) and window > 0:
            return True
    config = text_config(model) if model is not None else None
    window = getattr(config, "sliding_window", None)
    use_window = getattr(config, "use_sliding_window", True)
    return isinstance(window, int) and window > 0 and bool(use_window)


def input_device(model: nn.Module) -> torch.device:
    """Where a model's input ids go: the device of its input embeddings (the first device of
    a model split with ``device_map``), else of its first parameter."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    return next(model.parameters()).device


def block_hidden(output: Any) -> torch.Tensor:
    """The hidden-state tensor inside a block's output (tensor, tuple or ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    to_tuple = getattr(output, "to_tuple", None)
    if callable(to_tuple):
        return block_hidden(to_tuple())
    raise ArchitectureError(f"cannot find a hidden state in a block output of type {type(output)}")


def with_block_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its hidden-state tensor replaced by ``hidden``."""
    if isinstance(output, torch.Tensor):
        return hidden
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    keys = getattr(output, "keys", None)
    if callable(keys):
        first = next(iter(keys()))
        output[first] = hidden
        return output
    raise ArchitectureError(
        f"cannot replace the hidden state in a block output of type {type(output)}"
    )


def block_input_hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden-state tensor a block receives (first positional tensor or kwarg)."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    value = kwargs.get("hidden_states")
    if isinstance(value, torch.Tensor):
        return value
    for value in kwargs.values():
        if isinstance(value, torch.Tensor) and value.dim() == 3:
            return value
    raise ArchitectureError("cannot find the hidden state passed to a block")
