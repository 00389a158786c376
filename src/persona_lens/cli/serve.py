"""``persona serve``: the OpenAI-compatible server with per-request steering and a web page."""

from __future__ import annotations

import importlib.util
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
    import torch
    import uvicorn

    from persona_lens.core.models import load_model
    from persona_lens.serving.server import build_app
    from persona_lens.serving.settings import ServerSettings
    from persona_lens.serving.vectors import VectorLibrary

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
    if threads is not None:
        torch.set_num_threads(threads)
    folder = vectors if vectors is not None else DEFAULT_VECTORS
    if vectors is not None and not folder.is_dir():
        raise InputError(f"--vectors {folder}: no such folder")
    with console.status(f"loading {model} ..."):
        loaded = load_model(model, device=device, dtype=dtype)
        if folder.is_dir():
            library = VectorLibrary.load(folder, loaded.layout, loaded.fingerprint)
        else:
            library = VectorLibrary([], None)
        server_app, engine = build_app(loaded, library, settings)
    if not folder.is_dir():
        console.print(
            f"no vector folder {folder}/ (persona extract TRAIT writes vectors/TRAIT.safetensors):"
            " serving without steering or monitoring",
            markup=False,
        )
    elif not len(library):
        console.print(f"no *.safetensors in {folder}/: serving without steering", markup=False)
    else:
        names = ", ".join(library.names)
        console.print(f"vectors from {folder}/: {names}", markup=False)
    shown = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::") else host
    console.print(
        f"serving {loaded.name} on http://{shown}:{port} (web page /, API /v1, docs /docs)"
        + ("; API key required" if api_key else ""),
        markup=False,
    )
    try:
        uvicorn.run(server_app, host=host, port=port, log_level="warning")
    finally:
        engine.stop()
