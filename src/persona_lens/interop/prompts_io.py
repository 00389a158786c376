"""Files on the command line: prompt JSONL in, result JSONL out, ``--steer``/``--monitor`` values.

- :func:`read_prompts` reads one JSON object a line (``{"messages": [...]}`` or
  ``{"prompt": "..."}``, optionally with a ``"prefill"``); a bad line, a bad role or a
  conversation that ends with nothing to answer raises :class:`InputError` naming the file
  and line number (:mod:`persona_lens.core.messages` has the rules).
- :func:`fit_prompts` checks them against the loaded model's context, before any generation:
  a prompt that leaves no room for ``max_new_tokens`` is refused, naming its line, or, with
  ``max_prompt_tokens``, cut by the policy in :func:`cut_prompt`.
- :func:`write_jsonl` writes records through :mod:`persona_lens.core.files` (atomic, or
  streamed for ``-``/FIFOs), so a failed run leaves no partial output. NaN/inf floats become
  ``null``, which strict JSON readers accept.
- :func:`parse_steer` / :func:`parse_vector_ref` parse ``VEC:COEF[@LAYER]`` and ``VEC[@LAYER]``
  where LAYER is ``N``, ``all`` (layer-incremental steering), ``A-B`` or ``A,B,C``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from persona_lens.core.errors import InputError
from persona_lens.core.files import atomic_write
from persona_lens.core.messages import check_messages, check_prefill

LayerSel = int | Literal["all"] | tuple[int, ...] | None
"""A layer selection: one layer, ``"all"``, several layers, or None (the vector's best_layer)."""

_LAYER_RE = re.compile(r"^(all|\d+|\d+-\d+|\d+(,\d+)+)$")


# --- prompt files -----------------------------------------------------------------------------
@dataclass
class PromptFile:
    """The records of a prompt file and the line each came from."""

    path: Path
    records: list[dict[str, Any]]
    lines: list[int] = field(default_factory=list)

    def where(self, index: int) -> str:
        """``FILE:LINE`` of record ``index``."""
        return f"{self.path}:{self.lines[index]}" if self.lines else f"{self.path}#{index + 1}"


def read_prompt_file(path: str | Path) -> PromptFile:
    """Read a prompt JSONL file; every record needs ``messages`` (a list) or ``prompt`` (text).

    Blank lines are skipped. Raises InputError for a missing or empty file, a line that is not
    a JSON object, or a record without a prompt the model can answer, naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no prompt file at {path}")
    prompts = PromptFile(path, [])
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                prompts.records.append(_parse_record(line, f"{path}:{number}"))
                prompts.lines.append(number)
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text ({exc.reason})") from exc
    if not prompts.records:
        raise InputError(f"{path} holds no prompts")
    return prompts


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """The records of :func:`read_prompt_file`."""
    return read_prompt_file(path).records


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
    elif not record["prompt"].strip():
        raise InputError(f"{where}: the prompt is empty")
    try:
        if messages is not None:
            check_messages(messages)
        check_prefill(record.get("prefill"))
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
    return record


# --- prompts against a model --------------------------------------------------------------
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length")


def context_length(model: Any) -> int | None:
    """The longest sequence the model's position scheme covers (None: no such limit known)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def fit_prompts(
    prompts: PromptFile,
    model: Any,
    tokenizer: Any,
    *,
    max_new_tokens: int = 0,
    max_prompt_tokens: int | None = None,
    system: str | None = None,
) -> list[dict[str, Any]]:
    """The records, checked against the model before generation: each must render with its
    chat template (``tool`` roles where supported) and leave room in the context for
    ``max_new_tokens``. A longer prompt is an error naming its line, unless
    ``max_prompt_tokens`` is given: then :func:`cut_prompt` shortens it, the returned record
    carries ``prompt_tokens_cut`` and a note on stderr lists the lines."""
    from persona_lens.core.generation import render_prompt

    context = context_length(model)
    room = None if context is None else context - max_new_tokens
    if max_prompt_tokens is not None:
        if max_prompt_tokens < 1:
            raise InputError("--max-prompt-tokens must be at least 1")
        if room is not None and max_prompt_tokens > room:
            raise InputError(
                f"--max-prompt-tokens {max_prompt_tokens} with --max-new-tokens {max_new_tokens} "
                f"passes the model's context of {context} tokens (at most {max(room, 0)})"
            )
        room = max_prompt_tokens
    if room is not None and room < 1:
        raise InputError(
            f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
            f"context of {context} tokens"
        )
    fitted, cut_lines = [], []
    for index, record in enumerate(prompts.records):
        where = prompts.where(index)
        try:
            length = _token_count(tokenizer, render_prompt(tokenizer, record, system))
            if room is not None and length > room:
                if max_prompt_tokens is None:
                    budget = (
                        f"leaves room for {room} with --max-new-tokens {max_new_tokens}"
                        if max_new_tokens
                        else "is shorter"
                    )
                    raise InputError(
                        f"the prompt has {length} tokens; the model's context of {context} "
                        f"{budget}: shorten it, or cut long prompts with --max-prompt-tokens N"
                    )
                record = cut_prompt(tokenizer, record, room, system, length)
                cut_lines.append(where.rpartition(":")[2])
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None
        fitted.append(record)
    if cut_lines:
        import logging

        logging.getLogger("persona_lens.prompts").warning(
            f"cut {len(cut_lines)} prompt(s) of {prompts.path} to {room} tokens "
            f"(--max-prompt-tokens): line(s) {', '.join(cut_lines[:20])}"
            + (" ..." if len(cut_lines) > 20 else "")
        )
    return fitted


