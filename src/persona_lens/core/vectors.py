"""Persona vectors: one direction per layer position, with metadata, saved as safetensors.

File format (DESIGN.md): ``<trait>.safetensors`` holding the float32 tensor ``vectors`` of
shape [L+1, d], unnormalized (row l is the mean difference at layer position l), plus string
metadata (``format``, ``trait``, ``model_fingerprint``, ``num_layers``, ``hidden_size``,
``best_layer``, ...). Optional extra tensors hold method variants (e.g. ``prompt_avg``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from persona_lens.core.errors import LayerError, VectorError, VectorMismatchError
from persona_lens.core.files import atomic_write
from persona_lens.core.version import __version__

FORMAT = "persona-lens/1"
NEAR_ZERO = 1e-6
"""A row counts as zero below this norm (relative to the vector's largest row, when above 1)."""


def check_finite_matrix(tensor: torch.Tensor, what: str = "vector") -> torch.Tensor:
    """Return ``tensor`` as float32 [rows, d]; VectorError if it is not 2-D or not finite."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or tensor.shape[0] < 1:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise VectorError(f"{what} must be a 2-D tensor [L+1, d], got {shape}")
    if not torch.isfinite(tensor).all():
        raise VectorError(f"{what} holds NaN or infinite values")
    return tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()


@dataclass
class PersonaVector:
    """A trait direction for every layer position 0..L of one model."""

    vectors: torch.Tensor
    trait: str = "trait"
    metadata: dict[str, str] = field(default_factory=dict)
    variants: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.vectors = check_finite_matrix(self.vectors, f"vector {self.trait!r}")
        self.variants = {
            k: check_finite_matrix(v, f"variant {k!r}") for k, v in self.variants.items()
        }

    # --- shape and metadata -------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """L: the vector has rows 0..L."""
        return int(self.vectors.shape[0]) - 1

    @property
    def hidden_size(self) -> int:
        return int(self.vectors.shape[1])

    def _layer(self, key: str) -> int | None:
        value = self.metadata.get(key, "")
        return int(value) if value.lstrip("-").isdigit() else None

    @property
    def best_layer(self) -> int | None:
        return self._layer("best_layer")

    @property
    def read_layer(self) -> int | None:
        """The layer to read the trait at (screening): ``read_layer`` when the extraction
        chose one, else ``best_layer``."""
        read = self._layer("read_layer")
        return read if read is not None else self.best_layer

    @property
    def model_fingerprint(self) -> str | None:
        return self.metadata.get("model_fingerprint") or None

    def at(self, layer: int) -> torch.Tensor:
        """Row ``layer`` (0..L)."""
        check_layer(layer, self.num_layers, allow_zero=True)
        return self.vectors[layer]

    def norms(self) -> torch.Tensor:
        """Per-layer L2 norm, shape [L+1]."""
        return self.vectors.norm(dim=-1)

    def near_zero(self, layer: int) -> bool:
        """Whether row ``layer`` is (nearly) zero: steering with it does nothing and
        projections onto it are 0 (see :data:`NEAR_ZERO`)."""
        norms = self.norms()
        return float(norms[layer]) <= NEAR_ZERO * max(1.0, float(norms.max()))

    # --- arithmetic ---------------------------------------------------------------------
    def _derive(self, vectors: torch.Tensor, trait: str | None = None) -> PersonaVector:
        return PersonaVector(vectors, trait or self.trait, dict(self.metadata))

    def scaled(self, factor: float) -> PersonaVector:
        return self._derive(self.vectors * factor)

    def normalized(self) -> PersonaVector:
        """Unit norm at every layer (zero rows stay zero)."""
        norms = self.norms().clamp_min(1e-12).unsqueeze(-1)
        return self._derive(self.vectors / norms)

    def __neg__(self) -> PersonaVector:
        return self._derive(-self.vectors, f"-{self.trait}")

    def __mul__(self, factor: float) -> PersonaVector:
        return self.scaled(factor)

    __rmul__ = __mul__

    def __add__(self, other: PersonaVector) -> PersonaVector:
        _check_same_shape(self, other)
        return self._derive(self.vectors + other.vectors, f"{self.trait}+{other.trait}")

    def __sub__(self, other: PersonaVector) -> PersonaVector:
        _check_same_shape(self, other)
        return self._derive(self.vectors - other.vectors, f"{self.trait}-{other.trait}")

    # --- compatibility ------------------------------------------------------------------
    def check_compatible(
        self, num_layers: int, hidden_size: int, fingerprint: str | None = None
    ) -> None:
        """Raise VectorMismatchError, saying what differs, if made for another model."""
        problems = []
        if self.num_layers != num_layers:
            problems.append(f"{self.num_layers} layers vs the model's {num_layers}")
        if self.hidden_size != hidden_size:
            problems.append(f"hidden size {self.hidden_size} vs the model's {hidden_size}")
        mine = self.model_fingerprint
        if not problems and fingerprint and mine and mine != fingerprint:
            problems.append(f"model fingerprint {mine} vs the model's {fingerprint}")
        if problems:
            made_for = self.metadata.get("model", "another model")
            raise VectorMismatchError(
                f"vector {self.trait!r} was made for {made_for}: " + "; ".join(problems)
            )

    # --- files --------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file + rename); returns the path."""
        metadata = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **self.metadata,
            "format": FORMAT,
            "trait": self.trait,
            "num_layers": str(self.num_layers),
            "hidden_size": str(self.hidden_size),
            "library_version": __version__,
        }
        tensors = {"vectors": self.vectors, **{f"variant.{k}": v for k, v in self.variants.items()}}
        string_metadata = {k: str(v) for k, v in metadata.items()}
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=string_metadata))

    @classmethod
    def load(cls, path: str | Path) -> PersonaVector:
        """Read a vector file; VectorError if it is missing or not ours."""
        path = Path(path)
        if not path.is_file():
            raise VectorError(f"no vector file at {path}")
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
        except (SafetensorError, OSError, ValueError) as exc:
            raise VectorError(f"{path} is not a readable safetensors file ({exc})") from exc
        if "vectors" not in tensors:
            raise VectorError(f"{path} holds no 'vectors' tensor; is it a persona-lens vector?")
        fmt = metadata.get("format", "")
        if fmt and fmt != FORMAT:
            raise VectorError(f"{path} has format {fmt!r}; this version reads {FORMAT!r}")
        variants = {
            k.removeprefix("variant."): v for k, v in tensors.items() if k.startswith("variant.")
        }
        trait = metadata.get("trait") or path.stem
        try:
            return cls(tensors["vectors"], trait, metadata, variants)
        except VectorError as exc:
            raise VectorError(f"{path}: {exc}") from exc


