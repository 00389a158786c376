"""The shared Typer app, console and option types of the ``persona`` command line."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    name="persona",
    help="Persona vectors: extract, monitor and steer character traits in language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

ModelOption = Annotated[
    str,
    typer.Option(
        "--model", "-m", help="'embedded', a Hugging Face id or directory, or a .gguf file."
    ),
]
