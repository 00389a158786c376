"""``persona monitor-experiment``: does the last prompt token's projection predict the trait?"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from persona_lens.cli.app import ModelOption, app, console, print_result
from persona_lens.cli.generate import (
    check_vector_args,
    load_checked_model,
    load_vector_files,
    stage_progress,
)
from persona_lens.core.errors import InputError
from persona_lens.core.files import check_output, check_output_folder
from persona_lens.interop.prompts_io import parse_vector_ref


@app.command("monitor-experiment")
def monitor_experiment(
    vector: Annotated[str, typer.Option("--vector", "-v", help="VEC or VEC@LAYER to project on.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    model: ModelOption = "embedded",
    trait: Annotated[
        str | None, typer.Option("--trait", "-t", help="Trait to judge (default: the vector's).")
    ] = None,
    judge: Annotated[
        str, typer.Option(help="offline | openai:MODEL | anthropic:MODEL | hf:MODEL.")
    ] = "offline",
    questions: Annotated[
        int, typer.Option(min=1, max=20, help="Evaluation questions per prompt.")
    ] = 4,
    shots: Annotated[str, typer.Option(help="Many-shot example counts, comma-separated.")] = (
        "0,2,5,10,20"
    ),
    samples: Annotated[int, typer.Option(min=1, help="Sampled responses per prompt.")] = 1,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens per response.")] = 40,
    temperature: Annotated[float, typer.Option(min=0.0, help="0: greedy.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per batch.")] = 8,
) -> None:
    """The paper's monitoring experiment on any model. Prompts push the model towards or away
    from a trait without steering: a ladder of 8 system prompts (strongly suppressing ... no
    system prompt ... strongly eliciting) and many-shot prompts with 0..20 examples of the trait.
    For every prompt x evaluation question: the last prompt token's projection onto the vector
    (captured in the same generate call) and the judged trait score of the response. Writes
    OUT/monitoring.json, .md (Pearson r overall and per family) and .png (scatter plot).

    Defaults fit the embedded model on 2 CPU cores in a few minutes; scale up with --questions,
    --samples and --max-new-tokens.

    Examples:\n
      persona monitor-experiment -v vectors/humorous.safetensors --out runs/monitor\n
      persona monitor-experiment -v evil.safetensors@16 --questions 20 --samples 5
      --max-new-tokens 128 --judge openai:gpt-4.1-mini --out runs/evil
    """
    from persona_lens.judges.specs import load_judge, parse_judge_spec
    from persona_lens.monitoring.experiment import (
        OUTPUT_FILES,
        ExperimentSettings,
        run_experiment,
        write_experiment,
    )
    from persona_lens.traits.definitions import load_trait

    check_output_folder(out, "--out")
    for name in OUTPUT_FILES:
        check_output(out / name, "--out")
    parse_judge_spec(judge, allow_none=False)
    ref = parse_vector_ref(vector, "--vector")
    if ref.layers is not None and not isinstance(ref.layers, int):
        raise InputError(f"--vector {vector}: give one layer (VEC@N), not {ref.layers}")
    shot_counts = _parse_counts(shots)
    vectors = load_vector_files([ref.path])
    check_vector_args([], [ref], vectors, None, "--vector")
    definition = load_trait(trait or vectors[ref.path].trait)
    settings = ExperimentSettings(
        questions=questions,
        shot_counts=shot_counts,
        samples=samples,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
        layer=ref.layers if isinstance(ref.layers, int) else None,
    )
    settings.check(definition)
    judge_obj = load_judge(judge, check=True, allow_none=False)
    loaded, layout = load_checked_model(model, vectors)
    with stage_progress() as report:
        result = run_experiment(
            loaded.model,
            loaded.tokenizer,
            layout,
            judge_obj,
            definition,
            vectors[ref.path],
            settings,
            progress=report,
        )
    result.metadata = {
        "model": model,
        "vector": str(ref.path),
        "judge": judge,
        "settings": {**settings.__dict__, "shot_counts": list(settings.shot_counts)},
    }
    written = write_experiment(result, out)
    c = result.correlations()
    console.print(
        "Pearson r (projection vs trait score): "
        + ", ".join(f"{k} {_r(v['r'])} (n={v['n']})" for k, v in c.items())
    )
    print_result(written[-1])


def _r(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _parse_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise InputError(f"--shots {text!r}: give whole numbers, e.g. 0,2,5,10,20") from None
    return counts
