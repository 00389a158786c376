"""Typed request models of the OpenAI-compatible API, with the ``persona`` extension.

Validation lives here and in :mod:`persona_lens.serving.resolve` (which checks names and limits
against the loaded vectors and the server's settings), nowhere else. Every model forbids unknown
keys: a misspelt ``persona.stere`` is a 400, not steering that silently did nothing. OpenAI
parameters this server does not implement are declared, so that setting one is a 400 that says
so instead of being dropped. Types are strict (``"1"`` is not a number, ``1.5`` not a count).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
LayerChoice = (
    Literal["all", "best"] | Annotated[int, Field(ge=0)] | list[Annotated[int, Field(ge=0)]]
)
"""Where a trait steers: ``"best"`` (its vector's best layer, the default), ``"all"`` (the
layer-incremental vectors at every block, as in the paper's appendix), one layer or a list."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class GuardOptions(_Strict):
    """Above ``threshold`` (the projection of a reply token at the vector's best layer), steer
    the rest of the reply with ``coefficient`` (negative: away from the trait)."""

    threshold: FiniteFloat
    coefficient: FiniteFloat = -2.0


class PersonaOptions(_Strict):
    """The ``persona`` request field: steering, monitoring and guards for this request only.

    Names are the vectors the server loaded (``GET /v1/persona/vectors``). ``monitor`` omitted
    monitors every loaded vector; ``[]`` monitors none. Guarded traits are monitored too.
    """

    steer: dict[str, FiniteFloat] = Field(default_factory=dict)
    layers: dict[str, LayerChoice] = Field(default_factory=dict)
    monitor: list[str] | None = None
    guard: dict[str, GuardOptions] = Field(default_factory=dict)


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    """One chat message. Fields an OpenAI client echoes back in an assistant message are
    accepted when empty; tool calls and audio are not supported."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None
    refusal: str | None = None
    annotations: list[Any] | None = None
    tool_calls: list[Any] | None = None
    function_call: Any | None = None
    audio: Any | None = None

    @field_validator("tool_calls", "function_call", "audio")
    @classmethod
    def _not_supported(cls, value: Any) -> Any:
        if value:
            raise _unsupported()
        return value

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


_UNSUPPORTED_COMMON = ("logit_bias",)
_UNSUPPORTED_CHAT = (
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "modalities",
    "audio",
    "prediction",
    "reasoning_effort",
    "web_search_options",
)


def _unsupported(what: str = "not supported by this server") -> PydanticCustomError:
    return PydanticCustomError("unsupported", what)


class GenerationRequest(_Strict):
    """Parameters shared by chat and text completions. ``min_tokens`` (as in vLLM) keeps the
    reply from ending before that many tokens (end-of-sequence is masked until then)."""

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = None
    presence_penalty: FiniteFloat | None = None
    frequency_penalty: FiniteFloat | None = None
    user: str | None = None
    logit_bias: dict[str, Any] | None = None
    min_tokens: Annotated[int, Field(ge=0)] | None = None
    persona: PersonaOptions | None = None

    @field_validator(*_UNSUPPORTED_COMMON)
    @classmethod
    def _reject_common(cls, value: Any) -> Any:
        if value is not None:
            raise _unsupported()
        return value

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise _unsupported("only n=1 is supported by this server")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        if value:
            raise _unsupported("only 0 is supported by this server")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        values = [value] if isinstance(value, str) else value or []
        if any(not s for s in values):
            raise PydanticCustomError("empty_stop", "stop strings must not be empty")
        return value

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(GenerationRequest):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    tools: list[Any] | None = None
    tool_choice: Any | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any | None = None
    modalities: list[Any] | None = None
    audio: Any | None = None
    prediction: Any | None = None
    reasoning_effort: str | None = None
    web_search_options: Any | None = None

    @field_validator(*_UNSUPPORTED_CHAT)
    @classmethod
    def _reject_chat(cls, value: Any) -> Any:
        if value is not None:
            raise _unsupported()
        return value

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value != {"type": "text"}:
            raise _unsupported("only {'type': 'text'} is supported by this server")
        return value


class CompletionRequest(GenerationRequest):
    """``POST /v1/completions`` (a raw text prompt, no chat template)."""

    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("echo", "suffix")
    @classmethod
    def _reject_completion(cls, value: Any) -> Any:
        if value:
            raise _unsupported()
        return value

    @field_validator("best_of")
    @classmethod
    def _one_candidate(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise _unsupported("only best_of=1 is supported by this server")
        return value

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]
