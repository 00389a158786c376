"""``persona generate``: batched generation with any number of steering vectors and monitors.

The helpers here (vector loading and checking, steering/monitor construction, the generation
run that turns prompt records into output records) are shared with ``persona monitor``,
``eval`` and ``chat``. Everything a user passes is checked before the model loads: the
prompt file, the output path, the vector files and their layers (vector files know their
layer count); after loading, the vectors are checked against the model and the prompts
against its context, before any generation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from persona_lens.cli.app import MaxPromptTokensOption, ModelOption, app, console, print_result
from persona_lens.core.errors import InputError, LayerError, VectorMismatchError
from persona_lens.core.files import check_output
from persona_lens.interop.prompts_io import (
    LayerSel,
    SteerArg,
    VectorRef,
    fit_prompts,
    parse_steer,
    parse_vector_ref,
    read_prompt_file,
    unique_names,
    write_jsonl,
)

if TYPE_CHECKING:  # heavy imports stay inside the commands
    from persona_lens.core.architecture import BlockLayout
    from persona_lens.core.capture import Monitor
    from persona_lens.core.models import LoadedModel
    from persona_lens.core.steering import SteeringSpec
    from persona_lens.core.vectors import PersonaVector

Advance = Callable[[int], None]


# --- shared helpers ---------------------------------------------------------------------------
@contextmanager
def progress_bar(description: str, total: int) -> Iterator[Advance]:
    """A rich progress bar on stderr, shown on a terminal only (elsewhere it would print
    one final line, also before an error line); yields ``advance(n)``."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(
        *columns, console=console, transient=False, disable=not console.is_terminal
    ) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)


@contextmanager
def stage_progress() -> Iterator[Callable[[str, int, int], None]]:
    """A stage-aware progress bar on stderr (on a terminal only); yields
    ``report(stage, done, total)``."""
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
    ) as progress:
        task = progress.add_task("starting", total=None)

        def report(stage: str, done: int, total: int) -> None:
            progress.update(task, description=stage, completed=done, total=total)

        yield report


def load_vector_files(paths: Sequence[Path]) -> dict[Path, PersonaVector]:
    """Read each distinct vector file once (VectorError for a missing or malformed one)."""
    from persona_lens.core.vectors import PersonaVector

    vectors: dict[Path, PersonaVector] = {}
    for path in paths:
        if path not in vectors:
            vectors[path] = PersonaVector.load(path)
    return vectors


def load_checked_model(
    spec: str, vectors: dict[Path, PersonaVector]
) -> tuple[LoadedModel, BlockLayout]:
    """Load the model and refuse vectors made for another one (VectorMismatchError)."""
    from persona_lens.core.models import load_model

    with console.status(f"loading {spec} ..."):
        loaded = load_model(spec)
    layout, fingerprint = loaded.layout, loaded.fingerprint
    for path, vector in vectors.items():
        try:
            vector.check_compatible(layout.num_layers, layout.hidden_size, fingerprint)
        except VectorMismatchError as exc:
            raise VectorMismatchError(f"{path}: {exc}") from exc
    return loaded, layout


def warn(message: str) -> None:
    """One ``warning: ...`` line on stderr."""
    from rich.markup import escape

    console.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False, soft_wrap=True)


def check_vector_args(
    steer_args: Sequence[SteerArg],
    monitor_refs: Sequence[VectorRef],
    vectors: dict[Path, PersonaVector],
    layer: int | None = None,
    monitor_option: str = "--monitor",
) -> None:
    """Before the model loads: every layer against the vector's own layer count (the model
    must match it), and a warning for a vector that is zero where it is used."""
    for arg in steer_args:
        vector = vectors[arg.path]
        layers = steer_layers(arg, vector)
        if all(vector.near_zero(at) for at in layers):
            warn(f"--steer {arg.path} is zero at layer {_span(layers)}: it steers nothing")
    for ref in monitor_refs:
        vector = vectors[ref.path]
        sel = ref.layers if ref.layers is not None else layer
        at = _single_layer(sel, vector, f"{monitor_option} {ref.path}", vector.num_layers)
        if vector.near_zero(at):
            warn(f"{monitor_option} {ref.path} is zero at layer {at}: its projections are all 0")


