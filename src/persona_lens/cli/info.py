"""``persona info``: a model's family, blocks, width and layer layout."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from persona_lens.cli.app import app, console


@app.command()
def info(
    model: Annotated[str, typer.Argument(help="Model spec (default: embedded).")] = "embedded",
    block_path: Annotated[
        str | None, typer.Option(help="Dotted path of the block list, if discovery is wrong.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show a model's family, residual blocks, layer count, width, layer layout, and how it is
    batched (left padding, or padding-free batches for a family transformers decodes wrongly
    when padded).

    Examples:\n
      persona info\n
      persona info ./my-model --json
    """
    from persona_lens.core.batching import BATCHING_NOTES, batching_mode
    from persona_lens.core.models import load_model

    with console.status(f"loading {model} ..."):
        loaded = load_model(model)
    loaded.block_path = block_path
    layout = loaded.layout
    summary = {
        "model": model,
        **layout.describe(),
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
    }
    mode = batching_mode(loaded.model, loaded.tokenizer.pad_token_id)
    summary["batching"] = f"{mode}: {BATCHING_NOTES[mode]}"
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    table = Table(show_header=False, title=f"persona info {model}")
    for key, value in summary.items():
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    Console().print(table)
