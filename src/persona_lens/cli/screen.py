"""``persona screen``: flag training samples that would induce a trait, before training."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from persona_lens.cli.app import ModelOption, app, console
from persona_lens.cli.generate import stage_progress
from persona_lens.core.errors import LayerError
from persona_lens.interop.prompts_io import VectorRef, parse_vector_ref


@app.command()
def screen(
    data: Annotated[
        Path,
        typer.Argument(
            help="JSONL (messages format), CSV (prompt, response), Parquet, or a folder saved "
            "with datasets' save_to_disk."
        ),
    ],
    vector: Annotated[
        list[str], typer.Option("--vector", "-v", help="VEC or VEC@LAYER; repeatable.")
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Ranked JSONL: every input field + 'screening'.")
    ],
    model: ModelOption = "embedded",
    mode: Annotated[
        str,
        typer.Option(
            help="diff (projection difference vs the model's own answer) | response (raw "
            "projection) | prompt-last (ΔP from the last prompt token; nothing generated)."
        ),
    ] = "diff",
    layer: Annotated[
        int | None, typer.Option(help="Layer for every vector (default: each best_layer).")
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option(min=1, help="Cap on the model's own answer y' (diff mode).")
    ] = 64,
    threshold: Annotated[
        list[str] | None,
        typer.Option(help="Flag scores above X, or TRAIT=X per vector (repeatable)."),
    ] = None,
    filter_top: Annotated[
        str | None, typer.Option(help="Flag the top PCT percent (0 < PCT < 100).")
    ] = None,
    threshold_from: Annotated[
        Path | None,
        typer.Option(help="Reference dataset: flag above its --percentile of scores."),
    ] = None,
    percentile: Annotated[
        str, typer.Option(help="Percentile of the reference's scores (with --threshold-from).")
    ] = "95",
    write_clean: Annotated[
        Path | None,
        typer.Option(help="Write the unflagged rows here, in the input's own format."),
    ] = None,
    report: Annotated[
        Path | None, typer.Option(help="Folder for the report (Markdown + PNG histograms).")
    ] = None,
    backend: Annotated[str, typer.Option(help="Who generates y': hf | vllm.")] = "hf",
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            is_flag=False,
            flag_value="local",
            help="Score on Ray: --ray alone starts a local instance, --ray ADDRESS joins a "
            "cluster (needs persona-lens[ray]).",
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(min=1, help="Ray workers (model replicas; default: one per GPU, or 1)."),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per forward pass.")] = 16,
    shard_size: Annotated[
        int, typer.Option(min=1, help="Rows per shard (the unit of resuming and of Ray work).")
    ] = 256,
    max_response_tokens: Annotated[
        int, typer.Option(min=1, help="Dataset responses are cut to this many tokens.")
    ] = 1024,
    order: Annotated[
        str, typer.Option(help="rank (first vector's rank, highest first) | input.")
    ] = "rank",
) -> None:
    """Score every sample by how far its response moves the model along each vector (the
    paper's projection difference), rank, flag and report. Streams the input in shards and
    resumes after an interruption (rerun the same command).

    Output: OUT (ranked JSONL) with a 'screening' field per row: per trait delta_p (or
    projection), percentile, rank and flagged; skipped rows and why in OUT's stem +
    '.skipped.log'.

    Examples:\n
      persona screen data.jsonl -v evil.safetensors --filter-top 5 -o ranked.jsonl\n
      persona screen data.parquet -v evil.safetensors -v sycophantic.safetensors@20
      --threshold-from chat.jsonl --percentile 95 -o ranked.jsonl --write-clean clean.parquet
      --report screen-report\n
      persona screen data.jsonl -v evil.safetensors --mode prompt-last --ray -o ranked.jsonl
    """
    from persona_lens.screening.flagging import parse_number, parse_thresholds
    from persona_lens.screening.screen import screen as run_screen

    refs = [parse_vector_ref(v, "--vector") for v in vector]
    command = "persona " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    with stage_progress() as advance:
        result = run_screen(
            data,
            [_vector_arg(r) for r in refs],
            model=model,
            mode=mode,
            layer=layer,
            max_new_tokens=max_new_tokens,
            threshold=parse_thresholds(threshold or []),
            filter_top=parse_number(filter_top, "--filter-top") if filter_top else None,
            threshold_from=threshold_from,
            percentile=parse_number(percentile, "--percentile"),
            out=out,
            write_clean=write_clean,
            report=report,
            backend=backend,
            ray=ray,
            workers=workers,
            batch_size=batch_size,
            shard_size=shard_size,
            max_response_tokens=max_response_tokens,
            order=order,
            progress=advance,
            command=command,
        )
    summary = result.summary
    for trait in summary.traits:
        threshold_text = "" if trait.threshold is None else f", threshold {trait.threshold:+.4f}"
        console.print(
            f"{trait.name} (layer {trait.layer}): dataset mean {trait.score_key} "
            f"{trait.mean:+.4f}{threshold_text}, {trait.flagged} flagged"
        )
    resumed = (
        f"; {summary.resumed_shards} shards from an earlier run" if summary.resumed_shards else ""
    )
    console.print(
        f"{summary.screened} rows screened, {summary.skipped} skipped"
        + (f" (see {summary.skip_log})" if summary.skip_log else "")
        + f", {summary.multi_turn} multi-turn; {summary.flagged} flagged{resumed}"
        + (f"; clean copy {summary.clean} ({summary.clean_rows} rows)" if summary.clean else "")
        + (f"; report {summary.report}" if summary.report else "")
    )
    print(out)


def _vector_arg(ref: VectorRef) -> Path | tuple[Path, int]:
    """A ``--vector`` value: the file, with its ``@LAYER`` (a range or ``all`` is refused)."""
    if ref.layers is None:
        return ref.path
    if isinstance(ref.layers, int):
        return ref.path, ref.layers
    raise LayerError(
        f"--vector {ref.path}: screening reads one layer per vector, not {ref.layers!r}"
    )
