"""``persona demo``: the main job on the embedded model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from persona_lens.cli.app import ModelOption, app, print_result
from persona_lens.core.files import check_output


@app.command()
def demo(
    model: ModelOption = "embedded",
    trait: Annotated[str, typer.Option(help="Built-in trait or trait file.")] = "optimistic",
    questions: Annotated[int, typer.Option(min=1, max=20, help="Extraction questions.")] = 6,
    max_new_tokens: Annotated[int, typer.Option(min=8, max=512)] = 40,
    coefficient: Annotated[float, typer.Option(help="Steering strength.")] = 4.0,
    out: Annotated[
        Path | None, typer.Option(help="Where to save the demo vector (- for stdout).")
    ] = None,
) -> None:
    """The main job in two minutes: load the model, find a trait's direction from contrastive
    system prompts (activations captured while generating), then steer and monitor with it.

    Examples:\n
      persona demo\n
      persona demo --trait humorous --coefficient 6
    """
    from persona_lens.demo import run_demo

    target = check_output(out, "--out") if out is not None else None
    path = run_demo(
        model_spec=model,
        trait_name=trait,
        num_questions=questions,
        max_new_tokens=max_new_tokens,
        coefficient=coefficient,
        out=out,
        console=Console(stderr=target is not None and target.to_stdout),
    )
    print_result(path)
