"""``persona export`` / ``persona import``: control-vector GGUF files for llama.cpp and repeng.

Layer mapping: persona-lens layer l (the output of block l, 1-based) is llama.cpp's and repeng's
``direction.(l-1)``; see :mod:`persona_lens.interop.control_vectors`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from persona_lens.cli.app import app, console, print_result, shown
from persona_lens.core.errors import InputError, VectorMismatchError
from persona_lens.core.files import check_output
from persona_lens.interop.prompts_io import parse_layers

FORMATS = ("gguf",)


def _layer_list(text: str | None, num_layers: int) -> list[int] | None:
    if text is None:
        return None
    sel = parse_layers(text, "--layer-range")
    if sel == "all":
        return list(range(2, num_layers + 1))
    return [sel] if isinstance(sel, int) else list(sel or ())


@app.command()
def export(
    vector: Annotated[Path, typer.Argument(help="A persona-lens vector (.safetensors).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output file (.gguf; - for stdout).")],
    fmt: Annotated[str, typer.Option("--format", help="Output format: gguf.")] = "gguf",
    layer_range: Annotated[
        str | None,
        typer.Option(
            help="Layers to export: A-B, A,B,C, N or all (2..L). Default: the best_layer. "
            "llama.cpp adds every exported layer at once, so keep ranges short or "
            "coefficients small."
        ),
    ] = None,
    coefficient: Annotated[
        float, typer.Option(help="Multiplies the directions (llama.cpp scales them again).")
    ] = 1.0,
    model_hint: Annotated[
        str | None, typer.Option(help="controlvector.model_hint (default: from the vector).")
    ] = None,
) -> None:
    """Export a vector as a llama.cpp control vector (the GGUF layout repeng also writes).

    persona-lens layer l becomes tensor direction.(l-1): llama.cpp adds direction.N to the
    output of its 0-based block N, our block N+1. Layers 2..L can be exported.

    Examples:\n
      persona export humorous.safetensors --format gguf -o humorous.gguf\n
      persona export evil.safetensors --layer-range 12-18 --coefficient 0.5 -o evil.gguf\n
      llama-cli -m model.gguf --control-vector-scaled humorous.gguf 1.0
    """
    from persona_lens.core.vectors import PersonaVector
    from persona_lens.interop.control_vectors import export_gguf, to_direction_index

    if fmt.lower() not in FORMATS:
        raise InputError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if coefficient != coefficient or coefficient in (float("inf"), float("-inf")):
        raise InputError("--coefficient must be finite")
    check_output(out, "--out")
    loaded = PersonaVector.load(vector)
    layers = _layer_list(layer_range, loaded.num_layers)
    path = export_gguf(loaded, out, layers=layers, coefficient=coefficient, hint=model_hint)
    chosen = layers or [loaded.best_layer or 0]
    first, last = to_direction_index(min(chosen)), to_direction_index(max(chosen))
    console.print(
        f"wrote {shown(path)}: {len(set(chosen))} layer(s), llama.cpp direction.{first}"
        + (f"..{last}" if last != first else "")
        + f"; use: --control-vector-scaled {path if shown(path) == str(path) else 'FILE'} 1.0",
        highlight=False,
        soft_wrap=True,
    )
    print_result(path)


@app.command("import")
def import_(
    control_vector: Annotated[
        Path, typer.Argument(help="A control-vector .gguf (llama.cpp or repeng).")
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output vector (.safetensors; - for stdout).")
    ],
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Check against this model and record it (recommended)."),
    ] = None,
    trait: Annotated[str | None, typer.Option(help="Trait name (default: from the file).")] = None,
) -> None:
    """Import a llama.cpp or repeng control vector as a persona-lens vector.

    direction.N becomes layer N+1; layers the file does not hold are zero. Steer with the
    imported layers as llama.cpp would: --steer VEC:1@A-B.

    Examples:\n
      persona import happy.gguf -o happy.safetensors\n
      persona import happy.gguf --model ./Mistral-7B-Instruct -o happy.safetensors
    """
    from persona_lens.interop.control_vectors import import_gguf, read_control_vector
    from persona_lens.traits.generator import normalize_name

    if not check_output(out, "--out").stream and out.suffix != ".safetensors":
        raise InputError(f"--out {out} should end in .safetensors")
    if trait is not None:
        trait = normalize_name(trait)  # the rule `persona extract` applies to names
    read_control_vector(control_vector)  # a bad file fails before any model loads
    if model is None:
        vector = import_gguf(control_vector, trait=trait)
    else:
        from persona_lens.core.models import load_model

        with console.status(f"loading {model} ..."):
            lm = load_model(model)
        layout, fingerprint = lm.layout, lm.fingerprint
        vector = import_gguf(
            control_vector,
            num_layers=layout.num_layers,
            hidden_size=layout.hidden_size,
            trait=trait,
        )
        try:
            vector.check_compatible(layout.num_layers, layout.hidden_size, fingerprint)
        except VectorMismatchError as exc:
            raise VectorMismatchError(f"{control_vector}: {exc}") from exc
        model_type = str(getattr(lm.model.config, "model_type", "") or "")
        vector.metadata.update(
            {"model": model, "model_fingerprint": fingerprint, "model_type": model_type}
        )
    path = vector.save(out)
    layers = vector.metadata.get("imported_layers", "")
    console.print(
        f"wrote {shown(path)}: trait {vector.trait!r}, layers {layers}",
        highlight=False,
        soft_wrap=True,
    )
    print_result(path)
