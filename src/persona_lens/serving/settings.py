"""The server's settings and limits (``persona serve`` options), in one frozen record."""

from __future__ import annotations

from dataclasses import dataclass, fields

from persona_lens.core.errors import InputError


@dataclass(frozen=True)
class ServerSettings:
    """Limits every request is checked against, and how the worker batches.

    ``max_tokens``: the most tokens a reply may ask for; ``default_max_tokens``: a chat reply's
    length when the request gives none (completions default to 16, as OpenAI's do);
    ``max_prompt_tokens``: the longest rendered prompt; ``max_coefficient``: the largest
    absolute steering or guard coefficient; ``max_body_bytes``: the largest request body;
    ``request_timeout``: seconds from arrival to the last token; ``max_batch``: rows decoded
    together; ``max_queue``: requests waiting for a row before new ones get a 429.
    """

    api_key: str | None = None
    max_tokens: int = 512
    default_max_tokens: int = 128
    max_prompt_tokens: int = 2048
    max_coefficient: float = 10.0
    max_body_bytes: int = 1 << 20
    request_timeout: float = 120.0
    max_batch: int = 16
    max_queue: int = 256

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name != "api_key" and not value > 0:
                raise InputError(f"--{item.name.replace('_', '-')} must be positive, got {value}")
        if self.default_max_tokens > self.max_tokens:
            raise InputError("the default max tokens exceeds --max-tokens")
        if self.api_key is not None and not self.api_key.strip():
            raise InputError("--api-key must not be empty")
