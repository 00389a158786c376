"""``persona view``: an offline HTML page of per-token projections."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from persona_lens.cli.app import app
from persona_lens.core.errors import InputError


@app.command()
def view(
    generations: Annotated[
        Path, typer.Argument(help="JSONL from `persona generate --token-projections`.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="HTML page to write.")],
    title: Annotated[str, typer.Option(help="Page title.")] = "persona-lens token view",
) -> None:
    """Colour every generated token by its projection onto each monitored trait (blue:
    negative, red: positive; one scale per trait), with a trait selector and hover values.
    The page is self-contained: it loads nothing and works offline.

    Examples:\n
      persona generate -p prompts.jsonl --monitor evil.safetensors --token-projections
      -o gen.jsonl\n
      persona view gen.jsonl --out tokens.html
    """
    from persona_lens.monitoring.token_view import read_records, write_token_views

    if out.is_dir():
        raise InputError(f"--out {out} is a directory; give an .html file")
    print(write_token_views(read_records(generations), out, title))
