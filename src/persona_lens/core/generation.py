"""Batched chat generation with steering and activation capture in the same pass.

Prompts are rendered with the tokenizer's chat template, sorted by length, batched with left
padding and generated with HF ``generate`` - or, for a family that transformers decodes wrongly
in a padded batch (:mod:`persona_lens.core.batching`), in padding-free batches of equal-length
prompts or one prompt at a time, so every family's output equals unbatched generation.
Steering hooks and an :class:`~persona_lens.core.capture.ActivationCapture` ride along, so
every response comes back with its activations and monitor projections without a second
forward pass.

To capture the activation of a response's last token, which ``generate`` never feeds back,
a capturing run generates one token more than asked and cuts the response to the asked length.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from persona_lens.core.architecture import BlockLayout, find_blocks, input_device
from persona_lens.core.batching import batch_groups, batching_mode
from persona_lens.core.capture import ActivationCapture, CaptureResult, Monitor
from persona_lens.core.decoding import DecodingChecks, interruptible, raise_if_interrupted
from persona_lens.core.errors import InputError
from persona_lens.core.messages import check_messages, check_prefill, check_tool_support
from persona_lens.core.ownership import owning
from persona_lens.core.steering import SteeringHandle, SteeringSpec, compile_specs

Message = dict[str, str]
PromptLike = str | Sequence[Message] | dict[str, Any]


def to_messages(prompt: PromptLike, system: str | None = None) -> list[Message]:
    """Normalize a prompt (text, message list, or a JSONL record) to chat messages, checked
    by :func:`~persona_lens.core.messages.check_messages` (roles, a final user turn)."""
    if isinstance(prompt, dict):
        if "messages" in prompt:
            prompt = prompt["messages"]
        elif "prompt" in prompt:
            prompt = str(prompt["prompt"])
        else:
            raise InputError("a prompt record needs a 'messages' or a 'prompt' field")
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = []
        for m in prompt:
            if not isinstance(m, dict) or not all(
                isinstance(m.get(k), str) for k in ("role", "content")
            ):
                raise InputError("every message needs string 'role' and 'content' fields")
            messages.append({"role": m["role"], "content": m["content"]})
    if not messages:
        raise InputError("a prompt with no messages")
    if system is not None:
        messages = [m for m in messages if m["role"] != "system"]
        messages.insert(0, {"role": "system", "content": system})
    check_messages(messages)
    return messages


def render_chat(tokenizer: Any, messages: Sequence[Message], prefill: str | None = None) -> str:
    """The prompt text the model sees: the chat template with a generation prompt, or, with
    ``prefill``, the template continuing an assistant message that starts with it."""
    if prefill is not None:
        messages = [*messages, {"role": "assistant", "content": prefill}]
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(
                list(messages),
                tokenize=False,
                add_generation_prompt=prefill is None,
                continue_final_message=prefill is not None,
            )
        except Exception as exc:  # jinja's raise_exception(): the template refuses them
            if type(exc).__module__.split(".")[0] != "jinja2":
                raise
            raise InputError(f"the model's chat template refuses these messages: {exc}") from exc
        return str(text)
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines if prefill is not None else [*lines, "assistant:"])


def render_prompt(tokenizer: Any, prompt: PromptLike, system: str | None = None) -> str:
    """:func:`to_messages` + :func:`render_chat` for one prompt, with a record's ``prefill``
    (the start of the reply, see :mod:`persona_lens.core.messages`)."""
    messages = to_messages(prompt, system)
    check_tool_support(tokenizer, messages)
    prefill = check_prefill(prompt.get("prefill")) if isinstance(prompt, dict) else None
    return render_chat(tokenizer, messages, prefill)


def eos_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """Every token id that ends a response for this model."""
    ids: set[int] = set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (config_eos, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return sorted(ids)


@dataclass
class Generation:
    """One prompt's response with what was captured while it was generated."""

    prompt_text: str
    response: str
    response_ids: list[int]
    prompt_last: torch.Tensor | None = None
    prompt_mean: torch.Tensor | None = None
    response_mean: torch.Tensor | None = None
    prompt_projections: dict[str, float] = field(default_factory=dict)
    token_projections: dict[str, list[float]] = field(default_factory=dict)

    @property
    def response_projections(self) -> dict[str, float]:
        """Mean per-token projection over the response, per monitor."""
        return {
            k: (sum(v) / len(v) if v else float("nan")) for k, v in self.token_projections.items()
        }


ProgressFn = Callable[[int], None]


