"""Control-vector GGUF files: export for llama.cpp's ``--control-vector``, import from llama.cpp
and repeng.

File layout (what llama.cpp's ``common_control_vector_load_one`` reads and repeng's
``ControlVector.export_gguf`` writes): ``general.architecture = "controlvector"``,
``controlvector.model_hint`` (a model type such as ``llama``), ``controlvector.layer_count``
(the number of direction tensors), and one float32 tensor ``direction.N`` of shape [d] per
steered layer. llama.cpp refuses a file with any other tensor or with ``direction.0``, so our
own metadata (trait, source layers, coefficient, the vector's metadata as JSON) lives in
``persona_lens.*`` key-value fields, which llama.cpp and repeng ignore.

Layer mapping. llama.cpp stores ``direction.N`` at buffer offset ``(N-1)*d`` and its
``llama_adapter_cvec::apply`` gives block ``il`` (0-based) the slice at ``(il-1)*d``, so
``direction.N`` is added to the output of 0-based block N, after its FFN residual add and
before the next block (``build_cvec``, ``l_out``). repeng's keys are the same 0-based block
indices (``model.layers[N]``). In persona-lens, layer position l is the output of 1-based block
l, so::

    persona-lens layer l  ==  llama.cpp / repeng direction.(l - 1)

Our layers 0 (embeddings) and 1 (first block) cannot be expressed in a llama.cpp file; export
covers layers 2..L. On import, ``direction.N`` becomes row N + 1; rows not in the file are zero.
A llama.cpp file adds every direction at its layer at once, scaled by ``--control-vector-scaled``
(a raw multi-layer add, ``--steer VEC:C@A-B`` here), not the layer-incremental ``@all``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from persona_lens.core.errors import LayerError, VectorError, VectorMismatchError
from persona_lens.core.files import atomic_write
from persona_lens.core.vectors import PersonaVector

ARCH = "controlvector"
LAYER_OFFSET = 1
"""persona-lens layer l is llama.cpp/repeng ``direction.(l - LAYER_OFFSET)``."""
KEY_PREFIX = "persona_lens."
_DIRECTION = re.compile(r"^direction\.(\d+)$")


def to_direction_index(layer: int) -> int:
    """llama.cpp/repeng ``direction.N`` index of persona-lens layer ``layer``."""
    return layer - LAYER_OFFSET


def from_direction_index(index: int) -> int:
    """persona-lens layer of llama.cpp/repeng ``direction.index``."""
    return index + LAYER_OFFSET


def exportable_layers(num_layers: int) -> range:
    """Layers a llama.cpp control vector can steer: 2..L (``direction.1`` .. ``direction.L-1``)."""
    return range(1 + LAYER_OFFSET, num_layers + 1)


def model_hint(vector: PersonaVector) -> str:
    """``controlvector.model_hint``: the model type where recorded, else the model spec."""
    meta = vector.metadata
    return meta.get("model_type") or meta.get("family") or meta.get("model") or "unknown"


# --- export -----------------------------------------------------------------------------------
def export_gguf(
    vector: PersonaVector,
    path: str | Path,
    *,
    layers: Sequence[int] | None = None,
    coefficient: float = 1.0,
    hint: str | None = None,
) -> Path:
    """Write ``coefficient * vector`` at ``layers`` (default: best_layer) as a control-vector GGUF.

    Atomic (temp file + rename). LayerError for a layer llama.cpp cannot steer.
    """
    import gguf

    chosen = _export_layers(vector, layers)

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_string(f"{ARCH}.model_hint", hint or model_hint(vector))
        writer.add_int32(f"{ARCH}.layer_count", len(chosen))
        writer.add_string(KEY_PREFIX + "trait", vector.trait)
        writer.add_string(KEY_PREFIX + "layers", ",".join(str(layer) for layer in chosen))
        writer.add_string(KEY_PREFIX + "layer_mapping", "direction.N = persona-lens layer N+1")
        writer.add_float32(KEY_PREFIX + "coefficient", float(coefficient))
        writer.add_int32(KEY_PREFIX + "num_layers", vector.num_layers)
        writer.add_int32(KEY_PREFIX + "hidden_size", vector.hidden_size)
        writer.add_string(KEY_PREFIX + "metadata", json.dumps(vector.metadata, sort_keys=True))
        for layer in chosen:
            row = (vector.at(layer) * float(coefficient)).numpy().astype(np.float32)
            writer.add_tensor(f"direction.{to_direction_index(layer)}", row)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return atomic_write(path, write)


def _export_layers(vector: PersonaVector, layers: Sequence[int] | None) -> list[int]:
    num_layers = vector.num_layers
    allowed = exportable_layers(num_layers)
    if layers is None:
        best = vector.best_layer
        if best is None:
            raise LayerError(
                f"vector {vector.trait!r} has no best_layer; pass --layer-range A-B "
                f"(within {allowed.start}-{num_layers})"
            )
        layers = [best]
    chosen = sorted(set(layers))
    if not chosen:
        raise LayerError("no layers to export")
    for layer in chosen:
        if layer not in allowed:
            raise LayerError(
                f"layer {layer} cannot be exported: llama.cpp control vectors steer the outputs "
                f"of blocks 2..{num_layers} (persona-lens layers {allowed.start}-{num_layers}; "
                "layer l is direction.(l-1))"
            )
    return chosen


# --- import -----------------------------------------------------------------------------------
@dataclass
class ControlVectorFile:
    """The contents of a control-vector GGUF: directions keyed by their ``direction.N`` index."""

    directions: dict[int, torch.Tensor]
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def hidden_size(self) -> int:
        return int(next(iter(self.directions.values())).shape[0])


def read_control_vector(path: str | Path) -> ControlVectorFile:
    """Read a llama.cpp or repeng control vector; VectorError if the file is not one."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise VectorError(f"no control-vector file at {path}")
    try:
        reader = gguf.GGUFReader(str(path))
        fields = {name: _field_value(f) for name, f in reader.fields.items()}
        tensors = [(t.name, t.tensor_type, np.array(t.data, copy=True)) for t in reader.tensors]
    except (ValueError, OSError, KeyError, IndexError) as exc:
        raise VectorError(f"{path} is not a readable GGUF file ({exc})") from exc
    arch = fields.get("general.architecture")
    if arch is not None and arch != ARCH:
        raise VectorError(
            f"{path} is a GGUF of architecture {arch!r}, not a control vector ({ARCH!r})"
        )
    directions: dict[int, torch.Tensor] = {}
    for name, kind, data in tensors:
        match = _DIRECTION.match(name)
        if match is None:
            raise VectorError(f"{path}: unexpected tensor {name!r} (expected direction.N)")
        if kind not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            raise VectorError(f"{path}: {name} has type {kind.name}; expected F32 or F16")
        row = torch.from_numpy(data.astype(np.float32).reshape(-1))
        directions[int(match.group(1))] = row
    if not directions:
        raise VectorError(f"{path} holds no direction tensors")
    sizes = {int(t.shape[0]) for t in directions.values()}
    if len(sizes) != 1:
        raise VectorError(f"{path}: direction tensors have different sizes {sorted(sizes)}")
    return ControlVectorFile(directions, fields)


