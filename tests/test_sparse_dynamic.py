"""Dynamic sparse attention (DeepSeek-V3.2 DSA, GLM-MoE-DSA): transformers' own decoding, with
no persona-lens hook on the model.

The lightning indexer keeps ``index_topk`` keys per query, scored by a weighted sum of ReLUs;
keys tie when every indexer head scores them negative (all exactly 0), and ``torch.topk``
breaks ties one way for a one-token decoding step and another for a full forward. So cached
decoding can attend to other keys than recomputation does. These tests show both sides: the
tie-free zoo configuration decodes exactly (so the family matrix tests our hooks, not this
quirk), and a 2-head indexer, where ties are common, does not, because of a tie.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from persona_lens.core.architecture import find_blocks
from persona_lens.core.capture import padded_forward_kwargs
from tests import zoo

NEW_TOKENS = 8
DSA = ["deepseek_v32", "glm_moe_dsa"]


def _decode_and_recompute(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy cached decoding's step logits, the full forward's logits at the same positions,
    and the generated sequences."""
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=zoo.PAD_ID,
            eos_token_id=None,
            output_logits=True,
            return_dict_in_generate=True,
        )
        full_mask = torch.cat([mask, torch.ones(len(ids), NEW_TOKENS, dtype=mask.dtype)], dim=1)
        recomputed = model(
            input_ids=out.sequences[:, :-1], **padded_forward_kwargs(model, full_mask[:, :-1])
        ).logits[:, ids.shape[1] - 1 :]
    return torch.stack(out.logits, dim=1), recomputed, out.sequences


@pytest.mark.parametrize("name", DSA)
def test_zoo_indexer_decodes_exactly_on_the_matrix_inputs(name: str) -> None:
    """The family matrix's inputs (20-token prompts, one left-padded, 8 new tokens: the
    indexer prunes 12 or more keys per query by the end) have no tie at the top-k boundary."""
    model = zoo.build(name)
    assert "D" in find_blocks(model).describe()["layout"].upper()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, zoo.VOCAB_SIZE, (2, zoo.DSA_PROMPT_LENGTH), generator=generator)
    mask = torch.ones_like(ids)
    ids[0, 0], mask[0, 0] = zoo.PAD_ID, 0
    assert ids.shape[1] + NEW_TOKENS > model.config.index_topk
    cached, recomputed, _ = _decode_and_recompute(model, ids, mask)
    torch.testing.assert_close(cached, recomputed, rtol=1e-4, atol=1e-4)


def _two_head_deepseek() -> nn.Module:
    overrides: dict[str, Any] = {**zoo._TOKENS, **zoo._DSA, "index_n_heads": 2}
    build = zoo._builder("DeepseekV32ForCausalLM", "DeepseekV32Config", **overrides)
    return build()


class _TopkScores:
    """Records the scores the indexer ranks (each ``Tensor.topk`` call inside an indexer)."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: list[torch.Tensor] = []
        self.indexers = [m for m in model.modules() if hasattr(m, "index_topk")]
        self._inside = False
        self._topk = torch.Tensor.topk

    def pre(self, module: nn.Module, args: Any) -> None:
        self._inside = True

    def post(self, module: nn.Module, args: Any, output: Any) -> None:
        self._inside = False

    def topk(self, tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self._inside:
            self.calls.append(tensor.detach().clone())
        return self._topk(tensor, *args, **kwargs)


def test_indexer_ties_make_cached_decoding_differ(monkeypatch: pytest.MonkeyPatch) -> None:
    """With 2 indexer heads, transformers' cached decoding differs from recomputation, and
    at the first query where the selections differ, every key picked by only one of them has
    the same score as the top-k boundary: a tie that the two shapes break differently."""
    model = _two_head_deepseek()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, zoo.VOCAB_SIZE, (1, 7), generator=generator)
    mask = torch.ones_like(ids)
    cached, recomputed, sequences = _decode_and_recompute(model, ids, mask)
    difference = (cached - recomputed).abs().amax(dim=(0, 2))
    assert difference.max() > 1e-2, "no divergence: the quirk this test shows is gone"

    # which keys each indexer keeps, decoding step by step and in one full forward
    selected: dict[str, list[list[torch.Tensor]]] = {"cached": [], "full": []}
    recorder = _TopkScores(model)
    # a plain function, so that it binds to the tensor like the method it replaces
    monkeypatch.setattr(torch.Tensor, "topk", lambda t, *a, **k: recorder.topk(t, *a, **k))
    handles = []
    for layer, indexer in enumerate(recorder.indexers):
        handles.append(indexer.register_forward_pre_hook(recorder.pre))
        handles.append(indexer.register_forward_hook(recorder.post))
        for side in selected.values():
            side.append([])

        def keep(module: nn.Module, args: Any, output: Any, layer: int = layer) -> None:
            selected[mode][layer].append(output.detach())

        handles.append(indexer.register_forward_hook(keep))
    try:
        with torch.no_grad():
            mode = "cached"
            model.generate(
                input_ids=ids,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=zoo.PAD_ID,
                eos_token_id=None,
            )
            mode, recorder.calls = "full", []
            model(input_ids=sequences[:, :-1], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    full_scores = recorder.calls  # one [1, S, T] score tensor per indexer layer
    first = None
    for layer in range(len(recorder.indexers)):
        for step, picked in enumerate(selected["cached"][layer][1:]):
            query = ids.shape[1] + step
            a = set(picked[0, -1].tolist())
            b = set(selected["full"][layer][0][0, query].tolist())
            if a != b and first is None:
                first = (layer, query, a, b)
    assert first is not None, "the logits differ but no selection does"
    layer, query, a, b = first
    scores = full_scores[layer][0, query, : query + 1]
    boundary = scores.topk(model.config.index_topk).values[-1]
    for key in a ^ b:
        assert scores[key] == boundary, (key, float(scores[key]), float(boundary))