@interruptible
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[PromptLike],
    *,
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
    layout: BlockLayout | None = None,
    progress: ProgressFn | None = None,
) -> list[Generation]:
    """Generate a response to every prompt, steered and captured as asked.

    ``capture_layers=None`` captures all layer positions 0..L; ``()`` captures none (monitor
    projections are still recorded). A steering spec whose coefficient is a list with one value
    per prompt steers each prompt with its own coefficient, batched together. The calling
    thread holds the model for the whole call (one owner per model: a call from another
    thread meanwhile raises :class:`~persona_lens.core.errors.ModelBusyError`). Ctrl-C stops
    at the next decoding step (KeyboardInterrupt); NaN/inf logits raise NonFiniteError.
    """
    if not prompts:
        raise InputError("no prompts to generate from")
    if max_new_tokens < 1 or batch_size < 1:
        raise InputError("max_new_tokens and batch_size must be at least 1")
    layout = layout or find_blocks(model)
    if layout.is_block_diffusion:  # canvases denoised by a decoder: core/diffusion
        from persona_lens.core.diffusion.generation import generate_diffusion

        return generate_diffusion(
            model, tokenizer, prompts, layout=layout, system=system,
            max_new_tokens=max_new_tokens, batch_size=batch_size, do_sample=do_sample,
            temperature=temperature, top_p=top_p, seed=seed, steering=steering,
            monitors=monitors, capture_layers=capture_layers, progress=progress,
        )  # fmt: skip
    specs = list(steering)
    compile_specs(_specs_for_rows(specs, range(len(prompts)), len(prompts)), layout)
    texts = [render_prompt(tokenizer, p, system) for p in prompts]
    eos_ids = eos_token_ids(model, tokenizer)
    want_capture = capture_layers is None or len(capture_layers) > 0 or bool(monitors)
    capture = None
    if want_capture:
        capture = ActivationCapture(
            model,
            layout,
            layers=capture_layers,
            monitors=monitors,
            eos_token_ids=eos_ids,
            prompt_stats=capture_layers is None or len(capture_layers) > 0,
            response_mean=capture_layers is None or len(capture_layers) > 0,
        )
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    results: list[Generation | None] = [None] * len(texts)
    with owning(model):
        mode = batching_mode(model, _pad_id(tokenizer, eos_ids))
        for batch_index, rows in enumerate(batch_groups(lengths, mode, batch_size)):
            batch_specs = _specs_for_rows(specs, rows, len(prompts))
            handle = SteeringHandle(model, compile_specs(batch_specs, layout), layout)
            if seed is not None:
                torch.manual_seed(seed + batch_index)
            with handle, torch.no_grad():
                outputs = _generate_batch(
                    model,
                    tokenizer,
                    [texts[i] for i in rows],
                    capture,
                    handle,
                    max_new_tokens=max_new_tokens,
                    eos_ids=eos_ids,
                    generate_kwargs=_sampling_kwargs(do_sample, temperature, top_p),
                    steering=batch_specs,
                )
            for row, out in zip(rows, outputs, strict=True):
                results[row] = out
            if progress is not None:
                progress(len(rows))
            raise_if_interrupted()
    return [r for r in results if r is not None]


def _pad_id(tokenizer: Any, eos_ids: list[int]) -> int | None:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return eos_ids[0] if eos_ids else None


def _sampling_kwargs(do_sample: bool, temperature: float, top_p: float) -> dict[str, Any]:
    if not do_sample:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    if temperature <= 0:
        raise InputError("temperature must be positive when sampling")
    return {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": None}


def _specs_for_rows(
    specs: list[SteeringSpec], rows: Sequence[int], num_prompts: int
) -> list[SteeringSpec]:
    """Slice per-prompt coefficient lists down to the rows of one batch."""
    sliced = []
    for spec in specs:
        coef = spec.coefficient
        if not isinstance(coef, (int, float)):
            values = list(coef)
            if len(values) != num_prompts:
                raise InputError(f"{len(values)} per-prompt coefficients for {num_prompts} prompts")
            spec = replace(spec, coefficient=[values[i] for i in rows])
        sliced.append(spec)
    return sliced


def _generate_batch(
    model: nn.Module,
    tokenizer: Any,
    texts: list[str],
    capture: ActivationCapture | None,
    handle: SteeringHandle,
    *,
    max_new_tokens: int,
    eos_ids: list[int],
    generate_kwargs: dict[str, Any],
    steering: Sequence[SteeringSpec] = (),
) -> list[Generation]:
    device = input_device(model)
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    input_ids = encoded["input_ids"].to(device)
    attention_mask = encoded["attention_mask"].to(device)
    prompt_length = int(input_ids.shape[1])
    handle.reset_positions(prompt_length)
    extra = 1 if capture is not None else 0
    pad_id = _pad_id(tokenizer, eos_ids)
    checks = DecodingChecks(handle.layout).attach()  # Ctrl-C, NaN/inf: stop at the next step
    if capture is not None:
        capture.begin(max_response_tokens=max_new_tokens)
        capture.attach()
    try:
        sequences = model.generate(  # type: ignore[operator]
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens + extra,
            pad_token_id=pad_id,
            eos_token_id=eos_ids or None,
            use_cache=True,
            **checks.kwargs(),
            **generate_kwargs,
        )
        checks.raise_if_failed(steering)
    finally:
        checks.remove()
        if capture is not None:
            capture.remove()
    captured = capture.result() if capture is not None else None
    return [
        _to_generation(
            tokenizer, text, sequences[row, prompt_length:], eos_ids, max_new_tokens, captured, row
        )
        for row, text in enumerate(texts)
    ]


def response_tokens(ids: Sequence[int], eos_ids: Sequence[int], limit: int) -> list[int]:
    """The response: generated tokens before the first end-of-sequence token, at most
    ``limit`` (a capturing run generates one token more than asked)."""
    ids = list(ids[:limit])
    for position, token in enumerate(ids):
        if token in eos_ids:
            return ids[:position]
    return ids


def _to_generation(
    tokenizer: Any,
    prompt_text: str,
    new_tokens: torch.Tensor,
    eos_ids: list[int],
    max_new_tokens: int,
    captured: CaptureResult | None,
    row: int,
) -> Generation:
    ids = response_tokens(new_tokens.tolist(), eos_ids, max_new_tokens)
    generation = Generation(
        prompt_text=prompt_text,
        response=tokenizer.decode(ids, skip_special_tokens=True),
        response_ids=ids,
    )
    if captured is not None:
        if captured.prompt_last is not None:
            generation.prompt_last = captured.prompt_last[row]
            generation.prompt_mean = (
                captured.prompt_mean[row] if captured.prompt_mean is not None else None
            )
        if captured.response_mean is not None:
            generation.response_mean = captured.response_mean[row]
        generation.prompt_projections = {
            k: float(v[row]) for k, v in captured.prompt_projections.items()
        }
        generation.token_projections = {k: v[row] for k, v in captured.token_projections.items()}
    return generation
