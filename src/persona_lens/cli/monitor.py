"""``persona monitor``: project each prompt's last token onto persona vectors.

The last-prompt-token projection predicts how strongly the model will express a trait before
it says anything (the paper's behaviour predictor), so the default needs one batched forward
pass and no generation. ``--generate`` also generates and adds response-average and per-token
projections, through the same code path as ``persona generate``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from persona_lens.cli.app import MaxPromptTokensOption, ModelOption, app, print_result
from persona_lens.cli.generate import (
    Advance,
    build_monitors,
    check_vector_args,
    generation_records,
    load_checked_model,
    load_vector_files,
    parse_monitor_refs,
    progress_bar,
)
from persona_lens.core.errors import InputError
from persona_lens.core.files import check_output
from persona_lens.interop.prompts_io import fit_prompts, read_prompt_file, write_jsonl

if TYPE_CHECKING:
    from persona_lens.core.architecture import BlockLayout
    from persona_lens.core.capture import Monitor
    from persona_lens.core.models import LoadedModel


def prompt_projections(
    loaded: LoadedModel,
    layout: BlockLayout,
    records: Sequence[dict[str, Any]],
    monitors: Sequence[Monitor],
    *,
    batch_size: int = 16,
    system: str | None = None,
    advance: Advance | None = None,
) -> list[dict[str, float]]:
    """Last-prompt-token projection per monitor for every record: batched forward passes."""
    import torch

    from persona_lens.core.capture import capture_forward
    from persona_lens.core.generation import render_prompt

    tokenizer = loaded.tokenizer
    texts = [render_prompt(tokenizer, r, system) for r in records]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
    results: list[dict[str, float]] = [{} for _ in texts]
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = tokenizer(
            [texts[i] for i in rows], return_tensors="pt", padding=True, add_special_tokens=False
        )
        input_ids = batch["input_ids"].to(loaded.device)
        mask = batch["attention_mask"].to(loaded.device)
        captured = capture_forward(
            loaded.model,
            input_ids,
            mask,
            torch.zeros_like(mask),
            layout=layout,
            layers=(),
            monitors=monitors,
        )
        for j, row in enumerate(rows):
            results[row] = {k: float(v[j]) for k, v in captured.prompt_projections.items()}
        if advance is not None:
            advance(len(rows))
    return results


@app.command()
def monitor(
    prompts: Annotated[
        Path, typer.Option("--prompts", "-p", help="JSONL: {'messages': [...]} or {'prompt': ...}")
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output JSONL (written at the end; - for stdout).")
    ],
    vector: Annotated[
        list[str],
        typer.Option("--vector", "-v", help="VEC or VEC@LAYER to project onto; repeatable."),
    ],
    model: ModelOption = "embedded",
    layer: Annotated[
        int | None, typer.Option(help="Layer for every vector (default: each best_layer).")
    ] = None,
    generate: Annotated[
        bool, typer.Option("--generate", help="Also generate; add response projections.")
    ] = False,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="With --generate.")] = 64,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per batch.")] = 16,
    system: Annotated[str | None, typer.Option(help="System prompt for every prompt.")] = None,
    token_projections: Annotated[
        bool,
        typer.Option("--token-projections", help="With --generate: per-token projections."),
    ] = False,
    max_prompt_tokens: MaxPromptTokensOption = None,
) -> None:
    """Project the last prompt token onto each vector: predicts the trait before generation.

    Output JSONL keeps every input field and adds 'prompt_projections' (trait: value) and
    'projections' - the same values, or with --generate the response-average projections,
    plus 'response' (and 'token_projections'/'tokens' with --token-projections).

    Examples:\n
      persona monitor -v evil.safetensors -p prompts.jsonl -o scores.jsonl\n
      persona monitor -v evil.safetensors -v sycophantic.safetensors --layer 20
      -p prompts.jsonl -o scores.jsonl\n
      persona monitor -v evil.safetensors@16 -p prompts.jsonl --generate
      --token-projections -o scores.jsonl
    """
    if token_projections and not generate:
        raise InputError("--token-projections needs --generate (there are no response tokens)")
    refs = parse_monitor_refs(vector, "--vector")
    if not refs:
        raise InputError("give at least one --vector")
    prompt_file = read_prompt_file(prompts)
    check_output(out, "--out")
    vectors = load_vector_files([r.path for r in refs])
    check_vector_args([], refs, vectors, layer, "--vector")
    loaded, layout = load_checked_model(model, vectors)
    records = fit_prompts(
        prompt_file,
        loaded.model,
        loaded.tokenizer,
        max_new_tokens=max_new_tokens if generate else 0,
        max_prompt_tokens=max_prompt_tokens,
        system=system,
    )
    monitors = build_monitors(refs, vectors, layout, layer)
    if generate:
        rows = generation_records(
            loaded,
            layout,
            records,
            monitors=monitors,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            system=system,
            token_projections=token_projections,
        )
    else:
        with progress_bar("monitoring", len(records)) as advance:
            values = prompt_projections(
                loaded,
                layout,
                records,
                monitors,
                batch_size=batch_size,
                system=system,
                advance=advance,
            )
        rows = [
            {**record, "projections": v, "prompt_projections": v}
            for record, v in zip(records, values, strict=True)
        ]
    print_result(write_jsonl(out, rows))
