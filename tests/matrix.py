"""Checks shared by the family matrices (test_families.py, test_families_diffusion.py)."""

from __future__ import annotations

from typing import Any

import torch

from persona_lens.core.capture import CaptureResult, Monitor, capture_forward


def assert_generation_capture_equals_forward(
    model: Any,
    layout: Any,
    monitor: Monitor,
    during: CaptureResult,
    sequences: torch.Tensor,
    mask: torch.Tensor,
    prompt_len: int,
    new_tokens: int,
    name: str,
) -> None:
    """What capture reduced while generating equals one forward over prompt + response."""
    full = sequences[:, : prompt_len + new_tokens]
    full_mask = torch.cat([mask, mask.new_ones(len(full), new_tokens)], dim=1)
    response = torch.zeros_like(full, dtype=torch.bool)
    response[:, prompt_len:] = True
    after = capture_forward(model, full, full_mask, response, layout=layout, monitors=[monitor])
    assert during.response_counts is not None
    assert during.response_counts.tolist() == [new_tokens] * len(sequences)
    for key in ("response_mean", "prompt_mean", "prompt_last"):
        torch.testing.assert_close(
            getattr(during, key), getattr(after, key), rtol=1e-4, atol=1e-4, msg=f"{name} {key}"
        )
    torch.testing.assert_close(
        torch.tensor(during.token_projections["m"]),
        torch.tensor(after.token_projections["m"]),
        rtol=1e-4,
        atol=1e-4,
    )
