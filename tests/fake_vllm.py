"""A stand-in for the ``vllm`` package (``LLM``, ``SamplingParams``) driven by HF transformers.

It loads the checkpoint folder it is given, as vLLM does, and answers each request on its own
(batch of one, no padding), so the glue in :mod:`persona_lens.extraction.backends` is tested
against an engine whose batching differs from HF ``generate``'s. Install it with
``monkeypatch.setitem(sys.modules, "vllm", fake_vllm)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM

started: list[dict[str, Any]] = []  # engine options of every LLM created, for assertions
calls: list[int] = []  # requests per generate() call


class SamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        self.temperature = float(kwargs.pop("temperature", 1.0))
        self.max_tokens = int(kwargs.pop("max_tokens", 16))
        self.seed = kwargs.pop("seed", None)
        self.stop_token_ids = list(kwargs.pop("stop_token_ids", []) or [])
        self.options = kwargs


@dataclass
class CompletionOutput:
    token_ids: list[int]


@dataclass
class RequestOutput:
    outputs: list[CompletionOutput]


class LLM:
    def __init__(self, model: str, **options: Any) -> None:
        started.append({"model": model, **options})
        dtype = getattr(torch, options.get("dtype", "float32"))
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).eval()

    def generate(
        self, prompts: list[dict[str, Any]], params: list[SamplingParams], use_tqdm: bool = True
    ) -> list[RequestOutput]:
        calls.append(len(prompts))
        return [self._one(p["prompt_token_ids"], sp) for p, sp in zip(prompts, params, strict=True)]

    def _one(self, prompt_ids: list[int], params: SamplingParams) -> RequestOutput:
        ids = torch.tensor([prompt_ids])
        sampling: dict[str, Any] = {"do_sample": False}
        if params.temperature > 0:
            torch.manual_seed(params.seed or 0)
            sampling = {"do_sample": True, "temperature": params.temperature, "top_k": None}
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=params.max_tokens,
                eos_token_id=params.stop_token_ids or None,
                pad_token_id=(params.stop_token_ids or [0])[0],
                **sampling,
            )
        new = out[0, len(prompt_ids) :].tolist()
        # like vLLM: the stop token is part of the output, nothing after it
        for position, token in enumerate(new):
            if token in params.stop_token_ids:
                new = new[: position + 1]
                break
        return RequestOutput([CompletionOutput(new)])
