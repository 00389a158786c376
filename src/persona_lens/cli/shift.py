"""``persona shift``: how far fine-tuning moved the model along a persona vector."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from persona_lens.cli.app import ModelOption, app, console
from persona_lens.cli.generate import load_checked_model, load_vector_files
from persona_lens.cli.train import quiet_loading


@app.command()
def shift(
    adapter: Annotated[Path, typer.Option(help="A folder written by persona train (or peft).")],
    vector: Annotated[str, typer.Option("--vector", "-v", help="VEC or VEC@LAYER.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output JSON (.png beside it).")],
    model: ModelOption = "embedded",
    trait: Annotated[
        str | None,
        typer.Option(help="Trait whose evaluation questions are asked (default: the vector's)."),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per forward pass.")] = 16,
) -> None:
    """The finetuning shift (the paper's section 4.2): the mean last-prompt-token activation
    over the trait's evaluation questions, fine-tuned minus base, projected onto the vector's
    unit direction; per layer position and at the vector's layer (@LAYER, else best_layer).

    Examples:\n
      persona shift --adapter runs/plain --vector evil.safetensors --out shift.json\n
      persona shift --adapter runs/prevent --vector evil.safetensors@16 --trait evil
      --out shift-prevent.json
    """
    from persona_lens.core.errors import InputError, LayerError
    from persona_lens.interop.prompts_io import parse_vector_ref
    from persona_lens.training.adapters import check_adapter
    from persona_lens.training.shift import finetuning_shift, write_shift
    from persona_lens.traits.definitions import load_trait

    ref = parse_vector_ref(vector, "--vector")
    if ref.layers is not None and not isinstance(ref.layers, int):
        raise LayerError(f"--vector {ref.path}: give one layer, not {ref.layers!r}")
    if out.is_dir():
        raise InputError(f"--out {out} is a directory; give a .json file")
    vectors = load_vector_files([ref.path])
    definition = load_trait(trait or vectors[ref.path].trait)
    with quiet_loading():
        loaded, _ = load_checked_model(model, vectors)
    check_adapter(adapter, loaded)
    with console.status("measuring the finetuning shift ..."):
        result = finetuning_shift(
            loaded,
            adapter,
            vectors[ref.path],
            definition.evaluation_questions,
            layer=ref.layers if isinstance(ref.layers, int) else None,
            batch_size=batch_size,
        )
    result.metadata.update({"model": model, "vector": str(ref.path), "trait": definition.name})
    written = write_shift(result, out)
    at = result.at_layer
    where = "" if at is None else f": {at:+.4f} at layer {result.layer}"
    console.print(f"{result.trait} finetuning shift{where}; plot {written[0]}")
    print(written[-1])
