"""The ``persona`` command line. Every user mistake ends with one line on stderr and exit 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from persona_lens.errors import PersonaLensError

app = typer.Typer(
    name="persona",
    help="Persona vectors: extract, monitor and steer character traits in language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

ModelOption = Annotated[
    str, typer.Option("--model", "-m", help="'embedded', a Hugging Face id or directory, or a .gguf file.")
]


@app.command()
def info(
    model: Annotated[str, typer.Argument(help="Model spec (default: embedded).")] = "embedded",
    block_path: Annotated[
        str | None, typer.Option(help="Dotted path of the block list, if discovery is wrong.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show a model's family, residual blocks, layer count, width and layer layout.

    Examples:\n
      persona info\n
      persona info ./my-model --json
    """
    from persona_lens.architecture import find_blocks
    from persona_lens.models import load_model

    with console.status(f"loading {model} ..."):
        loaded = load_model(model)
    layout = find_blocks(loaded.model, block_path)
    summary = {"model": model, **layout.describe(), "device": str(loaded.device),
               "dtype": str(loaded.dtype).removeprefix("torch."),
               "parameters": sum(p.numel() for p in loaded.model.parameters())}
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    table = Table(show_header=False, title=f"persona info {model}")
    for key, value in summary.items():
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    Console().print(table)


@app.command()
def demo(
    model: ModelOption = "embedded",
    trait: Annotated[str, typer.Option(help="Built-in trait or trait file.")] = "optimistic",
    questions: Annotated[int, typer.Option(min=1, max=20, help="Extraction questions.")] = 6,
    max_new_tokens: Annotated[int, typer.Option(min=8, max=512)] = 40,
    coefficient: Annotated[float, typer.Option(help="Steering strength.")] = 4.0,
    out: Annotated[Path | None, typer.Option(help="Where to save the demo vector.")] = None,
) -> None:
    """The main job in two minutes: load the model, find a trait's direction from contrastive
    system prompts (activations captured while generating), then steer and monitor with it.

    Examples:\n
      persona demo\n
      persona demo --trait humorous --coefficient 6
    """
    from persona_lens.demo import run_demo

    path = run_demo(
        model_spec=model,
        trait_name=trait,
        num_questions=questions,
        max_new_tokens=max_new_tokens,
        coefficient=coefficient,
        out=out,
        console=Console(),
    )
    print(path)


def main() -> None:
    """Entry point: run the app, turning user errors into one line and exit code 2."""
    try:
        app()
    except PersonaLensError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
