"""Putting a server together: engine + resolver + app, and uvicorn on a thread or in front.

:func:`build_app` starts the engine (the model's owner) and returns the application;
:class:`LiveServer` runs it with uvicorn on a background thread (tests, benchmarks, notebooks),
binding a free port when asked for port 0.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from persona_lens.core.errors import InputError
from persona_lens.core.models import LoadedModel
from persona_lens.serving.app import create_app
from persona_lens.serving.engine import Engine
from persona_lens.serving.resolve import Resolver
from persona_lens.serving.settings import ServerSettings
from persona_lens.serving.vectors import VectorLibrary


def model_ids(loaded: LoadedModel) -> list[str]:
    """The names a request may give as ``model``: the display name first, then the spec."""
    return list(dict.fromkeys([loaded.name, loaded.spec]))


def build_app(
    loaded: LoadedModel, library: VectorLibrary, settings: ServerSettings | None = None
) -> tuple[Any, Engine]:
    """Start an engine on ``loaded`` and return (the FastAPI app, the engine)."""
    settings = settings or ServerSettings()
    engine = Engine(loaded, library, settings)
    engine.start()
    ids = model_ids(loaded)
    resolver = Resolver(library, settings, loaded.layout, ids)
    return create_app(engine, resolver, ids[0]), engine


class LiveServer:
    """uvicorn serving ``app`` on a daemon thread; a context manager that always stops it."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.host = host
        self.port = port
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> LiveServer:
        self._thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self._thread.start()
        limit = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > limit:
                raise InputError(f"the server did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        sockets = [s for server in self.server.servers for s in server.sockets]
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
