"""A tiny OpenAI/Anthropic-compatible HTTP server on 127.0.0.1 for tests (never a real host).

``FakeLLMServer(handler)`` runs a threaded ``http.server`` on a free loopback port; ``handler``
gets ``(path, body_dict, headers)`` and returns ``(status, payload_dict)``. Every request is
recorded in ``.requests``.
"""

from __future__ import annotations

import json
import math
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Handler = Callable[[str, dict[str, Any], dict[str, str]], tuple[int, dict[str, Any]]]


class FakeLLMServer:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[tuple[str, dict[str, Any], dict[str, str]]] = []
        self._lock = threading.Lock()
        outer = self

        class _Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else {}
                headers = {k.lower(): v for k, v in self.headers.items()}
                with outer._lock:
                    outer.requests.append((self.path, body, headers))
                status, payload = outer.handler(self.path, body, headers)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(data)

            do_POST = _answer
            do_GET = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeLLMServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def free_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def chat_completion(text: str, top: list[tuple[str, float]] | None = None) -> dict[str, Any]:
    """An OpenAI chat-completion payload; ``top`` is (token, probability) pairs."""
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "finish_reason": "length",
    }
    if top is not None:
        choice["logprobs"] = {
            "content": [
                {
                    "token": top[0][0] if top else text,
                    "logprob": math.log(top[0][1]) if top else 0.0,
                    "top_logprobs": [{"token": t, "logprob": math.log(p)} for t, p in top],
                }
            ]
        }
    return {"id": "fake", "object": "chat.completion", "choices": [choice]}


def anthropic_message(text: str) -> dict[str, Any]:
    return {"id": "fake", "type": "message", "content": [{"type": "text", "text": text}]}
