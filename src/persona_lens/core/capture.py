"""Activation capture from block outputs, recorded while the model generates.

:class:`ActivationCapture` hooks the blocks (and the input of block 1 for position 0) and
reduces activations on the fly, so extraction and monitoring need no second forward pass:

- ``prompt_last``: the last prompt token (the paper's predictor of behaviour);
- ``prompt_mean``: mean over the prompt's non-padding tokens;
- ``response_mean``: mean over response tokens (the paper's response average);
- per-token projections of response tokens onto monitored directions.

Two modes. *Generation* (the default): the first forward after :meth:`begin` is the left-padded
prompt, each later one feeds one sampled token; a token counts as response while its row has
not yet fed an end-of-sequence token and it is within ``max_response_tokens``. A response
token's activation is the one computed when that token is fed, exactly what a separate forward
over prompt + response gives. *Forward*: one pass over full sequences with an explicit
``response_mask`` (screening, training data, references).

Every reduction and projection accumulates in float32 whatever the model's dtype (a bf16 or
fp16 sum over many tokens rounds or overflows), on the device of each block: masks and
directions are moved to the block's device, so a model split over devices (``device_map``)
works. Nothing syncs with the host until :meth:`result`. While attached, a capture holds the
model for its thread (one owner per model, :mod:`persona_lens.core.ownership`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from persona_lens.core.architecture import (
    BlockLayout,
    block_hidden,
    block_input_hidden,
    find_blocks,
    input_device,
)
from persona_lens.core.batching import batch_groups, batching_mode
from persona_lens.core.errors import InputError
from persona_lens.core.ownership import ModelClaim, claim_model, owning, release_model
from persona_lens.core.positions import read_forward_inputs
from persona_lens.core.vectors import check_layer


@dataclass(frozen=True)
class Monitor:
    """Project activations at ``layer`` onto ``direction`` (made unit length here)."""

    name: str
    direction: torch.Tensor
    layer: int

    def unit(self) -> torch.Tensor:
        d = self.direction.detach().float()
        return d / d.norm().clamp_min(1e-12)


@dataclass
class CaptureResult:
    """Reduced activations of one batch; tensors on CPU, float32, rows = batch rows.

    Activation tensors have shape [B, len(layers), d] with ``layers`` the captured layer
    positions (all of 0..L by default). ``token_projections[name][b]`` lists the projections
    of row b's response tokens, in order; ``prompt_projections[name]`` is [B].
    """

    layers: tuple[int, ...]
    prompt_last: torch.Tensor | None = None
    prompt_mean: torch.Tensor | None = None
    response_mean: torch.Tensor | None = None
    response_counts: torch.Tensor | None = None
    prompt_projections: dict[str, torch.Tensor] = field(default_factory=dict)
    token_projections: dict[str, list[list[float]]] = field(default_factory=dict)

    def response_projection(self, name: str) -> list[float]:
        """Mean projection over each row's response tokens (NaN for an empty response)."""
        return [sum(v) / len(v) if v else float("nan") for v in self.token_projections[name]]


