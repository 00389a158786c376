"""From one dataset record to the sample that is screened: a prompt and a response.

A record is either in messages format (``{"messages": [{"role", "content"}, ...]}``, as in
DESIGN.md) or has ``prompt`` and ``response`` strings (CSV columns, flat tables). A multi-turn
conversation is screened on its last assistant turn, with every message before it as the
prompt. A record that cannot be screened becomes a :class:`SkippedRow` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from persona_lens.core.generation import Message


@dataclass(frozen=True)
class Sample:
    """A screenable row: the prompt messages and the response (the last assistant turn)."""

    row: int  # 1-based row number in the input (the line number for JSONL)
    prompt: tuple[Message, ...]
    response: str
    multi_turn: bool  # the prompt holds an earlier assistant turn


@dataclass(frozen=True)
class SkippedRow:
    """A row that is not screened, and why (``kind`` groups the counts in the report)."""

    row: int
    kind: str
    detail: str = ""

    def describe(self) -> str:
        return f"row {self.row}: {self.kind}" + (f" ({self.detail})" if self.detail else "")


def to_sample(record: Any, row: int) -> Sample | SkippedRow:
    """The sample in ``record``, or why there is none."""
    if not isinstance(record, dict):
        return SkippedRow(row, "not an object", type(record).__name__)
    messages = record.get("messages")
    if messages is not None:
        return _from_messages(messages, row)
    prompt, response = record.get("prompt"), record.get("response")
    if isinstance(prompt, str) and isinstance(response, str):
        if not response.strip():
            return SkippedRow(row, "empty assistant turn")
        if not prompt.strip():
            return SkippedRow(row, "no prompt before the assistant turn")
        return Sample(row, ({"role": "user", "content": prompt},), response, False)
    return SkippedRow(row, "no messages", "needs 'messages' or 'prompt' and 'response' strings")


def _from_messages(messages: Any, row: int) -> Sample | SkippedRow:
    if not isinstance(messages, list | tuple) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ):
        return SkippedRow(row, "bad messages", "a list of {'role', 'content'} strings")
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]
    last = max((i for i, m in enumerate(turns) if m["role"] == "assistant"), default=None)
    if last is None:
        return SkippedRow(row, "no assistant turn")
    if not turns[last]["content"].strip():
        return SkippedRow(row, "empty assistant turn")
    prompt = tuple(turns[:last])
    if not any(m["role"] != "system" for m in prompt):
        return SkippedRow(row, "no prompt before the assistant turn")
    multi_turn = any(m["role"] == "assistant" for m in prompt)
    return Sample(row, prompt, turns[last]["content"], multi_turn)