def _field_value(f: Any) -> Any:
    """A GGUF key-value field as a Python scalar or string (arrays as lists)."""
    import gguf

    types = list(f.types)
    if not types:
        return None
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8", errors="replace")
    if types[0] == gguf.GGUFValueType.ARRAY:
        if types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8", errors="replace") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    return f.parts[f.data[0]].tolist()[0]


def import_gguf(
    path: str | Path,
    *,
    num_layers: int | None = None,
    hidden_size: int | None = None,
    trait: str | None = None,
) -> PersonaVector:
    """A control-vector GGUF as a PersonaVector: ``direction.N`` becomes row N+1, others zero.

    ``num_layers``/``hidden_size`` (from the target model) are checked against the file;
    without them L comes from the file's persona-lens metadata or its highest direction.
    """
    path = Path(path)
    cv = read_control_vector(path)
    fields = cv.fields
    d = cv.hidden_size
    if hidden_size is not None and d != hidden_size:
        raise VectorMismatchError(
            f"{path} holds directions of size {d}; the model's hidden size is {hidden_size}"
        )
    highest = from_direction_index(max(cv.directions))
    recorded = fields.get(KEY_PREFIX + "num_layers")
    if num_layers is not None and recorded is not None and int(recorded) != num_layers:
        raise VectorMismatchError(
            f"{path} was exported from a model with {recorded} layers; this one has {num_layers}"
        )
    layers = num_layers if num_layers is not None else int(recorded or highest)
    if highest > layers:
        raise VectorMismatchError(
            f"{path} steers direction.{max(cv.directions)} (layer {highest}) but the model "
            f"has {layers} layers"
        )
    rows = torch.zeros(layers + 1, d)
    for index, row in cv.directions.items():
        rows[from_direction_index(index)] = row
    metadata = _restored_metadata(fields)
    imported = sorted(from_direction_index(i) for i in cv.directions)
    metadata.update(
        {
            "imported_from": str(path),
            "imported_layers": ",".join(str(layer) for layer in imported),
            "control_vector_model_hint": str(fields.get(f"{ARCH}.model_hint", "")),
        }
    )
    best = metadata.get("best_layer", "")
    if not (best.isdigit() and int(best) in imported):
        metadata.pop("best_layer", None)
        if len(imported) == 1:
            metadata["best_layer"] = str(imported[0])
    metadata.pop("num_layers", None)
    metadata.pop("hidden_size", None)
    name = trait or str(fields.get(KEY_PREFIX + "trait") or "") or path.stem
    return PersonaVector(rows, name, metadata)


def _restored_metadata(fields: dict[str, Any]) -> dict[str, str]:
    raw = fields.get(KEY_PREFIX + "metadata")
    if not isinstance(raw, str):
        return {"method": "imported/control_vector"}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    metadata = {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
    coefficient = fields.get(KEY_PREFIX + "coefficient")
    if isinstance(coefficient, (int, float)) and float(coefficient) != 1.0:
        metadata["export_coefficient"] = repr(float(coefficient))
    return metadata
