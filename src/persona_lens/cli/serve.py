"""``persona serve``: the OpenAI-compatible server with per-request steering and a web page."""

from __future__ import annotations

import importlib.util
import signal
import socket
from pathlib import Path
from typing import Annotated

import typer

from persona_lens.cli.app import ModelOption, app, console
from persona_lens.core.errors import InputError

DEFAULT_VECTORS = Path("vectors")


@app.command()
def serve(
    model: ModelOption = "embedded",
    vectors: Annotated[
        Path | None,
        typer.Option(
            help="Folder whose *.safetensors vectors requests may use (default: vectors/, "
            "where `persona extract` writes; without it the server runs without steering).",
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="PERSONA_LENS_API_KEY",
            help="Require 'Authorization: Bearer KEY' on /v1 (401 without it).",
        ),
    ] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Requests decoded together.")] = 16,
    max_tokens: Annotated[
        int, typer.Option(min=1, help="Largest max_tokens a request may ask.")
    ] = 512,
    default_max_tokens: Annotated[
        int, typer.Option(min=1, help="A chat reply's length when the request gives none.")
    ] = 128,
    max_prompt_tokens: Annotated[
        int, typer.Option(min=1, help="Longest prompt, in tokens.")
    ] = 2048,
    max_coefficient: Annotated[
        float, typer.Option(min=0.0, help="Largest |coefficient| for steering and guards.")
    ] = 10.0,
    max_body_bytes: Annotated[int, typer.Option(min=1, help="Largest request body.")] = 1 << 20,
    request_timeout: Annotated[
        float, typer.Option(min=0.001, help="Seconds a request may take, queueing included.")
    ] = 120.0,
    max_queue: Annotated[int, typer.Option(min=1, help="Waiting requests before a 429.")] = 256,
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:1, mps (default: best).")
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="fp32, bf16 or fp16 (default: by device).")
    ] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="torch threads on a CPU.")] = None,
) -> None:
    """Serve a model over an OpenAI-compatible API, with per-request steering, per-token trait
    projections in every stream chunk, guards, and a web page at /.

    Requests choose their own steering in an extra 'persona' field, e.g.
    {"steer": {"humorous": 1.5}, "monitor": ["evil"], "guard": {"evil": {"threshold": 8}}};
    names are the vectors in --vectors. GET /v1/persona/vectors lists them.

    Examples:\n
      persona serve\n
      persona serve --vectors vectors --port 8080 --api-key secret\n
      curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json'
      -d '{"model": "embedded", "messages": [{"role": "user", "content": "Hi"}],
      "persona": {"steer": {"humorous": 2}}}'
    """
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(
            f"persona serve needs {' and '.join(missing)}: pip install 'persona-lens[serve]'"
        )
    from persona_lens.serving.settings import ServerSettings  # light: checks come first

    settings = ServerSettings(
        api_key=api_key,
        max_tokens=max_tokens,
        default_max_tokens=min(default_max_tokens, max_tokens),
        max_prompt_tokens=max_prompt_tokens,
        max_coefficient=max_coefficient,
        max_body_bytes=max_body_bytes,
        request_timeout=request_timeout,
        max_batch=max_batch,
        max_queue=max_queue,
    )
    folder = vectors if vectors is not None else DEFAULT_VECTORS
    if vectors is not None and not folder.is_dir():
        raise InputError(f"--vectors {folder}: no such folder")
    sock = listening_socket(host, port)  # before the model loads: a busy port fails at once
    try:
        import torch
        import uvicorn
        from transformers.utils import logging as transformers_logging

        from persona_lens.core.models import load_model
        from persona_lens.serving.server import build_app
        from persona_lens.serving.vectors import VectorLibrary

        if threads is not None:
            torch.set_num_threads(threads)
        transformers_logging.disable_progress_bar()  # the status line says what happens
        with console.status(f"loading {model} ..."):
            loaded = load_model(model, device=device, dtype=dtype)
            library = (
                VectorLibrary.load(folder, loaded.layout, loaded.fingerprint)
                if folder.is_dir()
                else VectorLibrary([], None)
            )
            server_app, engine = build_app(loaded, library, settings)
    except BaseException:
        sock.close()
        raise
    if not folder.is_dir():
        console.print(
            f"no vector folder {folder}/ (persona extract TRAIT writes vectors/TRAIT.safetensors):"
            " serving without steering or monitoring",
            markup=False,
            soft_wrap=True,
        )
    elif not len(library):
        console.print(f"no *.safetensors in {folder}/: serving without steering", markup=False)
    else:
        names = ", ".join(library.names)
        console.print(f"vectors from {folder}/: {names}", markup=False, soft_wrap=True)
    bound = sock.getsockname()[1]
    shown = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::") else host
    console.print(
        f"serving {loaded.name} on http://{shown}:{bound} "
        "(web page /, API /v1, schema /openapi.json)" + ("; API key required" if api_key else ""),
        markup=False,
        soft_wrap=True,
    )
    server = uvicorn.Server(uvicorn.Config(server_app, log_level="warning", lifespan="off"))
    # uvicorn finishes open requests on Ctrl-C / SIGTERM, then raises the signal again: both end
    # the command quietly with exit code 0
    previous = signal.signal(signal.SIGTERM, _exit_quietly)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        engine.stop()
        sock.close()
        signal.signal(signal.SIGTERM, previous)
    console.print("stopped", markup=False)


def _exit_quietly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (port 0: a free one); InputError if it cannot be."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    return sock
