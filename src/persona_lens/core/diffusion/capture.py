"""Capture on a block-diffusion model: committed tokens and every denoising step, one pass.

What is read where (see ARCHITECTURE.md, "Block diffusion"):

- **prompt** statistics (``prompt_last``, ``prompt_mean``, prompt projections) come from the
  encoder's forward over the prompt: the decoder never sees the prompt's tokens;
- **response** statistics (``response_mean``, per-token projections) come from the *read
  stream*. On the encoder (the default) they are the committed tokens as the encoder caches
  them, exactly what one encoder forward over prompt + response gives. ``generate`` encodes
  every committed canvas but the last, so :func:`~.generation.generate_diffusion` runs one
  encoder forward over the last canvas (``canvas_length`` tokens against the cache) after
  ``generate`` returns; that is the only extra work. On the decoder they are the hidden
  states of each canvas's last denoising step, at the positions that become response tokens
  (a row that stopped denoising before the rest of the batch shows its frozen state);
- **denoising projections**: at each denoising step, each monitor's projection on the decoder,
  averaged over the canvas positions that end up as response tokens. Steps where a row's
  inputs repeat the previous step's (the row stopped denoising while others went on) are
  left out, so each row's series ends when its canvas settled.

A token counts as response until its row commits an end-of-sequence token, and within
``max_response_tokens``. Sums are float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from persona_lens.core.architecture import BlockLayout, block_hidden, block_input_hidden
from persona_lens.core.capture import CaptureResult, Monitor
from persona_lens.core.diffusion.phases import DecoderStep, PhaseTracker
from persona_lens.core.errors import InputError
from persona_lens.core.vectors import check_layer


@dataclass
class DiffusionCaptureResult(CaptureResult):
    """A :class:`CaptureResult` with the stream its response statistics come from and, per
    monitor and row, one series per committed canvas of the projection at each denoising step
    (``denoising_projections[name][row][canvas][step]``)."""

    stream: str = "encoder"
    denoising_projections: dict[str, list[list[list[float]]]] = field(default_factory=dict)


@dataclass
class _StepRecord:
    canvas: int
    active: torch.Tensor  # [B] bool: the row's inputs changed since the previous step
    projections: dict[str, torch.Tensor]  # monitor -> [B, C] float32


class DiffusionCapture:
    """Hooks that reduce a block-diffusion model's activations while it generates.

    ``stream`` (default: the layout's read stream) is where response statistics are read.
    Call :meth:`begin` with the batch's prompt mask before ``generate``, then
    :meth:`commit` with the last canvas (or run the encoder over it), then :meth:`result`.
    """

    def __init__(
        self,
        model: nn.Module,
        layout: BlockLayout,
        *,
        layers: Sequence[int] | None = None,
        monitors: Sequence[Monitor] = (),
        eos_token_ids: Sequence[int] = (),
        prompt_stats: bool = True,
        response_mean: bool = True,
        stream: str | None = None,
        denoising: bool = True,
    ) -> None:
        self.model = model
        self.layout = layout
        self.stream = layout.stream(stream).name
        num_layers = layout.num_layers
        self.layers = tuple(range(num_layers + 1) if layers is None else layers)
        for layer in self.layers:
            check_layer(layer, num_layers, allow_zero=True)
        for monitor in monitors:
            check_layer(monitor.layer, num_layers, allow_zero=True)
            if monitor.direction.shape != (layout.hidden_size,):
                raise InputError(
                    f"monitor {monitor.name!r} has shape {tuple(monitor.direction.shape)}, "
                    f"the model's hidden size is {layout.hidden_size}"
                )
        self.monitors = tuple(monitors)
        self.prompt_stats = prompt_stats
        self.want_response_mean = response_mean
        self.denoising = denoising
        self._eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long)
        self._units: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}
        self.phases = PhaseTracker(layout, on_encoder=self._on_encoder, on_decoder=self._on_decoder)
        self._handles: list[RemovableHandle] = []
        self.begin()

    # --- lifecycle ----------------------------------------------------------------------
    def begin(
        self, prompt_mask: torch.Tensor | None = None, max_response_tokens: int | None = None
    ) -> None:
        """Start a batch whose prompt rows are masked by ``prompt_mask`` [B, T]."""
        self._prompt_mask = prompt_mask
        self._max_response_tokens = max_response_tokens
        self._prompt: dict[str, dict[int, torch.Tensor]] = {"last": {}, "mean": {}}
        self._prompt_proj: dict[str, torch.Tensor] = {}
        self._sums: dict[int, torch.Tensor] = {}
        self._emitted: torch.Tensor | None = None  # [B] response tokens committed so far
        self._finished: torch.Tensor | None = None  # [B] the row committed an end token
        self._valid: torch.Tensor | None = None  # [B, C] response mask of the canvas in hand
        self._token_proj: dict[str, list[torch.Tensor]] = {m.name: [] for m in self.monitors}
        self._token_masks: list[torch.Tensor] = []
        self._last_hidden: dict[int, torch.Tensor] = {}  # decoder read: last step per layer
        self._last_proj: dict[str, torch.Tensor] = {}
        self._committed = 0  # canvases committed so far (= index of the one being denoised)
        self._steps: list[_StepRecord] = []
        self._step_active: torch.Tensor | None = None
        self._previous: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._series: dict[str, list[list[list[float]]]] = {}

    @property
    def reads_encoder(self) -> bool:
        return self.stream == "encoder"

    @property
    def needs_last_canvas_encoded(self) -> bool:
        """Whether the encoder must see the last canvas (generate never encodes it)."""
        return self.reads_encoder and (self.want_response_mean or bool(self.monitors))

    def attach(self) -> DiffusionCapture:
        if self._handles:
            return self
        self.phases.attach()
        encoder, decoder = self.layout.stream("encoder"), self.layout.stream("decoder")
        monitored = {m.layer for m in self.monitors}
        wanted = {"encoder": set(self.layers) | monitored, "decoder": set()}
        if self.denoising:
            wanted["decoder"] |= monitored
        if not self.reads_encoder:
            wanted["decoder"] |= set(self.layers) | monitored
        for stream in (encoder, decoder):
            for layer in sorted(wanted[stream.name]):
                hook = self._make_hook(stream.name, layer)
                if layer == 0:
                    handle = stream.blocks[0].register_forward_pre_hook(
                        lambda m, args, kwargs, hook=hook: hook(block_input_hidden(args, kwargs)),
                        with_kwargs=True,
                    )
                else:
                    handle = stream.blocks[layer - 1].register_forward_hook(
                        lambda m, args, output, hook=hook: hook(block_hidden(output))
                    )
                self._handles.append(handle)
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.phases.detach()

    def __enter__(self) -> DiffusionCapture:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # --- phases -------------------------------------------------------------------------
    def _on_encoder(self, phase: str, ids: torch.Tensor) -> None:
        if phase == "committed":
            self.commit(ids)

    def _on_decoder(self, step: DecoderStep) -> None:
        """A denoising step: which rows got new inputs (the others stopped denoising)."""
        ids = step.canvas_ids
        logits = step.self_conditioning
        fingerprint = logits.float().sum(dim=-1) if logits is not None else None
        active = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
        previous = self._previous
        if self.phases.step > 0 and previous is not None and previous[0].shape == ids.shape:
            same = (previous[0] == ids).all(dim=1)
            if fingerprint is not None and previous[1] is not None:
                same &= (previous[1] == fingerprint).all(dim=1)
            active = ~same
        self._previous = (ids, fingerprint)
        self._step_active = active
        if self.denoising and self.monitors:
            self._steps.append(_StepRecord(self._committed, active, {}))

    def commit(self, canvas_ids: torch.Tensor) -> None:
        """A canvas was committed (``canvas_ids`` [B, C]): fix which of its tokens are
        response tokens and fold in what the decoder recorded for it."""
        batch, width = canvas_ids.shape
        device = canvas_ids.device
        if self._eos.device != device:
            self._eos = self._eos.to(device)
        if self._emitted is None or self._finished is None:
            self._emitted = torch.zeros(batch, dtype=torch.long, device=device)
            self._finished = torch.zeros(batch, dtype=torch.bool, device=device)
        is_eos = torch.isin(canvas_ids, self._eos)
        valid = (is_eos.long().cumsum(dim=1) == 0) & ~self._finished.unsqueeze(1)
        if self._max_response_tokens is not None:
            index = self._emitted.unsqueeze(1) + torch.arange(width, device=device)
            valid &= index < self._max_response_tokens
        self._finished = self._finished | is_eos.any(dim=1)
        self._emitted = self._emitted + valid.sum(dim=1)
        self._valid = valid
        self._token_masks.append(valid)
        if not self.reads_encoder:
            self._fold_decoder(valid)
        self._reduce_steps(self._committed)
        self._committed += 1

    def _fold_decoder(self, valid: torch.Tensor) -> None:
        """Reading the decoder: the last denoising step's states at the response positions."""
        weights = valid.float()
        for layer, hidden in self._last_hidden.items():
            self._accumulate(layer, hidden, weights)
        for monitor in self.monitors:
            if monitor.name in self._last_proj:
                self._token_proj[monitor.name].append(self._last_proj[monitor.name])
        self._last_hidden, self._last_proj = {}, {}

    def _reduce_steps(self, canvas: int) -> None:
        """Per-step mean projections over the committed canvas's response positions."""
        valid = self._valid
        assert valid is not None
        records = [r for r in self._steps if r.canvas == canvas]
        self._steps = [r for r in self._steps if r.canvas != canvas]
        if not records:
            return
        counts = valid.sum(dim=1)
        weights = valid.float() / counts.clamp_min(1).unsqueeze(1).float()
        for monitor in self.monitors:
            per_step = [
                (r.active, (r.projections[monitor.name] * weights).sum(dim=1))
                for r in records
                if monitor.name in r.projections
            ]
            if not per_step:
                continue
            active = torch.stack([a for a, _ in per_step], dim=1).cpu()
            values = torch.stack([v for _, v in per_step], dim=1).cpu()
            series = self._series.setdefault(monitor.name, [[] for _ in range(valid.shape[0])])
            for row, has_tokens in enumerate((counts > 0).tolist()):
                if has_tokens:
                    series[row].append(values[row][active[row]].tolist())

    # --- hooks --------------------------------------------------------------------------
    def _make_hook(self, stream: str, layer: int) -> Any:
        def hook(hidden: torch.Tensor) -> None:
            with torch.no_grad():
                phase = self.phases.phase
                if stream == "encoder" and phase == "prompt":
                    self._record_prompt(layer, hidden)
                elif stream == "encoder" and phase == "committed" and self.reads_encoder:
                    self._record_committed(layer, hidden)
                elif stream == "decoder" and phase == "canvas":
                    self._record_step(layer, hidden)

        return hook

    def _record_prompt(self, layer: int, hidden: torch.Tensor) -> None:
        mask = self._prompt_mask
        if mask is None or mask.shape != hidden.shape[:2]:
            mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        mask = mask.to(hidden.device).bool()
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = torch.where(mask, positions, -1).max(dim=1).values.clamp_min(0)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        if layer in self.layers and self.prompt_stats:
            w = mask.float()
            w = w / w.sum(dim=1, keepdim=True).clamp_min(1)
            self._prompt["mean"][layer] = torch.einsum("bt,btd->bd", w, hidden.float())
            self._prompt["last"][layer] = hidden[rows, last].float()
        for monitor in self.monitors:
            if monitor.layer == layer:
                projection = self._project(monitor, hidden)
                self._prompt_proj[monitor.name] = projection[rows, last]

    def _record_committed(self, layer: int, hidden: torch.Tensor) -> None:
        valid = self._valid
        if valid is None or valid.shape != hidden.shape[:2]:
            raise InputError("a committed canvas reached the encoder before commit() saw it")
        self._accumulate(layer, hidden, valid.to(hidden.device).float())
        for monitor in self.monitors:
            if monitor.layer == layer:
                self._token_proj[monitor.name].append(self._project(monitor, hidden))

    def _record_step(self, layer: int, hidden: torch.Tensor) -> None:
        monitors = [m for m in self.monitors if m.layer == layer]
        if self.denoising and self._steps:
            for monitor in monitors:
                self._steps[-1].projections[monitor.name] = self._project(monitor, hidden)
        if not self.reads_encoder:
            if layer in self.layers and self.want_response_mean:
                self._last_hidden[layer] = hidden.float()
            for monitor in monitors:
                self._last_proj[monitor.name] = self._project(monitor, hidden)

    def _accumulate(self, layer: int, hidden: torch.Tensor, weights: torch.Tensor) -> None:
        if layer not in self.layers or not self.want_response_mean:
            return
        contribution = torch.einsum("bt,btd->bd", weights, hidden.float())
        if layer in self._sums:
            self._sums[layer] = self._sums[layer] + contribution
        else:
            self._sums[layer] = contribution

    def _project(self, monitor: Monitor, hidden: torch.Tensor) -> torch.Tensor:
        key = (monitor.name, hidden.device, hidden.dtype)
        unit = self._units.get(key)
        if unit is None:
            unit = self._units[key] = monitor.unit().to(hidden.device, torch.float32)
        return hidden.float() @ unit

    # --- results ------------------------------------------------------------------------
    def result(self) -> DiffusionCaptureResult:
        """The batch's reductions on the CPU, float32."""
        out = DiffusionCaptureResult(layers=self.layers, stream=self.stream)
        if self._prompt["last"]:
            out.prompt_last = _stack(self._prompt["last"], self.layers)
            out.prompt_mean = _stack(self._prompt["mean"], self.layers)
        out.prompt_projections = {k: v.cpu() for k, v in self._prompt_proj.items()}
        if self._emitted is not None:
            counts = self._emitted.cpu()
            out.response_counts = counts
            if self._sums:
                total = _stack(self._sums, self.layers)
                out.response_mean = total / counts.clamp_min(1).view(-1, 1, 1).float()
        if self._token_masks:
            masks = torch.cat(self._token_masks, dim=1).cpu()
            for monitor in self.monitors:
                pieces = self._token_proj[monitor.name]
                if len(pieces) != len(self._token_masks):
                    continue
                values = torch.cat(pieces, dim=1).cpu()
                out.token_projections[monitor.name] = [
                    row[mask].tolist() for row, mask in zip(values, masks, strict=True)
                ]
        out.denoising_projections = self._series
        return out


def _stack(per_layer: dict[int, torch.Tensor], layers: tuple[int, ...]) -> torch.Tensor:
    return torch.stack([per_layer[layer].cpu() for layer in layers], dim=1)
