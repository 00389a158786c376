"""Files on the command line: prompt JSONL in, result JSONL out, ``--steer``/``--monitor`` values.

- :func:`read_prompts` reads one JSON object a line (``{"messages": [...]}`` or
  ``{"prompt": "..."}``); a bad line raises :class:`InputError` naming the file and line number.
- :func:`write_jsonl` writes records atomically (temp file + rename), so a failed run leaves
  no partial output. NaN/inf floats become ``null``, which strict JSON readers accept.
- :func:`parse_steer` / :func:`parse_vector_ref` parse ``VEC:COEF[@LAYER]`` and ``VEC[@LAYER]``
  where LAYER is ``N``, ``all`` (layer-incremental steering), ``A-B`` or ``A,B,C``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from persona_lens.core.errors import InputError
from persona_lens.core.files import atomic_write

LayerSel = int | Literal["all"] | tuple[int, ...] | None
"""A layer selection: one layer, ``"all"``, several layers, or None (the vector's best_layer)."""

_LAYER_RE = re.compile(r"^(all|\d+|\d+-\d+|\d+(,\d+)+)$")


# --- prompt files -----------------------------------------------------------------------------
def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Read a prompt JSONL file; every record needs ``messages`` (a list) or ``prompt`` (text).

    Blank lines are skipped. Raises InputError for a missing or empty file, a line that is not
    a JSON object, or a record without a usable prompt, naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no prompt file at {path}")
    records: list[dict[str, Any]] = []
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                records.append(_parse_record(line, f"{path}:{number}"))
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text ({exc.reason})") from exc
    if not records:
        raise InputError(f"{path} holds no prompts")
    return records


def _parse_record(line: str, where: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    messages = record.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            raise InputError(f"{where}: 'messages' must be a non-empty list")
        for message in messages:
            if not isinstance(message, dict) or not all(
                isinstance(message.get(k), str) for k in ("role", "content")
            ):
                raise InputError(f"{where}: every message needs string 'role' and 'content'")
    elif not isinstance(record.get("prompt"), str):
        raise InputError(f"{where}: needs a 'messages' list or a 'prompt' string")
    return record


# --- output files -----------------------------------------------------------------------------
def json_safe(value: Any) -> Any:
    """``value`` with NaN/inf floats replaced by None, recursively (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write one JSON object a line, atomically (temp file in the same folder + rename)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"output path {path} is a directory")

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(json_safe(record), ensure_ascii=False, allow_nan=False))
                handle.write("\n")

    return atomic_write(path, write)


# --- --steer / --monitor values ---------------------------------------------------------------
@dataclass(frozen=True)
class VectorRef:
    """A vector file with an optional layer selection (``VEC[@LAYER]``)."""

    path: Path
    layers: LayerSel = None


@dataclass(frozen=True)
class SteerArg:
    """A parsed ``--steer VEC:COEF[@LAYER]``."""

    path: Path
    coefficient: float
    layers: LayerSel = None


def parse_layers(text: str, option: str = "layer") -> LayerSel:
    """Parse ``N``, ``all``, ``A-B`` (inclusive) or ``A,B,C``; range checks come later."""
    text = text.strip().lower()
    if not _LAYER_RE.match(text):
        raise InputError(f"{option} {text!r} is not a layer: use N, all, A-B or A,B,C")
    if text == "all":
        return "all"
    if "-" in text:
        low, high = (int(part) for part in text.split("-"))
        if low > high:
            raise InputError(f"{option} range {text!r} is empty (start after end)")
        return tuple(range(low, high + 1))
    if "," in text:
        return tuple(int(part) for part in text.split(","))
    return int(text)


def _split_layer(text: str, option: str) -> tuple[str, LayerSel]:
    """Split a trailing ``@LAYER`` off (a path may contain '@' itself)."""
    head, sep, tail = text.rpartition("@")
    if not sep or not head:
        return text, None
    if not _LAYER_RE.match(tail.strip().lower()):
        if re.match(r"^[\w,\- ]*$", tail) and not tail.endswith((".safetensors", ".gguf")):
            raise InputError(f"{option} {text!r}: {tail!r} is not a layer (N, all, A-B, A,B)")
        return text, None
    return head, parse_layers(tail, option)


def parse_vector_ref(text: str, option: str = "--monitor") -> VectorRef:
    """Parse ``VEC[@LAYER]``."""
    if not text.strip():
        raise InputError(f"{option} needs a vector file")
    path, layers = _split_layer(text.strip(), option)
    return VectorRef(Path(path), layers)


def parse_steer(text: str, option: str = "--steer") -> SteerArg:
    """Parse ``VEC:COEF[@LAYER]``; a negative coefficient suppresses the trait. ``option``
    names the flag in error messages (``--prevent`` and ``--regularize`` share the form)."""
    rest, layers = _split_layer(text.strip(), option)
    path, sep, coef_text = rest.rpartition(":")
    if not sep or not path:
        raise InputError(
            f"{option} {text!r}: expected VEC:COEF[@LAYER], e.g. humorous.safetensors:2"
        )
    try:
        coefficient = float(coef_text)
    except ValueError:
        raise InputError(f"{option} {text!r}: coefficient {coef_text!r} is not a number") from None
    if not math.isfinite(coefficient):
        raise InputError(f"{option} {text!r}: coefficient must be finite")
    return SteerArg(Path(path), coefficient, layers)


def unique_names(names: Sequence[str], layers: Sequence[int]) -> list[str]:
    """Output keys for monitored traits: the trait name, ``trait@layer`` where names repeat."""
    keys = [
        n if names.count(n) == 1 else f"{n}@{layer}" for n, layer in zip(names, layers, strict=True)
    ]
    duplicates = {k for k in keys if keys.count(k) > 1}
    if duplicates:
        raise InputError(f"the same vector is monitored twice at one layer: {sorted(duplicates)}")
    return keys
