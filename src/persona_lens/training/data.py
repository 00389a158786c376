"""Training data: chat conversations read from disk, tokenised with the loss on assistant tokens.

Any dataset the screening readers take (JSONL in messages format, CSV or Parquet with
``messages`` or ``prompt``/``response`` columns, a folder saved with ``datasets``'
``save_to_disk``) is read whole and checked; a row that cannot be trained on (no assistant
turn, bad JSON, ...) refuses the whole dataset with the row numbers, so nothing is skipped
silently. A conversation is rendered with the model's chat template and every assistant turn's
tokens (its text and end-of-turn marker) carry the loss; all other tokens are masked with -100.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from persona_lens.core.errors import InputError
from persona_lens.core.generation import Message, render_chat
from persona_lens.screening.samples import SkippedRow, to_sample
from persona_lens.screening.sources import ShardReader, open_source, plan_shards

IGNORE = -100
_SHARD_ROWS = 4096
_LISTED = 8  # row numbers named in an error message


@dataclass(frozen=True)
class Conversation:
    """One training row: its 1-based row number and messages ending in an assistant turn."""

    row: int
    messages: tuple[Message, ...]


@dataclass(frozen=True)
class Dataset:
    """The conversations of a dataset file, in file order, and what identifies them."""

    path: Path
    format: str
    conversations: tuple[Conversation, ...]

    @property
    def data_hash(self) -> str:
        """sha256 of the conversations as trained on (independent of the file format)."""
        return conversations_hash(self.conversations)


@dataclass(frozen=True)
class Example:
    """A tokenised conversation: ``labels`` is ``input_ids`` outside assistant turns masked."""

    row: int
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)

    def features(self) -> dict[str, list[int]]:
        """What the collator takes."""
        return {"input_ids": list(self.input_ids), "labels": list(self.labels)}


def conversations_hash(conversations: Sequence[Conversation]) -> str:
    digest = hashlib.sha256()
    for conversation in conversations:
        line = json.dumps(list(conversation.messages), sort_keys=True, ensure_ascii=False)
        digest.update(line.encode("utf-8") + b"\n")
    return digest.hexdigest()


def read_dataset(path: str | Path) -> Dataset:
    """Every row of ``path`` as a conversation; InputError naming the rows that cannot be used
    (grouped by reason) or for an empty dataset."""
    source = open_source(path)
    shards = plan_shards(source, _SHARD_ROWS)  # refuses an empty dataset
    conversations: list[Conversation] = []
    problems: list[SkippedRow] = []
    with ShardReader(source) as reader:
        for shard in shards:
            for raw in reader.read(shard):
                if raw.skipped is not None or raw.record is None:
                    problems.append(raw.skipped or SkippedRow(raw.row, "unreadable row"))
                    continue
                sample = to_sample(raw.record, raw.row)
                if isinstance(sample, SkippedRow):
                    problems.append(sample)
                    continue
                messages = (*sample.prompt, {"role": "assistant", "content": sample.response})
                conversations.append(Conversation(raw.row, messages))
    if problems:
        raise InputError(f"{source.path}: {describe_problems(problems)}; fix or remove them")
    if not conversations:
        raise InputError(f"{source.path} holds no rows")
    return Dataset(source.path, source.format, tuple(conversations))


def describe_problems(problems: Sequence[SkippedRow]) -> str:
    """``no assistant turn in rows 2, 5, 9; invalid JSON in row 4``."""
    by_kind: dict[str, list[int]] = {}
    for problem in problems:
        by_kind.setdefault(problem.kind, []).append(problem.row)
    parts = []
    for kind, rows in by_kind.items():
        listed = ", ".join(str(r) for r in rows[:_LISTED])
        listed += ", ..." if len(rows) > _LISTED else ""
        parts.append(f"{kind} in row{'s' if len(rows) > 1 else ''} {listed}")
    return "; ".join(parts)


def render_conversation(tokenizer: Any, messages: Sequence[Message]) -> str:
    """A whole conversation as the model sees it (chat template, no generation prompt)."""
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(list(messages), tokenize=False))
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def tokenize(tokenizer: Any, conversation: Conversation, max_length: int) -> Example:
    """Token ids of the rendered conversation, the loss on every assistant turn.

    An assistant turn's tokens are found by rendering the conversation up to that turn with a
    generation prompt and with the turn itself; InputError if the chat template does not
    render conversations incrementally (the shorter rendering is no prefix of the longer).
    """
    messages = list(conversation.messages)

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    full = ids(render_conversation(tokenizer, messages))
    labels = [IGNORE] * len(full)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if not any(m["role"] not in ("system", "assistant") for m in messages[:index]):
            continue  # an assistant turn before any user turn: nothing prompted it
        before = ids(render_chat(tokenizer, messages[:index]))
        after = ids(render_conversation(tokenizer, messages[: index + 1]))
        if after[: len(before)] != before or full[: len(after)] != after:
            raise InputError(
                f"row {conversation.row}: the model's chat template does not render the "
                "conversation turn by turn, so its assistant tokens cannot be found"
            )
        labels[len(before) : len(after)] = full[len(before) : len(after)]
    return Example(conversation.row, tuple(full[:max_length]), tuple(labels[:max_length]))


def tokenize_all(tokenizer: Any, dataset: Dataset, max_length: int) -> list[Example]:
    """Every conversation tokenised; InputError for rows left without an assistant token."""
    examples = [tokenize(tokenizer, c, max_length) for c in dataset.conversations]
    empty = [SkippedRow(e.row, "no assistant token") for e in examples if e.trained_tokens == 0]
    if empty:
        raise InputError(
            f"{dataset.path}: {describe_problems(empty)} within --max-length {max_length}"
        )
    return examples


def split_holdout(
    examples: Sequence[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """A seeded shuffle of the rows, then (training rows, held-out rows); the training order is
    the order the trainer reads them in, every epoch and on every process."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = round(len(examples) * fraction) if fraction > 0 else 0
    if held and len(examples) - held < 1:
        raise InputError(f"--holdout {fraction} leaves no training rows of {len(examples)}")
    shuffled = [examples[i] for i in order]
    return shuffled[held:], shuffled[:held]


class ExampleSet(torch.utils.data.Dataset[dict[str, list[int]]]):
    """Examples as a map-style torch dataset of ``{"input_ids", "labels"}`` lists."""

    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index].features()


@dataclass(frozen=True)
class PadCollator:
    """Right-pads a batch: ``input_ids`` with ``pad_id``, ``labels`` with -100, and the mask."""

    pad_id: int

    def __call__(self, features: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[row, :n] = torch.tensor(feature["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.tensor(feature["labels"], dtype=torch.long)
            mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
