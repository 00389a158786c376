"""Which hooks a model carries, so tests can check that every hook they added is gone."""

from __future__ import annotations

from torch import nn


def hook_ids(model: nn.Module) -> set[int]:
    """Ids of every forward (pre-)hook on the model (transformers may add its own)."""
    return {
        id(hook)
        for m in model.modules()
        for hook in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
    }
