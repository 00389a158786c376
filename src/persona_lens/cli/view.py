"""``persona view``: an offline HTML page of per-token projections."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from persona_lens.cli.app import app, print_result
from persona_lens.core.files import check_output


@app.command()
def view(
    generations: Annotated[
        Path, typer.Argument(help="JSONL from `persona generate --token-projections`.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="HTML page to write (- for stdout).")],
    title: Annotated[str, typer.Option(help="Page title.")] = "persona-lens token view",
    centre: Annotated[
        str,
        typer.Option(
            "--centre",
            "--center",
            help="Colour centre: auto (each reply's mean where all values share a sign, "
            "else 0) | zero | reply (each reply's own mean).",
        ),
    ] = "auto",
    baseline: Annotated[
        Path | None,
        typer.Option(
            help="An unsteered run's JSONL (same monitors): centre each trait on its mean "
            "token projection, so colour shows what steering moved."
        ),
    ] = None,
) -> None:
    """Colour every generated token by its projection onto each monitored trait (blue: below
    the colour centre, red: above; one centre and scale per trait), with a trait selector
    and hover values. With steering on, every projection may share a sign; the default
    centre then follows each reply's mean so its tokens still contrast. The page is
    self-contained: it loads nothing and works offline.

    Examples:\n
      persona generate -p prompts.jsonl --monitor evil.safetensors --token-projections
      -o gen.jsonl\n
      persona view gen.jsonl --out tokens.html\n
      persona view steered.jsonl --baseline unsteered.jsonl --out tokens.html
    """
    from persona_lens.monitoring.token_view import (
        CENTRES,
        baseline_means,
        read_records,
        write_token_views,
    )

    if centre not in CENTRES:
        from persona_lens.core.errors import InputError

        raise InputError(f"unknown --centre {centre!r}; choose one of {', '.join(CENTRES)}")
    check_output(out, "--out")
    records = read_records(generations)
    means = baseline_means(read_records(baseline)) if baseline is not None else None
    print_result(write_token_views(records, out, title, centre, means))