def steer_layers(arg: SteerArg, vector: PersonaVector, option: str = "--steer") -> list[int]:
    """The blocks ``--steer`` adds at, checked against the vector's layer count."""
    from persona_lens.core.vectors import check_layer

    sel = arg.layers
    if sel is None:
        if vector.best_layer is None:
            raise LayerError(
                f"{option} {arg.path}: vector {vector.trait!r} has no best_layer; "
                "add @LAYER (e.g. VEC:2@12, or @all)"
            )
        sel = vector.best_layer
    if sel == "all":
        return list(range(1, vector.num_layers + 1))
    values = [sel] if isinstance(sel, int) else list(sel)
    try:
        return [check_layer(at, vector.num_layers) for at in values]
    except LayerError as exc:
        raise LayerError(f"{option} {arg.path}: {exc}") from exc


def _span(layers: Sequence[int]) -> str:
    return str(layers[0]) if len(layers) == 1 else f"{min(layers)}-{max(layers)}"


def _single_layer(sel: LayerSel, vector: PersonaVector, what: str, num_layers: int) -> int:
    from persona_lens.core.vectors import check_layer

    if sel is None:
        best = vector.best_layer
        if best is None:
            raise LayerError(f"{what}: vector {vector.trait!r} has no best_layer; add @LAYER")
        sel = best
    if not isinstance(sel, int):
        raise LayerError(f"{what}: monitoring needs one layer, not {sel!r}")
    try:
        return check_layer(sel, num_layers, allow_zero=True)
    except LayerError as exc:
        raise LayerError(f"{what}: {exc}") from exc


def build_monitors(
    refs: Sequence[VectorRef],
    vectors: dict[Path, PersonaVector],
    layout: BlockLayout,
    layer: int | None = None,
) -> list[Monitor]:
    """One Monitor per reference, at ``@LAYER``, else ``layer``, else the vector's best_layer.

    Monitor names are the output keys: the trait, or ``trait@layer`` where traits repeat.
    """
    from persona_lens.core.capture import Monitor

    chosen = []
    for ref in refs:
        vector = vectors[ref.path]
        sel = ref.layers if ref.layers is not None else layer
        chosen.append(_single_layer(sel, vector, f"vector {ref.path}", layout.num_layers))
    names = unique_names([vectors[r.path].trait for r in refs], chosen)
    return [
        Monitor(name, vectors[ref.path].at(at), at)
        for name, ref, at in zip(names, refs, chosen, strict=True)
    ]


def build_steering(
    args: Sequence[SteerArg], vectors: dict[Path, PersonaVector], layout: BlockLayout
) -> list[SteeringSpec]:
    """SteeringSpecs for ``--steer`` values, validated against the model's layers."""
    from persona_lens.core.steering import SteeringSpec, compile_specs

    specs = []
    for arg in args:
        vector = vectors[arg.path]
        layers: Any = list(arg.layers) if isinstance(arg.layers, tuple) else arg.layers
        if layers is None and vector.best_layer is None:
            raise LayerError(
                f"--steer {arg.path}: vector {vector.trait!r} has no best_layer; "
                "add @LAYER (e.g. VEC:2@12, or @all)"
            )
        spec = SteeringSpec(vector, arg.coefficient, layers)
        try:
            compile_specs([spec], layout)
        except LayerError as exc:
            raise LayerError(f"--steer {arg.path}: {exc}") from exc
        specs.append(spec)
    return specs


def generation_records(
    loaded: LoadedModel,
    layout: BlockLayout,
    records: Sequence[dict[str, Any]],
    *,
    steering: Sequence[SteeringSpec] = (),
    monitors: Sequence[Monitor] = (),
    max_new_tokens: int = 64,
    batch_size: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    system: str | None = None,
    token_projections: bool = False,
) -> list[dict[str, Any]]:
    """Generate for every record; each output keeps the input fields and adds ``response``,
    ``projections`` (response average), ``prompt_projections`` (last prompt token) and, if
    asked, ``token_projections`` and ``tokens``."""
    from persona_lens.core.generation import generate

    with progress_bar("generating", len(records)) as advance:
        generations = generate(
            loaded.model,
            loaded.tokenizer,
            list(records),
            system=system,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else 1.0,
            top_p=top_p,
            seed=seed,
            steering=steering,
            monitors=monitors,
            capture_layers=(),
            layout=layout,
            progress=advance,
        )
    out = []
    for record, gen in zip(records, generations, strict=True):
        row = {
            **record,
            "response": gen.response,
            "projections": gen.response_projections,
            "prompt_projections": gen.prompt_projections,
        }
        if token_projections:
            row["token_projections"] = gen.token_projections
            row["tokens"] = [loaded.tokenizer.decode([i]) for i in gen.response_ids]
        denoising = getattr(gen, "denoising_projections", None)  # block-diffusion models
        if denoising:
            row["denoising_projections"] = denoising
        out.append(row)
    return out


