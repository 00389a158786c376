"""One owner per model: a model is used by one thread at a time.

Hooks live on a model's modules, so two threads using one model at once would see each
other's steering and capture. Every persona-lens entry point that hooks or runs a model
(``steer``, ``ActivationCapture``, ``capture_forward``, ``generate``, guards) *claims* the
model for the calling thread while it runs:

- claims are re-entrant and cost a dictionary lookup: one thread nests and repeats them
  freely, and a single owner's calls are never serialised or slowed;
- a claim from another thread while the model is held raises :class:`ModelBusyError` at once
  (it never waits, and never runs beside the other thread's hooks);
- while the model is held, a pre-hook on it refuses forwards from other threads too, so a bare
  ``model.generate`` in a second thread fails instead of coming back steered; and the hooks
  persona-lens puts on blocks check the thread as well (:meth:`ModelClaim.check`), which
  catches a foreign forward that was already running when they were attached.

A model passes between threads freely when nobody holds it. A server owns a model with one
worker thread that batches requests (per-row coefficients) rather than running them side by
side. Forwards re-run by autograd during a backward pass (gradient checkpointing runs them on
autograd's threads) are not refused.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from persona_lens.core.errors import ModelBusyError


@dataclass(eq=False)
class ModelClaim:
    """A model's current owner: the thread holding it and how many claims it nests."""

    model_name: str
    thread: int
    thread_name: str
    depth: int = 0
    handle: RemovableHandle | None = field(default=None, repr=False)

    def check(self) -> None:
        """Raise :class:`ModelBusyError` unless the calling thread owns the model."""
        if self.thread != threading.get_ident() and not _in_backward():
            raise _busy(self)


_CLAIMS: weakref.WeakKeyDictionary[nn.Module, ModelClaim] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _in_backward() -> bool:
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def _busy(claim: ModelClaim) -> ModelBusyError:
    return ModelBusyError(
        f"{claim.model_name} is in use by thread {claim.thread_name!r}; a model has one owner "
        "at a time: make every call on it from one thread (a server batches requests in one "
        "worker loop, with per-row coefficients)"
    )


def claim_model(model: nn.Module) -> ModelClaim:
    """Claim ``model`` for the calling thread (re-entrant); release with :func:`release_model`.

    Raises :class:`ModelBusyError` when another thread holds it.
    """
    me = threading.get_ident()
    with _LOCK:
        claim = _CLAIMS.get(model)
        if claim is not None and claim.depth > 0 and claim.thread != me:
            raise _busy(claim)
        if claim is None or claim.depth == 0:
            if claim is not None and claim.handle is not None:
                claim.handle.remove()
            claim = ModelClaim(type(model).__name__, me, threading.current_thread().name)
            claim.handle = model.register_forward_pre_hook(_refuse_other_threads, prepend=True)
            _CLAIMS[model] = claim
        claim.depth += 1
        return claim


def release_model(model: nn.Module) -> None:
    """Undo one :func:`claim_model`; the last release frees the model for any thread."""
    with _LOCK:
        claim = _CLAIMS.get(model)
        if claim is None or claim.depth == 0:
            return
        claim.depth -= 1
        if claim.depth == 0:
            if claim.handle is not None:
                claim.handle.remove()
                claim.handle = None
            del _CLAIMS[model]


@contextmanager
def owning(model: nn.Module) -> Iterator[ModelClaim]:
    """``with owning(model): ...`` holds ``model`` for this thread for the block's duration."""
    claim = claim_model(model)
    try:
        yield claim
    finally:
        release_model(model)


def model_owner(model: nn.Module) -> str | None:
    """Name of the thread holding ``model``, or ``None`` when it is free."""
    claim = _CLAIMS.get(model)
    return claim.thread_name if claim is not None and claim.depth > 0 else None


def _refuse_other_threads(module: nn.Module, args: Any) -> None:
    claim = _CLAIMS.get(module)
    if claim is not None and claim.depth > 0:
        claim.check()