def _token_count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def cut_prompt(
    tokenizer: Any,
    record: dict[str, Any],
    limit: int,
    system: str | None = None,
    length: int | None = None,
) -> dict[str, Any]:
    """The record with its prompt cut to at most ``limit`` tokens, chat template included.

    Policy: the *end of the last user message* is cut (its beginning is kept); the system
    prompt, earlier turns, the prefill and the template's own tokens are never cut, so if
    they alone pass ``limit`` it is an InputError. The copy carries ``prompt_tokens_cut``
    (tokens removed); the input record is not changed.
    """
    from persona_lens.core.generation import render_prompt

    if length is None:
        length = _token_count(tokenizer, render_prompt(tokenizer, record, system))
    key, message_index = _last_user_text(record)
    original = record["prompt"] if message_index is None else record[key][message_index]["content"]
    ids = tokenizer(original, add_special_tokens=False)["input_ids"]
    keep = len(ids) - (length - limit)
    while keep > 0:
        candidate = _with_text(record, key, message_index, tokenizer.decode(ids[:keep]))
        new_length = _token_count(tokenizer, render_prompt(tokenizer, candidate, system))
        if new_length <= limit:
            candidate["prompt_tokens_cut"] = length - new_length
            return candidate
        keep -= max(1, new_length - limit)
    raise InputError(
        f"cannot cut the prompt to {limit} tokens: without its last user message it is "
        "already too long"
    )


def _last_user_text(record: dict[str, Any]) -> tuple[str, int | None]:
    if "messages" not in record:
        return "prompt", None
    messages = record["messages"]
    index = max(i for i, m in enumerate(messages) if m.get("role") == "user")
    return "messages", index


def _with_text(record: dict[str, Any], key: str, index: int | None, text: str) -> dict[str, Any]:
    copy = dict(record)
    if index is None:
        copy[key] = text
    else:
        messages = [dict(m) for m in record[key]]
        messages[index]["content"] = text
        copy[key] = messages
    return copy


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
    """Write one JSON object a line, atomically (temp file in the same folder + rename), or
    into ``-``/a FIFO (see :mod:`persona_lens.core.files`)."""

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
    coefficient = parse_number(coef_text, f"{option} {text!r}: coefficient")
    return SteerArg(Path(path), coefficient, layers)


def parse_number(text: str, option: str) -> float:
    """A finite float from a command-line value; InputError naming ``option`` otherwise."""
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{option} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise InputError(f"{option} {text!r} is not a finite number")
    return value


def unique_names(names: Sequence[str], layers: Sequence[int]) -> list[str]:
    """Output keys for monitored traits: the trait name, ``trait@layer`` where names repeat."""
    keys = [
        n if names.count(n) == 1 else f"{n}@{layer}" for n, layer in zip(names, layers, strict=True)
    ]
    duplicates = {k for k in keys if keys.count(k) > 1}
    if duplicates:
        raise InputError(f"the same vector is monitored twice at one layer: {sorted(duplicates)}")
    return keys
