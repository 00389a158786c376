"""Trait definitions: contrastive system prompts, questions and a judge rubric.

A definition is a JSON file validated against ``traits/library/schema.json``. The built-in library
(``traits/library/<name>.json``) holds the paper's seven traits in our own words; users pass a file
path, or a directory through ``PERSONA_LENS_TRAITS`` / ``search_dirs``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from persona_lens.core.errors import InputError

_BUILTIN = resources.files("persona_lens.traits") / "library"


@dataclass(frozen=True)
class InstructionPair:
    """A trait-eliciting (``pos``) and a trait-suppressing (``neg``) system prompt."""

    pos: str
    neg: str


@dataclass(frozen=True)
class TraitDefinition:
    """A trait: contrastive system-prompt pairs, extraction and evaluation questions, and the
    judge rubric that scores an answer for it (0-100)."""

    name: str
    description: str
    instructions: tuple[InstructionPair, ...]
    extraction_questions: tuple[str, ...]
    evaluation_questions: tuple[str, ...]
    judge_prompt: str
    coherence_prompt: str | None = None
    version: int = 1
    source: str = "builtin"

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "instructions": [{"pos": p.pos, "neg": p.neg} for p in self.instructions],
            "extraction_questions": list(self.extraction_questions),
            "evaluation_questions": list(self.evaluation_questions),
            "judge_prompt": self.judge_prompt,
            "version": self.version,
        }
        if self.coherence_prompt:
            data["coherence_prompt"] = self.coherence_prompt
        return data

    def content_hash(self) -> str:
        """Short hash of the definition's content (cache keys, metadata)."""
        blob = json.dumps(self.to_json(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def schema() -> dict[str, Any]:
    return dict(json.loads((_BUILTIN / "schema.json").read_text(encoding="utf-8")))


def parse_trait(data: Any, source: str = "<data>") -> TraitDefinition:
    """Validate JSON data; InputError naming the offending field otherwise."""
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "(top level)"
        raise InputError(f"trait {source}: field {where}: {first.message}")
    questions = set(data["extraction_questions"]) & set(data["evaluation_questions"])
    if questions:
        raise InputError(
            f"trait {source}: extraction and evaluation questions overlap: {sorted(questions)[0]!r}"
        )
    return TraitDefinition(
        name=data["name"],
        description=data["description"],
        instructions=tuple(InstructionPair(p["pos"], p["neg"]) for p in data["instructions"]),
        extraction_questions=tuple(data["extraction_questions"]),
        evaluation_questions=tuple(data["evaluation_questions"]),
        judge_prompt=data["judge_prompt"],
        coherence_prompt=data.get("coherence_prompt"),
        version=int(data.get("version", 1)),
        source=source,
    )


def builtin_trait_names() -> list[str]:
    return sorted(
        p.name.removesuffix(".json")
        for p in _BUILTIN.iterdir()
        if p.name.endswith(".json") and p.name != "schema.json"
    )


def _search_dirs() -> list[Path]:
    extra = os.environ.get("PERSONA_LENS_TRAITS", "")
    return [Path(p) for p in extra.split(os.pathsep) if p]


def load_trait(name_or_path: str) -> TraitDefinition:
    """A trait by file path, by name in PERSONA_LENS_TRAITS dirs, or from the built-in library."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise InputError(f"no trait file at {path}")
        return _read(path)
    for directory in _search_dirs():
        candidate = directory / f"{name_or_path}.json"
        if candidate.is_file():
            return _read(candidate)
    builtin = _BUILTIN / f"{name_or_path}.json"
    if builtin.is_file():
        data = json.loads(builtin.read_text(encoding="utf-8"))
        return parse_trait(data, f"builtin:{name_or_path}")
    known = ", ".join(builtin_trait_names())
    raise InputError(f"unknown trait {name_or_path!r}; built-in traits: {known}")


def _read(path: Path) -> TraitDefinition:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"trait file {path} is not valid JSON (line {exc.lineno})") from exc
    return parse_trait(data, str(path))
