"""Tests of persona_lens.interop.control_vectors and ``persona export`` / ``persona import``: the
llama.cpp control-vector GGUF layout, the layer mapping, round trips and repeng files."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from persona_lens.cli import app
from persona_lens.core.errors import InputError, LayerError, VectorError, VectorMismatchError
from persona_lens.core.models import LoadedModel, load_model, model_fingerprint
from persona_lens.core.steering import SteeringSpec, steer
from persona_lens.core.vectors import PersonaVector
from persona_lens.interop.control_vectors import (
    export_gguf,
    from_direction_index,
    import_gguf,
    to_direction_index,
)
from tests.tiny import HIDDEN_SIZE, tiny_model_dir

L = 4


def _vector(seed: int = 0, best: int | None = 3, **meta: str) -> PersonaVector:
    rows = torch.randn(L + 1, HIDDEN_SIZE, generator=torch.Generator().manual_seed(seed))
    metadata = {"model": "tiny", "description": "d", **meta}
    if best is not None:
        metadata["best_layer"] = str(best)
    return PersonaVector(rows, "humorous", metadata)


def _field(reader: gguf.GGUFReader, name: str) -> object:
    field = reader.get_field(name)
    assert field is not None, name
    if field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode()
    return field.parts[field.data[0]].tolist()[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LoadedModel]:
    path = tiny_model_dir(tmp_path_factory.mktemp("tiny-cv"), seed=3, num_layers=L)
    return path, load_model(str(path))


# --- layout -------------------------------------------------------------------------------------
def test_export_layout_matches_llama_cpp(tmp_path: Path) -> None:
    vector = _vector(model_type="llama")
    path = export_gguf(vector, tmp_path / "h.gguf", layers=[2, 3, 4], coefficient=1.5)
    reader = gguf.GGUFReader(str(path))
    assert _field(reader, "general.architecture") == "controlvector"
    assert _field(reader, "controlvector.model_hint") == "llama"
    assert _field(reader, "controlvector.layer_count") == 3
    # llama.cpp refuses any tensor other than direction.N with N >= 1, F32, 1-D
    names = [t.name for t in reader.tensors]
    assert names == ["direction.1", "direction.2", "direction.3"]
    for tensor in reader.tensors:
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(tensor.shape) == [HIDDEN_SIZE]
        layer = from_direction_index(int(tensor.name.split(".")[1]))
        np.testing.assert_allclose(tensor.data, 1.5 * vector.vectors[layer].numpy(), rtol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.gguf"]


def test_default_export_is_best_layer_only(tmp_path: Path) -> None:
    path = export_gguf(_vector(best=4), tmp_path / "h.gguf")
    reader = gguf.GGUFReader(str(path))
    assert [t.name for t in reader.tensors] == ["direction.3"]
    assert _field(reader, "controlvector.model_hint") == "tiny"


@pytest.mark.parametrize(
    ("layers", "best", "needle"),
    [
        (None, None, "no best_layer"),
        ([1, 2], 3, "layer 1 cannot be exported"),
        ([0], 3, "layer 0 cannot be exported"),
        ([5], 3, "layer 5 cannot be exported"),
        ([], 3, "no layers"),
    ],
)
def test_export_refuses_unexpressible_layers(
    tmp_path: Path, layers: list[int] | None, best: int | None, needle: str
) -> None:
    with pytest.raises(LayerError, match=needle):
        export_gguf(_vector(best=best), tmp_path / "h.gguf", layers=layers)
    assert not (tmp_path / "h.gguf").exists()


def test_round_trip_restores_rows_and_metadata(tmp_path: Path) -> None:
    vector = _vector(best=3, model_fingerprint="abcd1234abcd1234")
    path = export_gguf(vector, tmp_path / "h.gguf", layers=[2, 3])
    back = import_gguf(path)
    assert back.trait == "humorous" and back.num_layers == L
    torch.testing.assert_close(back.vectors[2:4], vector.vectors[2:4])
    assert back.vectors[[0, 1, 4]].abs().sum() == 0
    assert back.best_layer == 3
    assert back.model_fingerprint == "abcd1234abcd1234"
    assert back.metadata["imported_layers"] == "2,3"
    assert "export_coefficient" not in back.metadata


def test_import_drops_best_layer_that_was_not_exported(tmp_path: Path) -> None:
    back = import_gguf(export_gguf(_vector(best=2), tmp_path / "h.gguf", layers=[3, 4]))
    assert back.best_layer is None
    single = import_gguf(export_gguf(_vector(best=2), tmp_path / "s.gguf", layers=[4]))
    assert single.best_layer == 4


def _repeng_style(
    path: Path, directions: dict[int, np.ndarray], arch: str = "controlvector"
) -> Path:
    """A file the way repeng's ControlVector.export_gguf writes it (0-based block keys)."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_string(f"{arch}.model_hint", "llama")
    writer.add_uint32(f"{arch}.layer_count", len(directions))
    for layer, row in directions.items():
        writer.add_tensor(f"direction.{layer}", row)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_import_repeng_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    directions = {k: rng.standard_normal(HIDDEN_SIZE).astype(np.float32) for k in (3, 2, 1)}
    path = _repeng_style(tmp_path / "happy.gguf", directions)
    vector = import_gguf(path)
    assert vector.trait == "happy" and vector.num_layers == 4  # highest direction.3 -> layer 4
    for k, row in directions.items():
        np.testing.assert_array_equal(vector.vectors[k + 1].numpy(), row)
    assert vector.vectors[:2].abs().sum() == 0
    assert vector.best_layer is None
    assert vector.metadata["control_vector_model_hint"] == "llama"
    padded = import_gguf(path, num_layers=6, hidden_size=HIDDEN_SIZE, trait="joy")
    assert padded.trait == "joy" and padded.vectors.shape == (7, HIDDEN_SIZE)
    with pytest.raises(VectorMismatchError, match="layer 4"):
        import_gguf(path, num_layers=3)
    with pytest.raises(VectorMismatchError, match="hidden size is 32"):
        import_gguf(path, hidden_size=32)


