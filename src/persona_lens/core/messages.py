"""Chat messages a model can answer: the roles a prompt may use and the shape it must have.

Pure checks (no model, no torch), so prompt files are validated before any model loads:

- every role is one of :data:`ROLES`: system, user, assistant, tool (``tool`` only where the
  model's chat template handles tool results: :func:`template_supports_tools`);
- a system message comes first, if at all;
- there is a user message, and the conversation ends with the user's turn (or a tool result):
  generation writes the assistant's next reply;
- no user message and not the final message is blank.

To make the model continue a reply you started (an assistant *prefill*), put the start in
the record's ``"prefill"`` field, never as a final assistant message:
``{"messages": [{"role": "user", "content": "Tell a joke."}], "prefill": "Why did"}``. The
response is what the model writes after the prefill.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from persona_lens.core.errors import InputError

ROLES = ("system", "user", "assistant", "tool")
"""The chat roles of the OpenAI chat format (``tool`` needs a template with tool support)."""


def check_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    """Raise InputError (no location; callers add it) unless the model can answer these."""
    if not messages:
        raise InputError("a prompt with no messages")
    for number, message in enumerate(messages, start=1):
        role = message.get("role")
        if role not in ROLES:
            raise InputError(f"message {number} has role {role!r}; use one of {', '.join(ROLES)}")
        if role == "system" and number > 1:
            raise InputError(f"message {number} is a system message; it may only come first")
        if role == "user" and not str(message.get("content", "")).strip():
            raise InputError(f"message {number} (user) is empty")
    roles = [m["role"] for m in messages]
    if "user" not in roles:
        raise InputError("the conversation has no user message")
    last = roles[-1]
    if last == "assistant":
        raise InputError(
            "the conversation ends with an assistant message, so there is nothing to answer; "
            'end with a user message, or put the start of the reply in "prefill"'
        )
    if not str(messages[-1].get("content", "")).strip():
        raise InputError(f"the final message ({last}) is empty")


def check_prefill(prefill: Any) -> str | None:
    """The record's ``prefill`` (None when absent); InputError unless it is non-empty text."""
    if prefill is None:
        return None
    if not isinstance(prefill, str) or not prefill.strip():
        raise InputError("'prefill' must be non-empty text: the start of the reply")
    return prefill


def template_supports_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders ``tool`` messages (it names the role)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, Mapping):
        template = " ".join(str(t) for t in template.values())
    return isinstance(template, str) and "tool" in template


def check_tool_support(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> None:
    """InputError if a ``tool`` message is sent to a model whose template cannot show it."""
    for number, message in enumerate(messages, start=1):
        if message.get("role") == "tool" and not template_supports_tools(tokenizer):
            raise InputError(
                f"message {number} has role 'tool', but this model's chat template does "
                "not support tool messages"
            )
