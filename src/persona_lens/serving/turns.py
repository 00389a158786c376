"""Where each assistant turn of a multi-turn prompt lies among the prompt's tokens.

The chat template writes every message's content into the prompt text; each content is found in
order (so an assistant reply that repeats a user's words is not confused with them) and mapped to
the tokens whose characters overlap it. A template that rewrites content beyond trimming
whitespace leaves that turn unmatched: it gets no projection rather than a wrong one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from persona_lens.core.generation import Message


@dataclass(frozen=True)
class TurnSpan:
    """Message ``message`` (an assistant turn) covers prompt tokens ``start:end``."""

    message: int
    start: int
    end: int


def assistant_spans(
    text: str, offsets: Sequence[tuple[int, int]], messages: Sequence[Message]
) -> list[TurnSpan]:
    """Token spans of the assistant messages in ``text`` (``offsets``: each token's characters)."""
    spans = []
    cursor = 0
    for index, message in enumerate(messages):
        content = message["content"]
        found = -1
        for candidate in (content, content.strip()):
            if candidate:
                found = text.find(candidate, cursor)
                if found >= 0:
                    content = candidate
                    break
        if found < 0:
            continue
        end = found + len(content)
        cursor = end
        if message["role"] != "assistant":
            continue
        tokens = [k for k, (a, b) in enumerate(offsets) if a < end and b > found]
        if tokens:
            spans.append(TurnSpan(index, tokens[0], tokens[-1] + 1))
    return spans