def test_import_refuses_other_files(tmp_path: Path) -> None:
    row = np.ones(8, dtype=np.float32)
    with pytest.raises(VectorError, match="architecture 'llama'"):
        import_gguf(_repeng_style(tmp_path / "m.gguf", {1: row}, arch="llama"))
    with pytest.raises(VectorError, match="size"):
        import_gguf(_repeng_style(tmp_path / "s.gguf", {1: row, 2: np.ones(4, np.float32)}))
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"definitely not gguf")
    with pytest.raises(VectorError, match="not a readable GGUF"):
        import_gguf(not_gguf)
    with pytest.raises(VectorError, match="no control-vector file"):
        import_gguf(tmp_path / "missing.gguf")


# --- layer mapping on a real model ----------------------------------------------------------------
def test_direction_n_steers_zero_based_block_n(
    tmp_path: Path, tiny: tuple[Path, LoadedModel]
) -> None:
    """What llama.cpp does with direction.N (add to the output of its 0-based block N) equals
    persona-lens steering of the imported vector at layer N+1."""
    _, lm = tiny
    model = lm.model
    rng = np.random.default_rng(1)
    row = (3 * rng.standard_normal(HIDDEN_SIZE)).astype(np.float32)
    n = 2
    vector = import_gguf(_repeng_style(tmp_path / "d.gguf", {n: row}), num_layers=L)
    ids = torch.tensor([[1, 5, 6, 5, 7]])

    def llama_cpp_hook(module: torch.nn.Module, args: object, output: object) -> object:
        hidden = output[0] if isinstance(output, tuple) else output
        steered = hidden + torch.from_numpy(row)
        return (steered, *output[1:]) if isinstance(output, tuple) else steered

    with torch.no_grad():
        handle = model.model.layers[n].register_forward_hook(llama_cpp_hook)
        try:
            expected = model(input_ids=ids).logits
        finally:
            handle.remove()
        with steer(model, SteeringSpec(vector, 1.0, layers=from_direction_index(n))):
            got = model(input_ids=ids).logits
        with steer(model, SteeringSpec(vector, 1.0, layers=n)):
            off_by_one = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(off_by_one, expected, atol=1e-3)
    assert to_direction_index(from_direction_index(n)) == n


# --- command line -------------------------------------------------------------------------------
def test_cli_export_import_round_trip(tmp_path: Path, tiny: tuple[Path, LoadedModel]) -> None:
    model_dir, lm = tiny
    fingerprint = model_fingerprint(lm.model, lm.tokenizer)
    source = _vector(best=3, model_fingerprint=fingerprint).save(tmp_path / "h.safetensors")
    runner = CliRunner()
    gguf_path = tmp_path / "h.gguf"
    result = runner.invoke(
        app,
        ["export", str(source), "--format", "gguf", "--layer-range", "2-3", "-o", str(gguf_path)],
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith("h.gguf")
    assert [t.name for t in gguf.GGUFReader(str(gguf_path)).tensors] == [
        "direction.1",
        "direction.2",
    ]
    out = tmp_path / "back.safetensors"
    result = runner.invoke(
        app, ["import", str(gguf_path), "--model", str(model_dir), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    back = PersonaVector.load(out)
    original = PersonaVector.load(source)
    torch.testing.assert_close(back.vectors[2:4], original.vectors[2:4])
    assert back.model_fingerprint == fingerprint and back.metadata["model"] == str(model_dir)
    assert back.metadata["model_type"] == "llama"


def test_cli_export_and_import_errors(tmp_path: Path, tiny: tuple[Path, LoadedModel]) -> None:
    model_dir, _ = tiny
    source = _vector(best=3, model_fingerprint="0" * 16).save(tmp_path / "h.safetensors")
    runner = CliRunner()
    out = tmp_path / "h.gguf"
    result = runner.invoke(app, ["export", str(source), "--format", "onnx", "-o", str(out)])
    assert isinstance(result.exception, InputError)
    result = runner.invoke(app, ["export", str(source), "--layer-range", "1-2", "-o", str(out)])
    assert isinstance(result.exception, LayerError)
    result = runner.invoke(app, ["export", str(tmp_path / "no.safetensors"), "-o", str(out)])
    assert isinstance(result.exception, VectorError)
    assert not out.exists()
    # the vector's fingerprint says it was made for another model
    export_gguf(PersonaVector.load(source), out)
    result = runner.invoke(
        app, ["import", str(out), "-m", str(model_dir), "-o", str(tmp_path / "b.safetensors")]
    )
    assert isinstance(result.exception, VectorMismatchError)
    assert not (tmp_path / "b.safetensors").exists()
