"""``persona eval``: the paper's trait-expression score, with and without steering, and sweeps."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from persona_lens.cli.app import ModelOption, app, console, print_result
from persona_lens.cli.generate import (
    build_steering,
    check_vector_args,
    load_checked_model,
    load_vector_files,
    progress_bar,
    steer_layers,
    warn,
)
from persona_lens.core.errors import InputError, LayerError
from persona_lens.interop.prompts_io import SteerArg, parse_steer, parse_vector_ref


@app.command("eval")
def eval_command(
    trait: Annotated[str, typer.Option("--trait", "-t", help="Built-in trait or trait JSON.")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output JSON (.md/.png beside it; - for stdout).")
    ],
    model: ModelOption = "embedded",
    steer: Annotated[
        list[str] | None,
        typer.Option("--steer", "-s", help="VEC:COEF[@LAYER]; repeatable; all applied together."),
    ] = None,
    judge: Annotated[
        str, typer.Option(help="offline | openai:MODEL | anthropic:MODEL | hf:MODEL.")
    ] = "offline",
    samples: Annotated[int, typer.Option(min=1, help="Sampled rollouts per question.")] = 1,
    questions: Annotated[
        int, typer.Option(min=1, max=20, help="Evaluation questions used (the paper: 20).")
    ] = 20,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens per response.")] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, help="0: greedy.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per batch.")] = 32,
    sweep: Annotated[
        str | None,
        typer.Option(help="VEC[@LAYER]: sweep its coefficient (default layer: best_layer)."),
    ] = None,
    coefficients: Annotated[
        str, typer.Option(help="Sweep coefficients, comma-separated.")
    ] = "-2,-1,0,1,2",
    adapter: Annotated[
        list[Path] | None,
        typer.Option(
            help="A fine-tuned adapter folder (persona train); repeatable. Each is scored "
            "beside the base model in one table."
        ),
    ] = None,
) -> None:
    """Score how strongly the model expresses a trait: the mean judged trait score (0-100)
    over the trait's evaluation questions x --samples sampled rollouts, and mean coherence,
    without steering and (with --steer) with it. Refusals are counted separately.

    With --sweep, every coefficient runs in the same batched generation, and a Markdown
    table and a PNG plot (trait score and coherence vs coefficient) go beside --out.
    With --adapter, each fine-tuned adapter is scored under the same conditions, seed and
    judge as the base model (base, plain and preventative fine-tuning in one table).

    Examples:\n
      persona eval --trait humorous --out eval.json\n
      persona eval --trait humorous --steer humorous.safetensors:2 --samples 3 --out eval.json\n
      persona eval --trait evil --sweep evil.safetensors --coefficients -2,-1,0,1,2,3
      --questions 10 --judge openai:gpt-4.1-mini --out evil-sweep.json\n
      persona eval --trait evil --adapter runs/plain --adapter runs/prevent --out ft.json
    """
    from persona_lens.core.steering import SteeringSpec
    from persona_lens.judges.specs import load_judge, parse_judge_spec
    from persona_lens.monitoring.evaluation import (
        EvalSettings,
        build_conditions,
        check_eval_output,
        distinct_settings,
        evaluate,
        parse_coefficients,
        write_eval,
    )
    from persona_lens.traits.definitions import load_trait

    check_eval_output(out)
    settings = EvalSettings(questions, samples, max_new_tokens, temperature, seed, batch_size)
    settings.check()
    parse_judge_spec(judge, allow_none=False)
    definition = load_trait(trait)
    steer_args = [parse_steer(s) for s in steer or ()]
    sweep_ref = parse_vector_ref(sweep, "--sweep") if sweep else None
    coefs = parse_coefficients(coefficients) if sweep_ref else []
    adapters = list(adapter or ())
    if adapters and sweep_ref is not None:
        raise InputError("--sweep runs on the base model; use it without --adapter")
    for folder in adapters:
        if not (folder / "adapter_config.json").is_file():
            raise InputError(
                f"--adapter {folder}: no adapter_config.json; is it a trained adapter?"
            )
    paths = [a.path for a in steer_args] + ([sweep_ref.path] if sweep_ref else [])
    vectors = load_vector_files(paths)
    check_vector_args(steer_args, [], vectors)
    if sweep_ref is not None:
        sweep_layers = steer_layers(
            SteerArg(sweep_ref.path, 1.0, sweep_ref.layers), vectors[sweep_ref.path], "--sweep"
        )
        if isinstance(sweep_ref.layers, (tuple, str)):
            raise LayerError(f"--sweep {sweep_ref.path}: give one layer as VEC@LAYER")
        if vectors[sweep_ref.path].near_zero(sweep_layers[0]):
            warn(f"--sweep {sweep_ref.path} is zero at layer {sweep_layers[0]}: it steers nothing")
    judge_obj = load_judge(judge, check=True, allow_none=False)
    loaded, layout = load_checked_model(model, vectors)
    specs = build_steering(steer_args, vectors, layout)
    if adapters:
        from persona_lens.training.adapters import check_adapter

        for folder in adapters:
            check_adapter(folder, loaded)
    sweep_spec = None
    if sweep_ref is not None:
        vector = vectors[sweep_ref.path]
        layer = sweep_ref.layers if sweep_ref.layers is not None else vector.best_layer
        if not isinstance(layer, int):
            raise LayerError(
                f"--sweep {sweep_ref.path}: give one layer as VEC@LAYER "
                f"(the vector has {'no best_layer' if layer is None else layer})"
            )
        sweep_spec = SteeringSpec(vector, 0.0, layer)
        from persona_lens.core.steering import compile_specs

        try:
            compile_specs([sweep_spec], layout)
        except LayerError as exc:
            raise LayerError(f"--sweep {sweep_ref.path}: {exc}") from exc
    blocks = distinct_settings(build_conditions(specs, sweep_spec is not None, coefs)[0])
    per_model = len(definition.evaluation_questions[:questions]) * samples
    rows = per_model * (blocks + len(adapters) * (2 if specs else 1))
    with progress_bar("generating", rows) as advance:
        report = evaluate(
            loaded.model,
            loaded.tokenizer,
            layout,
            judge_obj,
            definition,
            settings,
            steering=specs,
            sweep=sweep_spec,
            coefficients=coefs,
            progress=advance,
        )
        if adapters:
            from persona_lens.training.evaluation import evaluate_adapters

            report.models = evaluate_adapters(
                loaded, judge_obj, definition, settings, adapters, steering=specs, progress=advance
            )
    report.metadata = {
        "model": model,
        "judge": judge,
        "settings": settings.__dict__,
        "steering": [
            f"{a.path}:{a.coefficient:g}" + (f"@{a.layers}" if a.layers else "") for a in steer_args
        ],
    }
    if sweep_ref is not None:
        report.sweep_vector = str(sweep_ref.path)
    written = write_eval(report, out)
    base = report.baseline.summary()
    line = f"{definition.name}: baseline {_fmt(base['trait_score'])}"
    if report.steered is not None:
        line += f", steered {_fmt(report.steered.summary()['trait_score'])}"
    for result in report.models:
        line += f", {result.name} {_fmt(result.baseline.summary()['trait_score'])}"
    beside = f"; wrote {', '.join(str(p) for p in written[:-1])}" if written[:-1] else ""
    console.print(line + f" (judge {judge}){beside}", highlight=False, soft_wrap=True)
    print_result(written[-1])


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
