"""The shared Typer app, console and option types of the ``persona`` command line."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from typer import _click as click
from typer.core import TyperGroup

_TYPE_NAMES = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "path": "PATH", "file": "FILE"}


def plain_metavar(param: Any, ctx: click.Context) -> str:
    """The conventional metavar for a Typer parameter: none for a flag, ``[a|b]`` for a
    choice, else ``TEXT``/``INTEGER``/``FLOAT``/``PATH`` (a list option repeats, so it shows
    its element type)."""
    if getattr(param, "is_flag", False):
        return ""
    label = param.display_type(ctx).strip("<>")
    if label.startswith("list[") and label.endswith("]"):
        label = label[5:-1]
    label = label.removesuffix(" range")
    if "|" in label:
        return f"[{label}]"
    return _TYPE_NAMES.get(label, label.upper())


class PlainMetavarGroup(TyperGroup):
    """Typer's group, with help that prints ``TEXT``/``INTEGER`` (or nothing for a flag)
    instead of ``<str>``/``<int range>``/``<bool>``."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _plain_metavars(command.get_params(ctx))
        return command

    def get_params(self, ctx: click.Context) -> list[Any]:
        params = super().get_params(ctx)
        _plain_metavars(params)  # the group's own --help
        return params


def _plain_metavars(params: list[Any]) -> None:
    for param in params:
        if getattr(param, "metavar", None) is None and hasattr(param, "display_type"):
            param.display_type_rich = functools.partial(plain_metavar, param)


app = typer.Typer(
    cls=PlainMetavarGroup,
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

MaxPromptTokensOption = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Cut longer prompts to N tokens (chat template included) by cutting the end of "
        "their last user message; default: a prompt that leaves no room in the model's "
        "context for the reply is an error.",
    ),
]


def print_result(path: str | Path) -> None:
    """Print an output path as the last stdout line (what scripts read), unless the output
    itself went to stdout."""
    from persona_lens.core.files import is_stdout

    if not is_stdout(path):
        print(path)


def shown(path: str | Path) -> str:
    """A path for messages: ``standard output`` when the output went there."""
    from persona_lens.core.files import is_stdout

    return "standard output" if is_stdout(path) else str(path)
