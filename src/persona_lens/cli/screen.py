"""``persona screen``: flag training samples that would induce a trait, before training."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TimeElapsedColumn

from persona_lens.cli.app import ModelOption, app, console
from persona_lens.core.errors import InputError, LayerError
from persona_lens.interop.prompts_io import VectorRef, parse_number, parse_vector_ref


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
        int | None,
        typer.Option(
            help="Layer for every vector (default: each one's read_layer, else best_layer)."
        ),
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
        str | None,
        typer.Option(help="Percentile of the reference's scores (with --threshold-from; 95)."),
    ] = None,
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
            metavar="[ADDRESS]",
            help="Score on Ray: --ray alone starts a local instance, --ray ADDRESS joins a "
            "cluster (needs Ray: the ray extra of persona-lens).",
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
    from persona_lens.screening.flagging import parse_thresholds
    from persona_lens.screening.screen import screen as run_screen

    refs = [parse_vector_ref(v, "--vector") for v in vector]
    if percentile is not None and threshold_from is None:
        raise InputError("--percentile applies to --threshold-from REF")
    command = "persona " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    with _progress() as advance:
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
            percentile=parse_number(percentile, "--percentile") if percentile else 95.0,
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


@contextmanager
def _progress() -> Iterator[Callable[[str, int, int], None]]:
    """A stage-aware progress bar that appears with the first report (after the input, the
    vectors and the model were checked) and disappears on an error, which is then the only
    line on stderr."""
    progress = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    task: list[TaskID] = []

    def report(stage: str, done: int, total: int) -> None:
        if not task:
            progress.start()
            task.append(progress.add_task(stage, total=total))
        progress.update(task[0], description=stage, completed=done, total=total)

    try:
        yield report
    except BaseException:
        progress.live.transient = True
        raise
    finally:
        progress.stop()


OPTIONAL_VALUES = {"--ray": "local"}
"""Options whose value may be left out (``--ray`` alone means ``--ray=local``)."""


def with_optional_values(args: list[str]) -> list[str]:
    """``persona screen`` arguments with a bare ``--ray`` (last, or before another option)
    written as ``--ray=local``; the command-line parser needs every option value spelled out."""
    if not args or args[0] != "screen":
        return list(args)
    out = list(args)
    for k, arg in enumerate(out):
        if arg in OPTIONAL_VALUES and (k + 1 == len(out) or out[k + 1].startswith("-")):
            out[k] = f"{arg}={OPTIONAL_VALUES[arg]}"
    return out


def _vector_arg(ref: VectorRef) -> Path | tuple[Path, int]:
    """A ``--vector`` value: the file, with its ``@LAYER`` (a range or ``all`` is refused)."""
    if ref.layers is None:
        return ref.path
    if isinstance(ref.layers, int):
        return ref.path, ref.layers
    raise LayerError(
        f"--vector {ref.path}: screening reads one layer per vector, not {ref.layers!r}"
    )