def check_layer(layer: int, num_layers: int, *, allow_zero: bool = False) -> int:
    """Validate a layer index against L; LayerError with the valid range otherwise."""
    low = 0 if allow_zero else 1
    if isinstance(layer, bool) or not isinstance(layer, int) or not low <= layer <= num_layers:
        what = "layer position" if allow_zero else "steering layer"
        raise LayerError(f"{what} {layer!r} is out of range {low}..{num_layers}")
    return layer


def _check_same_shape(a: PersonaVector, b: PersonaVector) -> None:
    if a.vectors.shape != b.vectors.shape:
        raise VectorMismatchError(
            f"vectors {a.trait!r} {tuple(a.vectors.shape)} and {b.trait!r} "
            f"{tuple(b.vectors.shape)} have different shapes"
        )


def cosine_similarity(a: PersonaVector, b: PersonaVector) -> torch.Tensor:
    """Per-layer cosine similarity of two vectors, shape [L+1]."""
    _check_same_shape(a, b)
    return torch.nn.functional.cosine_similarity(a.vectors, b.vectors, dim=-1, eps=1e-12)


def cosine_matrix(vectors: list[PersonaVector], layer: int) -> torch.Tensor:
    """Cosine similarity between several traits at one layer, shape [n, n]."""
    rows = torch.stack([v.at(layer) for v in vectors])
    unit = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return unit @ unit.T


def layer_cosine_matrix(vector: PersonaVector) -> torch.Tensor:
    """Cosine similarity of one trait's directions across layers, shape [L+1, L+1]."""
    unit = vector.normalized().vectors
    return unit @ unit.T
