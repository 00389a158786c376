"""The server's vectors: every ``*.safetensors`` file of one folder, checked against the model.

A vector is known by its name (the file name without ``.safetensors``) and identified by its
content hash (SHA-256 of the direction tensor), so two files holding the same directions are the
same vector and a name never stands for stale contents. Requests may name a vector or give its
hash; a path (``..``, ``/``) or an unknown name is refused. Loading refuses a vector made for
another model (:class:`~persona_lens.core.errors.VectorMismatchError`), and one without a
``best_layer`` (where the server monitors and, by default, steers it).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persona_lens.core.architecture import BlockLayout
from persona_lens.core.errors import InputError, VectorError, VectorMismatchError
from persona_lens.core.vectors import PersonaVector
from persona_lens.monitoring.chat import MeterScale

HASH_PREFIX = "sha256:"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
_META_KEYS = ("description", "model", "method", "created", "library_version", "judge")


def content_hash(vector: PersonaVector) -> str:
    """``sha256:`` + the first 16 hex digits of the hash of the [L+1, d] float32 directions."""
    tensor = vector.vectors.contiguous()
    digest = hashlib.sha256(str(tuple(tensor.shape)).encode())
    digest.update(tensor.numpy().tobytes())
    return HASH_PREFIX + digest.hexdigest()[:16]


@dataclass
class ServedVector:
    """One loaded vector: its name, content hash, file, direction and monitor layer."""

    name: str
    hash: str
    path: Path
    vector: PersonaVector
    layer: int
    meter: MeterScale | None = field(default=None)

    def describe(self) -> dict[str, Any]:
        """What ``GET /v1/persona/vectors`` lists for this vector."""
        meta = self.vector.metadata
        return {
            "name": self.name,
            "trait": self.vector.trait,
            "hash": self.hash,
            "layer": self.layer,
            "num_layers": self.vector.num_layers,
            "hidden_size": self.vector.hidden_size,
            "model_fingerprint": self.vector.model_fingerprint,
            "norm": float(self.vector.at(self.layer).norm()),
            "meter": None
            if self.meter is None
            else {"baseline": self.meter.baseline, "scale": self.meter.scale},
            **{key: meta[key] for key in _META_KEYS if meta.get(key)},
        }


def check_name(name: str) -> None:
    """InputError unless ``name`` is a plain vector name or a content hash."""
    if name.startswith(HASH_PREFIX) and re.fullmatch(r"[0-9a-f]{16}", name[len(HASH_PREFIX) :]):
        return
    if "/" in name or "\\" in name or ".." in name or name.startswith("~"):
        raise InputError(
            f"{name!r} looks like a path; name a vector the server loaded "
            "(GET /v1/persona/vectors lists them)"
        )
    if not _NAME.match(name):
        raise InputError(f"{name!r} is not a vector name")


class VectorLibrary:
    """The vectors of one folder, by name and by content hash."""

    def __init__(self, vectors: list[ServedVector], folder: Path | None = None) -> None:
        self.folder = folder
        self._by_name = {v.name: v for v in vectors}
        self._by_hash: dict[str, ServedVector] = {}
        for served in vectors:
            self._by_hash.setdefault(served.hash, served)

    @classmethod
    def load(
        cls, folder: str | Path, layout: BlockLayout, fingerprint: str | None = None
    ) -> VectorLibrary:
        """Every ``*.safetensors`` in ``folder`` (not recursive), checked against the model."""
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"no vector folder at {folder}")
        vectors = []
        for path in sorted(folder.glob("*.safetensors")):
            vector = PersonaVector.load(path)
            try:
                vector.check_compatible(layout.num_layers, layout.hidden_size, fingerprint)
            except VectorMismatchError as exc:
                raise VectorMismatchError(f"{path}: {exc}") from exc
            if vector.best_layer is None:
                raise VectorError(f"{path}: vector {vector.trait!r} has no best_layer")
            name = path.name.removesuffix(".safetensors")
            if not _NAME.match(name):
                raise InputError(f"{path}: {name!r} is not usable as a vector name")
            layer = vector.best_layer
            vectors.append(ServedVector(name, content_hash(vector), path, vector, layer))
        return cls(vectors, folder)

    def __iter__(self) -> Iterator[ServedVector]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    def get(self, ref: str) -> ServedVector:
        """The vector a request names (by name or content hash); InputError otherwise."""
        check_name(ref)
        found = self._by_hash.get(ref) if ref.startswith(HASH_PREFIX) else self._by_name.get(ref)
        if found is None:
            loaded = ", ".join(self.names) or "none"
            raise InputError(f"unknown vector {ref!r} (loaded: {loaded})")
        return found
