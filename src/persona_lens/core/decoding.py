"""Checks that ride along every HF ``generate`` call: Ctrl-C and non-finite logits.

- **Ctrl-C.** Inside :func:`stop_on_interrupt` (main thread only, and only where Python's
  default SIGINT handler is in place), the first Ctrl-C sets a flag instead of raising
  wherever Python happens to be. :class:`DecodingChecks` ends ``generate`` at the next
  decoding step, and :meth:`DecodingChecks.raise_if_failed` raises ``KeyboardInterrupt``
  with every hook already removed by its context manager. A second Ctrl-C raises at once.
- **Broken activations.** Steering with a huge coefficient drives activations so high that
  the final norm's sum of squares overflows (or to inf/NaN): the model then emits garbage or
  nothing. The last block's output and the logits are checked on the device every forward
  (no host sync of our own), generation stops at the next step, and :class:`NonFiniteError`
  names the steering.
"""

from __future__ import annotations

import functools
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from persona_lens.core.architecture import BlockLayout, block_hidden
from persona_lens.core.errors import NonFiniteError

_interrupted = threading.Event()
F = TypeVar("F", bound=Callable[..., Any])


def _on_sigint(signum: int, frame: Any) -> None:
    if _interrupted.is_set():
        raise KeyboardInterrupt
    _interrupted.set()


@contextmanager
def stop_on_interrupt() -> Iterator[None]:
    """Within this block, Ctrl-C stops generation at the next decoding step (see module)."""
    installable = (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    )
    if not installable:  # another thread, a nested call, or an application's own handler
        yield
        return
    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
        raise_if_interrupted()
    finally:
        signal.signal(signal.SIGINT, previous)
        _interrupted.clear()


def interruptible(function: F) -> F:
    """Run ``function`` inside :func:`stop_on_interrupt`."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with stop_on_interrupt():
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def raise_if_interrupted() -> None:
    """``KeyboardInterrupt`` if Ctrl-C was pressed inside :func:`stop_on_interrupt`."""
    if _interrupted.is_set():
        _interrupted.clear()
        raise KeyboardInterrupt


class _Broken:
    """A flag on the device: did any checked tensor hold NaN/inf (or overflow when squared)?"""

    def __init__(self) -> None:
        self.flag: torch.Tensor | None = None

    def record(self, bad: torch.Tensor) -> None:
        self.flag = bad if self.flag is None else self.flag | bad.to(self.flag.device)

    def __bool__(self) -> bool:
        return self.flag is not None and bool(self.flag)


class _FiniteLogits(LogitsProcessor):
    """Records NaN/+inf logits and makes them harmless, so a sampling step does not crash
    before the error is raised (-inf is how other processors mask tokens: it is fine)."""

    def __init__(self, broken: _Broken) -> None:
        self.broken = broken

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> Any:
        bad = torch.isnan(scores) | torch.isposinf(scores)
        self.broken.record(bad.any())
        return torch.where(bad, torch.zeros_like(scores), scores)


class _StopEarly(StoppingCriteria):
    def __init__(self, broken: _Broken) -> None:
        self.broken = broken

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> Any:
        rows = input_ids.shape[0]
        if _interrupted.is_set():
            return torch.ones(rows, dtype=torch.bool, device=input_ids.device)
        if self.broken.flag is None:
            return torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
        return self.broken.flag.to(input_ids.device).expand(rows)


class DecodingChecks:
    """The checks for one ``generate`` call: :meth:`attach` (a hook on the last block), pass
    :meth:`kwargs` to ``generate``, call :meth:`raise_if_failed`, and :meth:`remove`."""

    def __init__(self, layout: BlockLayout) -> None:
        self.layout = layout
        self._broken = _Broken()
        self._finite = _FiniteLogits(self._broken)
        self._stop = _StopEarly(self._broken)
        self._hook: RemovableHandle | None = None

    def attach(self) -> DecodingChecks:
        if self._hook is None:
            self._hook = self.layout.blocks[-1].register_forward_hook(self._check_block)
        return self

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _check_block(self, module: nn.Module, args: Any, output: Any) -> None:
        last = block_hidden(output).detach()[:, -1]  # the position the next token comes from
        squares = last.float().pow(2).sum(dim=-1)  # what the final norm computes
        self._broken.record(~torch.isfinite(squares).all())

    def kwargs(self) -> dict[str, Any]:
        return {
            "logits_processor": LogitsProcessorList([self._finite]),
            "stopping_criteria": StoppingCriteriaList([self._stop]),
        }

    def raise_if_failed(self, steering: Sequence[Any] = ()) -> None:
        """KeyboardInterrupt after Ctrl-C; NonFiniteError naming the ``steering`` specs when
        a logit was NaN or infinite."""
        raise_if_interrupted()
        if self._broken:
            if steering:
                raise NonFiniteError(
                    "the model's activations overflowed to NaN or infinity under steering ("
                    + "; ".join(describe_steering(s) for s in steering)
                    + "): use a smaller coefficient"
                )
            raise NonFiniteError(
                "the model's activations overflowed to NaN or infinity without steering; try "
                "another dtype (float32) or check the model's weights"
            )


def describe_steering(spec: Any) -> str:
    """``coefficient 2 on 'evil' at layer 12`` for a SteeringSpec."""
    coef = spec.coefficient
    if isinstance(coef, (int, float)):
        amount = f"coefficient {float(coef):g}"
    else:
        values = [f"{float(c):g}" for c in coef]
        amount = "coefficients " + ",".join(values[:8]) + (",..." if len(values) > 8 else "")
    layers = spec.layers
    if layers is None:
        where = f"layer {spec.vector.best_layer} (best_layer)"
    elif isinstance(layers, (int, str)):
        where = "all layers" if layers == "all" else f"layer {layers}"
    else:
        where = "layers " + ",".join(str(layer) for layer in layers)
    return f"{amount} on {spec.vector.trait!r} at {where}"
