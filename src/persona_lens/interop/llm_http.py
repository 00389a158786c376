"""Minimal HTTP clients for chat LLM APIs (judges and trait generators), standard library only.

``OpenAIClient`` talks to any OpenAI-compatible ``/chat/completions`` endpoint (OpenAI, vLLM,
llama.cpp, ollama, ...) at ``OPENAI_BASE_URL`` with ``OPENAI_API_KEY``; ``AnthropicClient`` to
the Messages API at ``ANTHROPIC_BASE_URL`` (default api.anthropic.com) with
``ANTHROPIC_API_KEY``. Both retry with exponential backoff on 408/409/429/5xx and connection
errors (honouring ``Retry-After``), time out, and raise the caller's error class with a message
that names the backend and the environment variables that configure it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from persona_lens.core.errors import PersonaLensError

OPENAI_DEFAULT_URL = "https://api.openai.com/v1"
ANTHROPIC_DEFAULT_URL = "https://api.anthropic.com"
ANTHROPIC_VERSION = "2023-06-01"
RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
TIMEOUT_ENV = "PERSONA_LENS_HTTP_TIMEOUT"


class BackendUnavailableError(PersonaLensError):
    """An LLM backend that cannot be reached, refuses the key, or answers unusably."""


@dataclass(frozen=True)
class Completion:
    """A completion's text and, where the backend gives them, the first token's top
    alternatives as ``(token, logprob)`` pairs."""

    text: str
    top_logprobs: tuple[tuple[str, float], ...] | None = None


def _timeout_default() -> float:
    try:
        return float(os.environ.get(TIMEOUT_ENV, "60"))
    except ValueError:
        return 60.0


class _HTTPClient:
    backend = "http"
    fix = ""

    def __init__(
        self,
        model: str,
        base_url: str,
        *,
        timeout: float | None = None,
        max_retries: int = 4,
        backoff: float = 1.0,
        error: type[PersonaLensError] = BackendUnavailableError,
    ) -> None:
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.timeout = _timeout_default() if timeout is None else timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.error = error

    def _headers(self) -> dict[str, str]:
        return {"Content-Type": "application/json"}

    def _fail(self, what: str) -> PersonaLensError:
        return self.error(
            f"{self.backend} backend ({self.model} at {self.base_url}): {what}; {self.fix}"
        )

    def _sleep(self, attempt: int, retry_after: str | None) -> None:
        delay = self.backoff * (2**attempt) * (0.5 + random.random() / 2)
        if retry_after:
            with contextlib.suppress(ValueError):
                delay = max(delay, min(float(retry_after), 30.0))
        time.sleep(min(delay, 30.0))

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """JSON request with retries; the decoded JSON answer."""
        url = f"{self.base_url}{path}"
        data = json.dumps(body).encode() if body is not None else None
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            req = urllib.request.Request(url, data=data, headers=self._headers(), method=method)
            retry_after = None
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    payload = resp.read()
                try:
                    return json.loads(payload)
                except json.JSONDecodeError as exc:
                    raise self._fail(f"the answer is not JSON ({exc})") from None
            except urllib.error.HTTPError as exc:
                detail = _error_detail(exc)
                if exc.code not in RETRY_STATUS:
                    hint = {401: "the key was refused", 403: "the key was refused"}
                    what = hint.get(exc.code, f"HTTP {exc.code}")
                    raise self._fail(f"{what}: {detail}") from None
                last = f"HTTP {exc.code}: {detail}"
                retry_after = exc.headers.get("Retry-After") if exc.headers else None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                reason = getattr(exc, "reason", exc)
                last = f"cannot connect ({reason})"
            if attempt < self.max_retries:
                self._sleep(attempt, retry_after)
        raise self._fail(f"{last} (after {self.max_retries + 1} attempts)")


def _error_detail(exc: urllib.error.HTTPError) -> str:
    try:
        raw = exc.read().decode("utf-8", "replace")
    except Exception:
        return exc.reason if isinstance(exc.reason, str) else "no detail"
    try:
        data = json.loads(raw)
        err = data.get("error", data) if isinstance(data, dict) else data
        msg = err.get("message", raw) if isinstance(err, dict) else str(err)
    except (json.JSONDecodeError, AttributeError):
        msg = raw
    return " ".join(str(msg).split())[:300] or "no detail"


class OpenAIClient(_HTTPClient):
    """Chat completions on an OpenAI-compatible server."""

    backend = "openai"
    fix = (
        "set OPENAI_BASE_URL to the server's /v1 URL (vLLM, llama.cpp, ollama, OpenAI) "
        "and OPENAI_API_KEY where the server needs a key"
    )

    def __init__(self, model: str, **kwargs: Any) -> None:
        base = os.environ.get("OPENAI_BASE_URL") or OPENAI_DEFAULT_URL
        super().__init__(model, base, **kwargs)
        self.api_key = os.environ.get("OPENAI_API_KEY", "")
        if not self.api_key and self.base_url == OPENAI_DEFAULT_URL:
            raise self._fail("OPENAI_API_KEY is not set")

    def _headers(self) -> dict[str, str]:
        headers = super()._headers()
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def complete(
        self,
        prompt: str,
        *,
        max_tokens: int,
        temperature: float = 0.0,
        logprobs: bool = False,
        system: str | None = None,
    ) -> Completion:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        if logprobs:
            body.update(logprobs=True, top_logprobs=20)
        data = self.request("POST", "/chat/completions", body)
        try:
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise self._fail("the answer has no choices[0].message") from None
        return Completion(str(text), _openai_top_logprobs(choice) if logprobs else None)

    def check(self) -> None:
        """Raise the client's error unless the server answers ``GET /models``."""
        self.request("GET", "/models")


def _openai_top_logprobs(choice: dict[str, Any]) -> tuple[tuple[str, float], ...] | None:
    try:
        first = choice["logprobs"]["content"][0]
        return tuple((str(t["token"]), float(t["logprob"])) for t in first["top_logprobs"])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


class AnthropicClient(_HTTPClient):
    """The Anthropic Messages API (no log-probabilities)."""

    backend = "anthropic"
    fix = "set ANTHROPIC_API_KEY (and ANTHROPIC_BASE_URL for a proxy)"

    def __init__(self, model: str, **kwargs: Any) -> None:
        base = os.environ.get("ANTHROPIC_BASE_URL") or ANTHROPIC_DEFAULT_URL
        super().__init__(model, base, **kwargs)
        self.api_key = os.environ.get("ANTHROPIC_API_KEY", "")
        if not self.api_key:
            raise self._fail("ANTHROPIC_API_KEY is not set")

    def _headers(self) -> dict[str, str]:
        headers = super()._headers()
        headers.update({"x-api-key": self.api_key, "anthropic-version": ANTHROPIC_VERSION})
        return headers

    def complete(
        self,
        prompt: str,
        *,
        max_tokens: int,
        temperature: float = 0.0,
        logprobs: bool = False,
        system: str | None = None,
    ) -> Completion:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "messages": [{"role": "user", "content": prompt}],
        }
        if system:
            body["system"] = system
        data = self.request("POST", "/v1/messages", body)
        try:
            text = "".join(b.get("text", "") for b in data["content"] if b.get("type") == "text")
        except (KeyError, TypeError, AttributeError):
            raise self._fail("the answer has no content blocks") from None
        return Completion(text)

    def check(self) -> None:
        """Raise the client's error unless the API answers ``GET /v1/models``."""
        self.request("GET", "/v1/models")


ChatClient = OpenAIClient | AnthropicClient
