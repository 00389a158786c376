"""PersonaVector: files, metadata, arithmetic, validation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from persona_lens.core.errors import InputError, LayerError, VectorError, VectorMismatchError
from persona_lens.core.vectors import (
    FORMAT,
    PersonaVector,
    cosine_matrix,
    cosine_similarity,
    layer_cosine_matrix,
)


def _vector(trait: str = "humorous", seed: int = 0, layers: int = 4, d: int = 8) -> PersonaVector:
    rows = torch.randn(layers + 1, d, generator=torch.Generator().manual_seed(seed))
    return PersonaVector(
        rows, trait, {"best_layer": "2", "model": "tiny", "model_fingerprint": "ab"}
    )


def test_save_load_roundtrip(tmp_path: Path) -> None:
    vector = _vector()
    vector.variants["prompt_avg"] = torch.ones(5, 8)
    path = vector.save(tmp_path / "sub" / "humorous.safetensors")
    loaded = PersonaVector.load(path)
    assert torch.equal(loaded.vectors, vector.vectors)
    assert torch.equal(loaded.variants["prompt_avg"], torch.ones(5, 8))
    assert loaded.trait == "humorous"
    assert loaded.best_layer == 2
    assert loaded.num_layers == 4 and loaded.hidden_size == 8
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        assert handle.get_tensor("vectors").dtype == torch.float32
    assert meta["format"] == FORMAT
    assert meta["num_layers"] == "4" and meta["hidden_size"] == "8"
    assert meta["model_fingerprint"] == "ab"
    assert [p.name for p in path.parent.iterdir()] == ["humorous.safetensors"]  # no temp left


def test_save_failure_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import persona_lens.core.vectors as vectors_module

    def broken(tensors: object, filename: str, metadata: object = None) -> None:
        Path(filename).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(vectors_module, "save_file", broken)
    with pytest.raises(InputError, match="disk full"):  # an OSError, said in one line
        _vector().save(tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_unnormalized_storage_and_arithmetic() -> None:
    a, b = _vector(seed=1), _vector(seed=2)
    assert torch.allclose((a + b).vectors, a.vectors + b.vectors)
    assert torch.allclose((a - b).vectors, a.vectors - b.vectors)
    assert torch.allclose((-a).vectors, -a.vectors)
    assert torch.allclose((2.5 * a).vectors, a.vectors * 2.5)
    assert torch.allclose(a.normalized().norms(), torch.ones(5))
    assert not torch.allclose(a.norms(), torch.ones(5))


def test_cosine_similarity() -> None:
    a = _vector(seed=1)
    assert torch.allclose(cosine_similarity(a, a), torch.ones(5))
    assert torch.allclose(cosine_similarity(a, -a), -torch.ones(5))
    matrix = cosine_matrix([a, _vector(seed=3), -a], layer=2)
    assert matrix.shape == (3, 3)
    assert math.isclose(float(matrix[0, 2]), -1.0, abs_tol=1e-6)
    assert torch.allclose(layer_cosine_matrix(a).diagonal(), torch.ones(5))


def test_rejects_nan_and_bad_shapes() -> None:
    rows = torch.zeros(5, 8)
    rows[1, 1] = float("nan")
    with pytest.raises(VectorError, match="NaN"):
        PersonaVector(rows, "bad")
    with pytest.raises(VectorError, match="2-D"):
        PersonaVector(torch.zeros(8), "bad")
    with pytest.raises(VectorMismatchError, match="shapes"):
        _vector() + _vector(layers=3)


def test_compatibility_messages() -> None:
    vector = _vector()
    vector.check_compatible(4, 8, "ab")
    with pytest.raises(VectorMismatchError, match="4 layers vs the model's 5"):
        vector.check_compatible(5, 8)
    with pytest.raises(VectorMismatchError, match="hidden size 8 vs the model's 16"):
        vector.check_compatible(4, 16)
    with pytest.raises(VectorMismatchError, match="fingerprint ab vs the model's cd"):
        vector.check_compatible(4, 8, "cd")


def test_layer_range() -> None:
    with pytest.raises(LayerError, match=r"0\.\.4"):
        _vector().at(5)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(VectorError, match="no vector file"):
        PersonaVector.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(VectorError, match="not a readable"):
        PersonaVector.load(junk)