class ActivationCapture:
    """Hooks that reduce block activations during generation or a forward pass."""

    def __init__(
        self,
        model: nn.Module,
        layout: BlockLayout | None = None,
        *,
        layers: Sequence[int] | None = None,
        monitors: Sequence[Monitor] = (),
        eos_token_ids: Sequence[int] = (),
        prompt_stats: bool = True,
        response_mean: bool = True,
    ) -> None:
        self.model = model
        self.layout = layout or find_blocks(model)
        num_layers = self.layout.num_layers
        all_layers = range(num_layers + 1)
        self.layers = tuple(all_layers if layers is None else layers)
        for layer in self.layers:
            check_layer(layer, num_layers, allow_zero=True)
        for monitor in monitors:
            check_layer(monitor.layer, num_layers, allow_zero=True)
            if monitor.direction.shape != (self.layout.hidden_size,):
                raise InputError(
                    f"monitor {monitor.name!r} has shape {tuple(monitor.direction.shape)}, "
                    f"the model's hidden size is {self.layout.hidden_size}"
                )
        self.monitors = tuple(monitors)
        self._monitors_at: dict[int, list[Monitor]] = {}
        for monitor in self.monitors:
            self._monitors_at.setdefault(monitor.layer, []).append(monitor)
        self._units: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._keep = set(self.layers)
        self.prompt_stats = prompt_stats
        self.want_response_mean = response_mean
        self._eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long)
        self._handles: list[RemovableHandle] = []
        self._claim: ModelClaim | None = None
        self.begin()

    # --- lifecycle ----------------------------------------------------------------------
    def begin(
        self,
        *,
        response_mask: torch.Tensor | None = None,
        max_response_tokens: int | None = None,
    ) -> None:
        """Start a new batch. With ``response_mask`` [B, T] the next forward is a full pass
        (forward mode); otherwise it is a prompt followed by generated tokens."""
        self._forward_mask = response_mask
        self._max_response_tokens = max_response_tokens
        self._step = 0
        self._finished: torch.Tensor | None = None
        self._weights: dict[str, Any] = {}
        self._weights_at: dict[torch.device, dict[str, Any]] = {}
        self._sums: dict[str, dict[int, torch.Tensor]] = {
            "prompt_last": {},
            "prompt_mean": {},
            "response_mean": {},
        }
        self._counts: torch.Tensor | None = None
        self._step_valid: list[torch.Tensor] = []
        self._step_proj: dict[str, list[torch.Tensor]] = {m.name: [] for m in self.monitors}
        self._forward_proj: dict[str, torch.Tensor] = {}
        self._prompt_proj: dict[str, torch.Tensor] = {}

    def attach(self) -> ActivationCapture:
        if self._claim is not None:
            return self
        self._claim = claim_model(self.model)
        self._handles.append(
            self.model.register_forward_pre_hook(self._on_model_forward, with_kwargs=True)
        )
        hooked = set(self.layers) | {m.layer for m in self.monitors}
        if 0 in hooked:
            self._handles.append(
                self.layout.blocks[0].register_forward_pre_hook(
                    self._on_embeddings, with_kwargs=True
                )
            )
        for layer in sorted(hooked - {0}):
            block = self.layout.blocks[layer - 1]
            self._handles.append(block.register_forward_hook(self._make_block_hook(layer)))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._claim is not None:
            self._claim = None
            release_model(self.model)

    def __enter__(self) -> ActivationCapture:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # --- hooks --------------------------------------------------------------------------
    def _on_model_forward(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if self._claim is not None:
            self._claim.check()
        inputs = read_forward_inputs(args, kwargs)
        step = self._step
        self._step += 1
        self._weights_at = {}
        if step == 0:
            self._weights = self._first_forward_weights(inputs)
            return
        if self._forward_mask is not None:
            raise InputError("capture in forward mode expects exactly one forward per begin()")
        if inputs.length != 1 or inputs.input_ids is None:
            raise InputError("capture during generation needs cached decoding (use_cache=True)")
        token = inputs.input_ids[:, -1]
        if self._eos.device != token.device:
            self._eos = self._eos.to(token.device)
        is_eos = torch.isin(token, self._eos)
        finished = self._finished if self._finished is not None else torch.zeros_like(is_eos)
        valid = ~finished & ~is_eos
        if self._max_response_tokens is not None and step > self._max_response_tokens:
            valid = torch.zeros_like(valid)
        self._finished = finished | is_eos
        self._step_valid.append(valid)
        self._weights = {"step": valid.unsqueeze(1).float(), "response": valid.unsqueeze(1)}

    def _first_forward_weights(self, inputs: Any) -> dict[str, Any]:
        """Masks for the first forward: prompt tokens, and response tokens in forward mode."""
        mask = inputs.attention_mask
        batch, length = (
            (inputs.input_ids.shape[0], inputs.length)
            if inputs.input_ids is not None
            else (None, inputs.length)
        )
        if mask is None and batch is not None:
            mask = torch.ones(batch, length, dtype=torch.bool, device=inputs.input_ids.device)
        response = self._forward_mask
        if response is not None:
            response = response.to(mask.device if mask is not None else "cpu").bool()
            if mask is not None:
                response = response & mask.bool()
        prompt = mask.bool() if mask is not None else None
        if prompt is not None and response is not None:
            prompt = prompt & ~response
        last = None
        if prompt is not None:
            positions = torch.arange(prompt.shape[1], device=prompt.device)
            last = torch.where(prompt, positions, -1).max(dim=1).values.clamp_min(0)
        return {"prompt": prompt, "last": last, "response": response, "step": None}

    def _on_embeddings(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        self._record(0, block_input_hidden(args, kwargs))

    def _make_block_hook(self, layer: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._record(layer, block_hidden(output))

        return hook

    def _record(self, layer: int, hidden: torch.Tensor) -> None:
        if self._claim is not None:
            self._claim.check()
        with torch.no_grad():
            weights = self._weights_on(hidden.device)
            if weights.get("step") is not None:
                self._record_step(layer, hidden, weights)
            else:
                self._record_full(layer, hidden, weights)

    def _weights_on(self, device: torch.device) -> dict[str, Any]:
        """This forward's masks on ``device`` (a block's device; moved once per forward)."""
        weights = self._weights_at.get(device)
        if weights is None:
            weights = {
                k: v.to(device) if isinstance(v, torch.Tensor) else v
                for k, v in self._weights.items()
            }
            self._weights_at[device] = weights
        return weights

    def _record_step(self, layer: int, hidden: torch.Tensor, weights: dict[str, Any]) -> None:
        """A decoding step: one new token per row, weighted 1 while the row is responding."""
        token = hidden[:, -1].float()
        if layer in self._keep and self.want_response_mean:
            contribution = token * weights["step"]
            sums = self._sums["response_mean"]
            if layer in sums:
                sums[layer].add_(contribution)
            else:
                sums[layer] = contribution
        for monitor in self._monitors_at.get(layer, ()):
            self._step_proj[monitor.name].append(token @ self._unit(monitor, token.device))

    def _record_full(self, layer: int, hidden: torch.Tensor, weights: dict[str, Any]) -> None:
        """The prompt forward (generation mode) or the one full forward (forward mode)."""
        prompt, last, response = weights["prompt"], weights["last"], weights["response"]
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        if layer in self._keep and self.prompt_stats and prompt is not None:
            total = _masked_sum(hidden, prompt)
            count = prompt.sum(dim=1, keepdim=True).clamp_min(1).float()
            self._sums["prompt_mean"][layer] = total / count
            self._sums["prompt_last"][layer] = hidden[rows, last].float()
        if layer in self._keep and self.want_response_mean and response is not None:
            self._sums["response_mean"][layer] = _masked_sum(hidden, response)
        monitors = self._monitors_at.get(layer, ())
        if monitors:
            wide = hidden.float()
            for monitor in monitors:
                projection = wide @ self._unit(monitor, hidden.device)
                if last is not None:
                    self._prompt_proj[monitor.name] = projection[rows, last]
                if self._forward_mask is not None:
                    self._forward_proj[monitor.name] = projection

    def _unit(self, monitor: Monitor, device: torch.device) -> torch.Tensor:
        """The monitor's float32 unit direction on ``device`` (cached)."""
        key = (monitor.name, device)
        unit = self._units.get(key)
        if unit is None:
            unit = self._units[key] = monitor.unit().to(device)
        return unit

    # --- results ------------------------------------------------------------------------
    def result(self) -> CaptureResult:
        """Collect the reductions of the current batch onto the CPU."""
        out = CaptureResult(layers=self.layers)
        sums = self._sums
        if sums["prompt_last"]:
            out.prompt_last = _stack(sums["prompt_last"], self.layers)
            out.prompt_mean = _stack(sums["prompt_mean"], self.layers)
        response_mask = self._response_mask()
        if response_mask is not None:
            counts = response_mask.sum(dim=1)
            out.response_counts = counts
            if sums["response_mean"]:
                total = _stack(sums["response_mean"], self.layers)
                out.response_mean = total / counts.clamp_min(1).view(-1, 1, 1).float()
        out.prompt_projections = {k: v.cpu() for k, v in self._prompt_proj.items()}
        if response_mask is not None:
            for monitor in self.monitors:
                values = self._projection_matrix(monitor.name)
                if values is None:
                    continue
                out.token_projections[monitor.name] = [
                    row[mask].tolist() for row, mask in zip(values, response_mask, strict=True)
                ]
        return out

    def _response_mask(self) -> torch.Tensor | None:
        """[B, T] bool of response tokens on CPU (generation steps or the forward mask)."""
        if self._forward_mask is not None:
            return self._forward_mask.bool().cpu() & self._weights["response"].bool().cpu()
        if self._step_valid:
            return torch.stack(self._step_valid, dim=1).cpu()
        return None

    def _projection_matrix(self, name: str) -> torch.Tensor | None:
        if self._forward_mask is not None:
            value = self._forward_proj.get(name)
            return value.cpu() if value is not None else None
        steps = self._step_proj.get(name)
        return torch.stack(steps, dim=1).cpu() if steps else None


def _masked_sum(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of ``hidden`` [B, T, d] over the positions where ``mask`` [B, T] is true, [B, d],
    accumulated in float32 (the product by a 0/1 mask is exact in any dtype)."""
    kept = hidden * mask.unsqueeze(-1).to(hidden.dtype)
    return kept.sum(dim=1, dtype=torch.float32)


def _stack(per_layer: dict[int, torch.Tensor], layers: tuple[int, ...]) -> torch.Tensor:
    return torch.stack([per_layer[layer].cpu() for layer in layers], dim=1)


def capture_forward(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    layout: BlockLayout | None = None,
    layers: Sequence[int] | None = None,
    monitors: Sequence[Monitor] = (),
) -> CaptureResult:
    """One forward pass over full sequences; reductions over ``response_mask`` [B, T]."""
    layout = layout or find_blocks(model)
    if layout.is_block_diffusion:  # the encoder reads given tokens: core/diffusion
        from persona_lens.core.diffusion.generation import capture_forward_diffusion

        return capture_forward_diffusion(
            model, input_ids, attention_mask, response_mask, layout=layout, layers=layers,
            monitors=monitors,
        )  # fmt: skip
    capture = ActivationCapture(model, layout, layers=layers, monitors=monitors)
    capture.begin(response_mask=response_mask)
    kwargs = padded_forward_kwargs(model, attention_mask)
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1  # only activations are wanted: skip the [B, T, vocab] logits
    with capture, torch.no_grad():
        model(input_ids=input_ids, **kwargs)
    return capture.result()


def padded_forward_kwargs(model: nn.Module, attention_mask: torch.Tensor) -> dict[str, Any]:
    """Forward arguments for a left-padded batch, positions counted as ``generate`` does
    (absolute position embeddings, e.g. GPT-2, depend on it)."""
    kwargs: dict[str, Any] = {"attention_mask": attention_mask, "use_cache": False}
    if "position_ids" in inspect.signature(model.forward).parameters:
        kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    return kwargs


def capture_sequences(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    layout: BlockLayout | None = None,
    layers: Sequence[int] | None = None,
    monitors: Sequence[Monitor] = (),
    batch_size: int = 16,
) -> list[CaptureResult]:
    """Capture prompt + response token sequences produced elsewhere (another generation
    engine, a dataset): length-sorted, left-padded batches through :func:`capture_forward`
    (padding-free batches of equal length for a family that padding corrupts, see
    :mod:`persona_lens.core.batching`).

    Returns one single-row :class:`CaptureResult` per sequence, in input order; the
    reductions equal those recorded while generating the same tokens.
    """
    if len(prompt_ids) != len(response_ids):
        raise InputError(f"{len(prompt_ids)} prompts for {len(response_ids)} responses")
    if batch_size < 1:
        raise InputError("batch_size must be at least 1")
    layout = layout or find_blocks(model)
    device = input_device(model)
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids, strict=True)]
    results: list[CaptureResult | None] = [None] * len(lengths)
    with owning(model):
        padded = batching_mode(model, pad_token_id) == "padded"
        for rows in batch_groups(lengths, "padded" if padded else "equal-length", batch_size):
            width = max(lengths[i] for i in rows)
            input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            response = torch.zeros((len(rows), width), dtype=torch.long)
            for j, i in enumerate(rows):
                tokens = [*prompt_ids[i], *response_ids[i]]
                input_ids[j, width - len(tokens) :] = torch.tensor(tokens, dtype=torch.long)
                attention[j, width - len(tokens) :] = 1
                if response_ids[i]:
                    response[j, width - len(response_ids[i]) :] = 1
            captured = capture_forward(
                model,
                input_ids.to(device),
                attention.to(device),
                response.to(device),
                layout=layout,
                layers=layers,
                monitors=monitors,
            )
            for j, i in enumerate(rows):
                results[i] = _row(captured, j)
    return [r for r in results if r is not None]


def _row(result: CaptureResult, row: int) -> CaptureResult:
    """Row ``row`` of a batch result as a batch of one."""

    def take(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[row : row + 1]

    return CaptureResult(
        layers=result.layers,
        prompt_last=take(result.prompt_last),
        prompt_mean=take(result.prompt_mean),
        response_mean=take(result.response_mean),
        response_counts=take(result.response_counts),
        prompt_projections={k: v[row : row + 1] for k, v in result.prompt_projections.items()},
        token_projections={k: [v[row]] for k, v in result.token_projections.items()},
    )
