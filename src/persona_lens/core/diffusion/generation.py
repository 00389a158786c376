"""``generate`` and forward-pass capture for block-diffusion models.

:func:`generate_diffusion` is what :func:`persona_lens.core.generation.generate` runs for a
block-diffusion layout: the same prompts, batching, per-prompt coefficients and results, with
the model's own ``generate`` (canvases, denoising steps, its sampler and adaptive stopping).

Sampling: the model's sampler always samples (it has no greedy mode) on its own temperature
schedule (``t_min``..``t_max`` in its generation config), so ``temperature`` and ``top_p`` do
not apply and are refused when set; ``do_sample=False`` without a seed uses seed 0, so that,
like greedy decoding, the same call gives the same text. The number of denoising steps is
``max_denoising_steps`` from the generation config (or ``denoising_steps`` here).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from persona_lens.core.architecture import BlockLayout
from persona_lens.core.capture import ActivationCapture, CaptureResult, Monitor
from persona_lens.core.diffusion.capture import DiffusionCapture, DiffusionCaptureResult
from persona_lens.core.diffusion.steering import DiffusionSteeringHandle
from persona_lens.core.errors import ArchitectureError, InputError
from persona_lens.core.generation import (
    Generation,
    ProgressFn,
    PromptLike,
    _specs_for_rows,
    _to_generation,
    eos_token_ids,
    render_chat,
    to_messages,
)
from persona_lens.core.steering import SteeringSpec, compile_specs


@dataclass
class DiffusionGeneration(Generation):
    """A :class:`Generation` of a block-diffusion model, with, per monitor, one series per
    committed canvas of the projection at each denoising step (mean over the canvas's
    response tokens, on the decoder)."""

    denoising_projections: dict[str, list[list[float]]] = field(default_factory=dict)


def check_sampling(do_sample: bool, temperature: float, top_p: float) -> None:
    """Refuse sampling settings that a block-diffusion sampler does not have."""
    if top_p != 1.0 or (do_sample and temperature != 1.0):
        raise InputError(
            "a block-diffusion model samples on its own temperature schedule (t_min..t_max "
            "in its generation config): temperature and top_p do not apply"
        )


def generate_diffusion(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[PromptLike],
    *,
    layout: BlockLayout,
    system: str | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    steering: Iterable[SteeringSpec] = (),
    monitors: Sequence[Monitor] = (),
    capture_layers: Sequence[int] | None = (),
    progress: ProgressFn | None = None,
    denoising_steps: int | None = None,
) -> list[Generation]:
    """Generate with a block-diffusion model, steered and captured as asked (see
    :func:`persona_lens.core.generation.generate` for the arguments)."""
    check_sampling(do_sample, temperature, top_p)
    if denoising_steps is not None and denoising_steps < 1:
        raise InputError("denoising_steps must be at least 1")
    if seed is None and not do_sample:
        seed = 0
    specs = list(steering)
    compile_specs(_specs_for_rows(specs, range(len(prompts)), len(prompts)), layout)
    texts = [render_chat(tokenizer, to_messages(p, system)) for p in prompts]
    eos_ids = eos_token_ids(model, tokenizer)
    full = capture_layers is None or len(capture_layers) > 0
    capture = None
    if full or monitors:
        capture = DiffusionCapture(
            model,
            layout,
            layers=capture_layers,
            monitors=monitors,
            eos_token_ids=eos_ids,
            prompt_stats=full,
            response_mean=full,
        )
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    results: list[Generation | None] = [None] * len(texts)
    extra = {"max_denoising_steps": denoising_steps} if denoising_steps else {}
    for batch_index, start in enumerate(range(0, len(order), batch_size)):
        rows = order[start : start + batch_size]
        plan = compile_specs(_specs_for_rows(specs, rows, len(prompts)), layout)
        handle = DiffusionSteeringHandle(model, plan, layout)
        if seed is not None:
            torch.manual_seed(seed + batch_index)
        batch_texts = [texts[i] for i in rows]
        with handle, torch.no_grad():
            sequences, prompt_length, captured = _generate_batch(
                model, tokenizer, batch_texts, layout, capture, max_new_tokens, eos_ids, extra
            )
        for j, row in enumerate(rows):
            generation = _to_generation(
                tokenizer,
                batch_texts[j],
                sequences[j, prompt_length:],
                eos_ids,
                max_new_tokens,
                captured,
                j,
            )
            series = captured.denoising_projections if captured is not None else {}
            results[row] = DiffusionGeneration(
                **vars(generation),
                denoising_projections={k: v[j] for k, v in series.items()},
            )
        if progress is not None:
            progress(len(rows))
    return [r for r in results if r is not None]


def _generate_batch(
    model: nn.Module,
    tokenizer: Any,
    texts: list[str],
    layout: BlockLayout,
    capture: DiffusionCapture | None,
    max_new_tokens: int,
    eos_ids: list[int],
    extra: dict[str, Any],
) -> tuple[torch.Tensor, int, DiffusionCaptureResult | None]:
    device = next(model.parameters()).device
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    input_ids = encoded["input_ids"].to(device)
    attention_mask = encoded["attention_mask"].to(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    if capture is not None:
        capture.begin(prompt_mask=attention_mask, max_response_tokens=max_new_tokens)
        capture.attach()
    try:
        out = model.generate(  # type: ignore[operator]
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=eos_ids or None,
            return_dict_in_generate=True,
            **extra,
        )
        sequences = out.sequences
        if capture is not None:
            last = sequences[:, -_canvas_length(layout) :]
            if capture.needs_last_canvas_encoded:
                encode_last_canvas(layout, sequences, out.cache, attention_mask)
            else:
                capture.commit(last)
    finally:
        if capture is not None:
            capture.remove()
    captured = capture.result() if capture is not None else None
    return sequences, int(input_ids.shape[1]), captured


def _canvas_length(layout: BlockLayout) -> int:
    assert layout.canvas_length is not None
    return layout.canvas_length


def encode_last_canvas(
    layout: BlockLayout, sequences: torch.Tensor, cache: Any, prompt_mask: torch.Tensor
) -> None:
    """Run the encoder over the last canvas, which ``generate`` returns without encoding:
    one forward of ``canvas_length`` tokens against the cache (the only extra work)."""
    width = _canvas_length(layout)
    total = int(sequences.shape[1])
    cached = int(cache.get_seq_length()) if cache is not None else -1
    if cached != total - width:
        raise ArchitectureError(
            f"the encoder cache holds {cached} tokens, expected {total - width} before the "
            "last canvas (a generate loop this version does not know)"
        )
    device = sequences.device
    grown = torch.ones(prompt_mask.shape[0], total - prompt_mask.shape[1], device=device)
    mask = torch.cat([prompt_mask.to(device).bool(), grown.bool()], dim=1)
    positions = torch.arange(total - width, total, device=device).unsqueeze(0)
    layout.stream("encoder").module(
        input_ids=sequences[:, -width:], attention_mask=mask, cache=cache, position_ids=positions
    )


def encoder_layout(layout: BlockLayout) -> BlockLayout:
    """The encoder stream as a single-stream layout (for forward-mode capture)."""
    stream = layout.stream("encoder")
    return BlockLayout(
        path=stream.path,
        blocks=stream.blocks,
        family=layout.family,
        hidden_size=layout.hidden_size,
        block_kinds=stream.block_kinds,
    )


def capture_forward_diffusion(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    layout: BlockLayout,
    layers: Sequence[int] | None = None,
    monitors: Sequence[Monitor] = (),
) -> CaptureResult:
    """One encoder forward over full sequences, reductions over ``response_mask`` [B, T].

    Given tokens are what the encoder reads (the decoder only ever sees canvases being
    denoised), with positions counted as ``generate`` counts them; the reductions equal those
    recorded on the encoder while generating the same tokens.
    """
    single = encoder_layout(layout)
    encoder = layout.stream("encoder").module
    capture = ActivationCapture(encoder, single, layers=layers, monitors=monitors)
    capture.begin(response_mask=response_mask)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    with capture, torch.no_grad():
        encoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)
    return capture.result()