def parse_monitor_refs(values: Sequence[str] | None, option: str) -> list[VectorRef]:
    return [parse_vector_ref(v, option) for v in values or ()]


def check_temperature(temperature: float) -> None:
    if not temperature >= 0:  # also NaN
        raise InputError("--temperature must be 0 (greedy) or positive")


# --- the command ------------------------------------------------------------------------------
@app.command()
def generate(
    prompts: Annotated[
        Path, typer.Option("--prompts", "-p", help="JSONL: {'messages': [...]} or {'prompt': ...}")
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output JSONL (written at the end; - for stdout).")
    ],
    model: ModelOption = "embedded",
    steer: Annotated[
        list[str] | None,
        typer.Option(
            "--steer",
            "-s",
            help="VEC:COEF or VEC:COEF@LAYER; repeat for several traits. LAYER: N (default: the "
            "vector's best_layer), all (layer-incremental), A-B or A,B (add at each). "
            "A negative COEF suppresses the trait.",
        ),
    ] = None,
    monitor: Annotated[
        list[str] | None,
        typer.Option("--monitor", help="VEC or VEC@LAYER to project onto; repeatable."),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens per response.")] = 64,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per batch.")] = 16,
    temperature: Annotated[float, typer.Option(help="0: greedy; > 0: sampling.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Random seed for sampling.")] = None,
    system: Annotated[str | None, typer.Option(help="System prompt for every prompt.")] = None,
    token_projections: Annotated[
        bool, typer.Option("--token-projections", help="Add per-token projections and tokens.")
    ] = False,
    max_prompt_tokens: MaxPromptTokensOption = None,
    denoising_plot: Annotated[
        Path | None,
        typer.Option(
            help="Block-diffusion models: a PNG of each monitored projection against the "
            "denoising step."
        ),
    ] = None,
) -> None:
    """Generate responses, steered by any number of vectors and monitored by others.

    Output JSONL keeps every input field and adds 'response', 'projections' (trait: mean
    projection over the response), 'prompt_projections' (trait: projection of the last prompt
    token) and, with --token-projections, 'token_projections' and 'tokens'. On a
    block-diffusion model, monitored records also get 'denoising_projections': per trait, one
    list per committed canvas of the projection at each denoising step.

    Prompts end with a user message; to make the model continue a reply you started, give
    the start in the record's "prefill" field. A prompt that leaves no room in the model's
    context for --max-new-tokens is an error naming its line (or see --max-prompt-tokens).

    Examples:\n
      persona generate -p prompts.jsonl --steer humorous.safetensors:2 -o out.jsonl\n
      persona generate -p p.jsonl -s humorous.safetensors:2 -s hallucinating.safetensors:-2
      --monitor evil.safetensors -o out.jsonl\n
      persona generate -p p.jsonl -s evil.safetensors:1.5@all --monitor evil.safetensors@16
      --token-projections -o out.jsonl
    """
    check_temperature(temperature)
    steer_args = [parse_steer(s) for s in steer or ()]
    monitor_refs = parse_monitor_refs(monitor, "--monitor")
    prompt_file = read_prompt_file(prompts)
    check_output(out, "--out")
    if denoising_plot is not None:
        check_output(denoising_plot, "--denoising-plot")
    vectors = load_vector_files([a.path for a in steer_args] + [r.path for r in monitor_refs])
    check_vector_args(steer_args, monitor_refs, vectors)
    loaded, layout = load_checked_model(model, vectors)
    records = fit_prompts(
        prompt_file,
        loaded.model,
        loaded.tokenizer,
        max_new_tokens=max_new_tokens,
        max_prompt_tokens=max_prompt_tokens,
        system=system,
    )
    specs = build_steering(steer_args, vectors, layout)
    monitors = build_monitors(monitor_refs, vectors, layout)
    if denoising_plot is not None and not (layout.is_block_diffusion and monitors):
        raise InputError("--denoising-plot needs a block-diffusion model and a --monitor")
    rows = generation_records(
        loaded,
        layout,
        records,
        steering=specs,
        monitors=monitors,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        system=system,
        token_projections=token_projections,
    )
    if denoising_plot is not None:
        from persona_lens.monitoring.denoising_plot import plot_denoising

        plot_denoising([r.get("denoising_projections", {}) for r in rows], denoising_plot)
    print_result(write_jsonl(out, rows))
