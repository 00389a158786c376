"""Structural discovery of a causal LM's residual blocks.

The project's layer convention (DESIGN.md): a model with L blocks has L+1 positions; index 0
is the input of block 1 (the embedding output), index l in 1..L is the output of block l,
the last one before any final norm. Blocks are found by structure - the ``nn.ModuleList``
whose length is the model's layer count and that holds most parameters - never from a list
of attribute names, so new families work without code changes. ``block_path`` overrides it.

Models with more than one residual stream go through an adapter first (``_ADAPTERS``): a
block-diffusion model (a config ``canvas_length``, an encoder and a decoder with L blocks each)
has an encoder stream over the prompt and the committed canvases and a decoder stream over the
canvas being denoised; its layout names both (``streams``) and reads the one in
``BLOCK_DIFFUSION_READ_STREAM`` unless ``block_path`` picks the other.
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
class Stream:
    """One residual stream of a model that has several (block diffusion: encoder, decoder)."""

    name: str
    path: str
    module: nn.Module  # the stream's model: its forward runs the blocks
    blocks: tuple[nn.Module, ...]
    block_kinds: tuple[str, ...]
    covers: str  # which tokens its forwards hold, for ``persona info``


@dataclass(frozen=True)
class BlockLayout:
    """Where a model's residual blocks are and what kind each one is.

    For a model with several streams, ``path``/``blocks`` are the stream that is read
    (captured, monitored) and ``streams`` lists them all; ``canvas_length`` is set for
    block-diffusion models.
    """

    path: str
    blocks: tuple[nn.Module, ...]
    family: str
    hidden_size: int
    block_kinds: tuple[str, ...]
    streams: tuple[Stream, ...] = ()
    canvas_length: int | None = None

    @property
    def num_layers(self) -> int:
        """L, the number of residual blocks (vectors have L+1 rows)."""
        return len(self.blocks)

    @property
    def is_block_diffusion(self) -> bool:
        """A block-diffusion model: canvases denoised by a decoder, committed by an encoder."""
        return self.canvas_length is not None

    def stream(self, name: str | None = None) -> Stream:
        """The stream called ``name`` (default: the one that is read)."""
        for stream in self.streams:
            if (name is None and stream.path == self.path) or stream.name == name:
                return stream
        raise ArchitectureError(f"{self.family} has no residual stream {name or self.path!r}")

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
            **self._describe_streams(),
            **self._describe_sparse(),
        }

    def _describe_sparse(self) -> dict[str, Any]:
        if not any(kind.startswith("sparse-attention") for kind in self.block_kinds):
            return {}
        return {
            "note": "dynamic sparse attention: where the indexer's top-k scores tie, "
            "transformers' cached decoding can keep other keys than a forward over the same "
            "tokens, so activations captured while generating can differ from a forward pass"
        }

    def _describe_streams(self) -> dict[str, Any]:
        if not self.streams:
            return {}
        return {
            "read_stream": self.stream().name,
            "streams": {
                s.name: {
                    "block_path": s.path,
                    "layout": "".join(_layout_letter(k) for k in s.block_kinds),
                    "covers": s.covers,
                }
                for s in self.streams
            },
            "canvas_length": self.canvas_length,
        }


_KIND_LETTER = {
    "attention": "A",
    "sliding-attention": "S",
    "sparse-attention": "D",
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


_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, dict[str | None, BlockLayout]] = (
    weakref.WeakKeyDictionary()
)


def find_blocks(model: nn.Module, block_path: str | None = None) -> BlockLayout:
    """Locate the ordered residual blocks of ``model`` (cached per model and ``block_path``
    while its blocks stay the same modules; a path given once does not change the default).

    Raises ArchitectureError when no plausible block list exists or ``block_path`` is wrong.
    """
    found = _LAYOUTS.setdefault(model, {})
    cached = found.get(block_path)
    if cached is not None:
        current = tuple(model.get_submodule(cached.path).children())
        if len(current) == cached.num_layers and all(
            a is b for a, b in zip(current, cached.blocks, strict=True)
        ):
            return cached
    layout = found[block_path] = _find_blocks(model, block_path)
    return layout


def _find_blocks(model: nn.Module, block_path: str | None) -> BlockLayout:
    for adapter in _ADAPTERS:
        adapted = adapter(model, block_path)
        if adapted is not None:
            return adapted
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


BLOCK_DIFFUSION_READ_STREAM = "encoder"  # chosen by measurement: see ARCHITECTURE.md
_DIFFUSION_COVERS = {
    "encoder": "prompt + committed canvases (one forward per canvas, into the KV cache)",
    "decoder": "the canvas being denoised (one forward per denoising step)",
}


def _block_diffusion_layout(model: nn.Module, block_path: str | None) -> BlockLayout | None:
    """Both streams of a block-diffusion model, found by structure, or None if it is not one:
    a config ``canvas_length``, and an encoder and a decoder that each hold L blocks."""
    canvas = getattr(getattr(model, "config", None), "canvas_length", None)
    get_encoder = getattr(model, "get_encoder", None)
    get_decoder = getattr(model, "get_decoder", None)
    if not isinstance(canvas, int) or not callable(get_encoder) or not callable(get_decoder):
        return None
    modules = {"encoder": get_encoder(), "decoder": get_decoder()}
    if not all(isinstance(m, nn.Module) for m in modules.values()):
        return None
    if modules["encoder"] is modules["decoder"]:
        return None
    names = {id(m): n for n, m in model.named_modules()}
    streams = []
    for name, module in modules.items():
        inner, blocks = _discover(module)
        path = ".".join(p for p in (names.get(id(module), ""), inner) if p)
        kinds = tuple(classify_block(b, i, model) for i, b in enumerate(blocks))
        streams.append(Stream(name, path, module, tuple(blocks), kinds, _DIFFUSION_COVERS[name]))
    if len({len(s.blocks) for s in streams}) != 1:
        return None
    by_path = {s.path: s for s in streams}
    if block_path is not None and block_path not in by_path:
        raise ArchitectureError(
            f"a block-diffusion model reads one of its streams: block_path must be one of "
            f"{sorted(by_path)}, not {block_path!r}"
        )
    read = (
        by_path[block_path]
        if block_path
        else next(s for s in streams if s.name == BLOCK_DIFFUSION_READ_STREAM)
    )
    return BlockLayout(
        path=read.path,
        blocks=read.blocks,
        family=str(getattr(text_config(model), "model_type", type(model).__name__)),
        hidden_size=_hidden_size(model),
        block_kinds=read.block_kinds,
        streams=tuple(streams),
        canvas_length=canvas,
    )


_ADAPTERS = (_block_diffusion_layout,)


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
_MOE_MARKERS = ("experts", "router")  # not "moe": dense MLPs of *Moe* families are named so


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
    elif attention and _picks_keys(block):
        kind = "sparse-attention"  # dynamic: an indexer picks each query's top-k keys
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


def _picks_keys(block: nn.Module) -> bool:
    """Whether a module in the block selects a top-k of keys per query (``index_topk``)."""
    return any(isinstance(getattr(m, "index_topk", None), int) for m in block.modules())


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
