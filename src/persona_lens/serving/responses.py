"""OpenAI-shaped response bodies and stream chunks, with the ``persona`` extension.

A :class:`Reply` follows one request's events and renders them: the non-streaming body
(:meth:`Reply.body`) or one chunk per event (:meth:`Reply.chunk`). Every chunk of a stream
carries the same ``id`` and ``created``. The ``persona`` field holds, per chunk, the projections
of the chunk's token (``persona.tokens``) and the guards that fired on it; the first chunk
holds the prompt's projections (last prompt token, and one per assistant turn of a multi-turn
prompt); the last one the reply's response-average projections and every guard event.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from persona_lens.interop.prompts_io import json_safe
from persona_lens.serving.engine import Finished, Started, TokenOut
from persona_lens.serving.resolve import GenerationJob


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


class Reply:
    """One request's reply, built up from its engine events."""

    def __init__(self, job: GenerationJob, model: str, *, include_usage: bool = False) -> None:
        self.job = job
        self.include_usage = include_usage
        self.model = model
        self.chat = job.kind == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.started: Started | None = None
        self.tokens: list[TokenOut] = []
        self.finished: Finished | None = None
        self.content = ""

    # --- shared pieces --------------------------------------------------------------------
    def steering(self) -> dict[str, Any]:
        return {
            e.vector.name: {
                "coefficient": e.coefficient,
                "layers": "best" if e.layers is None else e.layers,
                "hash": e.vector.hash,
            }
            for e in self.job.steering
        }

    def usage(self) -> dict[str, int]:
        prompt = self.started.prompt_tokens if self.started else 0
        completion = len(self.tokens)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def _start_persona(self) -> dict[str, Any]:
        started = self.started
        return {
            "steer": self.steering(),
            "monitor": list(self.job.monitor_names),
            "guard": {
                g.vector.name: {"threshold": g.threshold, "coefficient": g.coefficient}
                for g in self.job.guards
            },
            "vectors": {v.name: v.hash for v in self.job.monitors}
            | {e.vector.name: e.vector.hash for e in self.job.steering},
            "prompt_projections": started.prompt_projections if started else {},
            "turns": started.turns if started else [],
        }

    def _end_persona(self) -> dict[str, Any]:
        finished = self.finished
        return {
            "projections": finished.projections if finished else {},
            "guard_events": finished.guard_events if finished else [],
        }

    @staticmethod
    def _token_persona(token: TokenOut) -> dict[str, Any]:
        return {
            "tokens": [
                {"index": token.index, "text": token.piece, "projections": token.projections}
            ],
            "guard_events": token.guard_events,
        }

    def _chat_logprobs(self, tokens: list[TokenOut]) -> dict[str, Any] | None:
        if not self.job.sampling.logprobs:
            return None
        return {
            "content": [
                {
                    "token": t.token_text,
                    "logprob": t.logprob,
                    "bytes": _bytes(t.token_text),
                    "top_logprobs": [
                        {"token": s, "logprob": lp, "bytes": _bytes(s)} for s, lp in t.top
                    ],
                }
                for t in tokens
            ],
            "refusal": None,
        }

    def _text_logprobs(self, tokens: list[TokenOut], offset: int) -> dict[str, Any] | None:
        if not self.job.sampling.logprobs:
            return None
        offsets, at = [], offset
        for t in tokens:
            offsets.append(at)
            at += len(t.piece)
        return {
            "tokens": [t.token_text for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [dict(t.top) for t in tokens]
            if self.job.sampling.top_logprobs
            else None,
            "text_offset": offsets,
        }

    # --- events ---------------------------------------------------------------------------
    def add(self, event: Started | TokenOut | Finished) -> None:
        if isinstance(event, Started):
            self.started = event
        elif isinstance(event, TokenOut):
            self.tokens.append(event)
            self.content += event.content
        else:
            self.finished = event
            self.content += event.content

    # --- bodies ---------------------------------------------------------------------------
    def body(self) -> dict[str, Any]:
        """The non-streaming response (call once the reply has finished)."""
        finished = self.finished
        reason = finished.reason if finished else None
        persona = {
            **self._start_persona(),
            **self._end_persona(),
            "token_projections": {
                name: [t.projections.get(name) for t in self.tokens]
                for name in self.job.monitor_names
            },
        }
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": self.content, "refusal": None},
                "logprobs": self._chat_logprobs(self.tokens),
                "finish_reason": reason,
            }
        else:
            choice = {
                "index": 0,
                "text": self.content,
                "logprobs": self._text_logprobs(self.tokens, 0),
                "finish_reason": reason,
            }
        return json_safe(
            {
                "id": self.id,
                "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [choice],
                "usage": self.usage(),
                "persona": persona,
            }
        )

    def _chunk(
        self, choice: dict[str, Any] | None, persona: dict[str, Any] | None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [] if choice is None else [choice],
        }
        if self.include_usage:
            body["usage"] = None
        if persona is not None:
            body["persona"] = persona
        return body

    def chunk(self, event: Started | TokenOut | Finished) -> dict[str, Any]:
        """The stream chunk for ``event`` (after :meth:`add`)."""
        if isinstance(event, Started):
            choice = self._choice({"role": "assistant", "content": ""}, "", None, None)
            return json_safe(self._chunk(choice, self._start_persona()))
        if isinstance(event, TokenOut):
            offset = len(self.content) - len(event.content)
            logprobs = (
                self._chat_logprobs([event]) if self.chat else self._text_logprobs([event], offset)
            )
            choice = self._choice({"content": event.content}, event.content, logprobs, None)
            return json_safe(self._chunk(choice, self._token_persona(event)))
        delta = {"content": event.content} if event.content else {}
        choice = self._choice(delta, event.content, None, event.reason)
        return json_safe(self._chunk(choice, self._end_persona()))

    def _choice(
        self, delta: dict[str, Any], text: str, logprobs: dict[str, Any] | None, reason: str | None
    ) -> dict[str, Any]:
        if self.chat:
            return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason}

    def usage_chunk(self) -> dict[str, Any]:
        body = self._chunk(None, None)
        body["usage"] = self.usage()
        return body
