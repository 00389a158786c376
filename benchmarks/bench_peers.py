"""persona-lens side by side with its peers: repeng and steering-vectors (PyPI packages).

1. Steered generation throughput: the same vector at the same layer(s), added by
   persona-lens ``steer()``, repeng ``ControlModel`` and steering-vectors
   ``SteeringVector.apply``, around the same plain ``model.generate`` (greedy, EOS masked so
   every run generates the same number of tokens), as ratios to unsteered generation; plus the
   host cost per decoding step of each library's hooks on a stub with identity blocks.
2. Vector extraction from the same contrastive pairs (chat texts under trait-eliciting vs
   trait-suppressing system prompts, with the model's own greedy responses): persona-lens mean
   difference of response-averaged activations (``capture_forward``) vs repeng
   ``ControlVector.train`` (PCA of last-token differences) vs steering-vectors
   ``train_steering_vector`` (mean of last-token differences): wall time, and per-layer cosine
   similarity of the resulting vectors.
3. Activation capture for screening: ``capture_forward`` (all layers: response mean, prompt
   mean, prompt last) vs a plain forward with ``output_hidden_states=True`` reduced the same
   way, vs a bare forward. ``capture_forward`` asks for the logits of the last position only
   (``logits_to_keep=1``), so every way runs twice, with all logits ([B, T, vocab]) and with
   ``logits_to_keep=1``, and is compared with the bare forward that computes the same logits:
   the LM head is not what is being measured.

In part 2 the peers compute all logits (they call the model plainly), so persona-lens also
runs with all logits there (its capture hooks on a plain forward) next to ``capture_forward``.

Layer convention: persona-lens position l = output of block l (1-based) = repeng / steering-
vectors layer index l-1. repeng reads ``output_hidden_states``, whose last entry is after the
final norm, so its top layer differs by construction.

repeng 0.4.0 uses ``np.float_``, which numpy 2 removed: this script aliases it before the
import (nothing else is changed). steering-vectors declares transformers<5 but works with 5.x
for these calls.

Example::

    python benchmarks/bench_peers.py                  # embedded, CPU fp32, updates RESULTS.md
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import sys
from collections.abc import Callable, Iterator
from importlib.metadata import version
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # repeng and steering-vectors draw progress bars

import numpy as np
import torch
from _common import (
    PROMPTS,
    FixedLengthGenerate,
    Sample,
    Subject,
    bench_parser,
    bench_subject,
    command_line,
    fmt,
    hf_generate,
    interleaved,
    machine_lines,
    md_table,
    median,
    paired_ratio,
    pct,
    sync,
    timed,
    write_section,
)
from torch import nn

from persona_lens.core.architecture import BlockLayout, find_blocks
from persona_lens.core.capture import (
    ActivationCapture,
    CaptureResult,
    capture_forward,
    padded_forward_kwargs,
)
from persona_lens.core.generation import generate
from persona_lens.core.steering import SteeringSpec, steer, steering_vector
from persona_lens.traits.definitions import load_trait

if not hasattr(np, "float_"):
    np.float_ = np.float64  # type: ignore[attr-defined]  # repeng 0.4.0 on numpy 2

from repeng import ControlModel, ControlVector, DatasetEntry
from steering_vectors import SteeringVector, train_steering_vector


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = bench_parser(__doc__)
    p.add_argument("--trait", default="evil", help="built-in trait giving the contrastive pairs")
    p.add_argument("--pairs", type=int, default=10, help="contrastive pairs")
    p.add_argument("--response-tokens", type=int, default=24, help="response length in pairs")
    p.add_argument("--prompts", type=int, default=16, help="prompts for steered generation")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--coefficient", type=float, default=4.0)
    p.add_argument("--parts", default="1,2,3", help="comma list of 1 (steer), 2 (extract), 3")
    return p.parse_args(argv)


LAST_LOGITS = 1  # what capture_forward asks for: the logits of the last position only


# --- contrastive pairs --------------------------------------------------------------------
Pair = tuple[str, str]  # (positive text, negative text), each prompt + response
Texts = list[tuple[str, str]]  # (prompt text, response) per sequence


def contrastive_texts(s: Subject, args: argparse.Namespace) -> tuple[Texts, Texts]:
    """Positive and negative sides: a trait's instruction pairs as system prompts, its
    extraction questions as user turns, the model's greedy responses (untimed)."""
    trait = load_trait(args.trait)
    n = len(trait.instructions)
    items = [
        (trait.instructions[i % n], trait.extraction_questions[(i // n) % 20])
        for i in range(args.pairs)
    ]
    sides: list[Texts] = []
    for side in ("pos", "neg"):
        records = [
            {
                "messages": [
                    {"role": "system", "content": getattr(pair, side)},
                    {"role": "user", "content": question},
                ]
            }
            for pair, question in items
        ]
        gens = generate(
            s.model,
            s.tokenizer,
            records,
            batch_size=args.batch_size,
            max_new_tokens=args.response_tokens,
            capture_layers=(),
        )
        sides.append([(g.prompt_text, g.response) for g in gens])
    return sides[0], sides[1]


def encode(s: Subject, texts: Texts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ids, attention mask and response mask of prompt + response texts."""
    tok = s.tokenizer
    full = [tok(p + r, add_special_tokens=False)["input_ids"] for p, r in texts]
    plen = [len(tok(p, add_special_tokens=False)["input_ids"]) for p, _ in texts]
    width = max(map(len, full))
    ids = torch.full((len(full), width), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros(len(full), width, dtype=torch.long)
    resp = torch.zeros(len(full), width, dtype=torch.bool)
    for row, (seq, p) in enumerate(zip(full, plen, strict=True)):
        ids[row, width - len(seq) :] = torch.tensor(seq)
        attn[row, width - len(seq) :] = 1
        resp[row, width - len(seq) + p :] = True
    return ids.to(s.device), attn.to(s.device), resp.to(s.device)


def batches(texts: Texts, size: int) -> Iterator[Texts]:
    for start in range(0, len(texts), size):
        yield texts[start : start + size]


# --- part 2: extraction -------------------------------------------------------------------
def pl_extract(
    s: Subject,
    pos: Texts,
    neg: Texts,
    bs: int,
    layout: BlockLayout,
    keep: int | None = LAST_LOGITS,
) -> torch.Tensor:
    """persona-lens: mean over responses of response-averaged activations, pos - neg
    (``keep=None``: with all logits, the work the peers do)."""
    means = []
    for side in (pos, neg):
        rows = []
        for chunk in batches(side, bs):
            ids, attn, resp = encode(s, chunk)
            result = pl_capture_batch(s, ids, attn, resp, layout, keep)
            assert result.response_mean is not None
            rows.append(result.response_mean)
        means.append(torch.cat(rows).mean(0))
    return means[0] - means[1]  # [L+1, d]


def pl_capture_batch(
    s: Subject,
    ids: torch.Tensor,
    attn: torch.Tensor,
    resp: torch.Tensor,
    layout: BlockLayout,
    keep: int | None,
) -> CaptureResult:
    """``capture_forward`` (``keep=1``), or the same capture hooks on a forward that computes
    all logits (``keep=None``)."""
    if keep == LAST_LOGITS:
        return capture_forward(s.model, ids, attn, resp, layout=layout)
    capture = ActivationCapture(s.model, layout)
    capture.begin(response_mask=resp)
    with capture, torch.no_grad():
        s.model(input_ids=ids, **padded_forward_kwargs(s.model, attn))
    return capture.result()


def pl_extract_last(s: Subject, pos: Texts, neg: Texts, bs: int, layout: Any) -> torch.Tensor:
    """persona-lens reading the last token instead (what the peers read): a cross-check."""
    means = []
    for side in (pos, neg):
        rows = []
        for chunk in batches(side, bs):
            ids, attn, resp = encode(s, chunk)
            result = capture_forward(s.model, ids, attn, torch.zeros_like(resp), layout=layout)
            assert result.prompt_last is not None
            rows.append(result.prompt_last)
        means.append(torch.cat(rows).mean(0))
    return means[0] - means[1]


def repeng_extract(s: Subject, pos: Texts, neg: Texts, bs: int, num_layers: int) -> torch.Tensor:
    dataset = [DatasetEntry(p + r, q + t) for (p, r), (q, t) in zip(pos, neg, strict=True)]
    vector = ControlVector.train(s.model, s.tokenizer, dataset, batch_size=bs, method="pca_diff")
    return _rows(vector.directions, num_layers)


def sv_extract(s: Subject, pos: Texts, neg: Texts, bs: int, num_layers: int) -> torch.Tensor:
    samples = [(p + r, q + t) for (p, r), (q, t) in zip(pos, neg, strict=True)]
    vector = train_steering_vector(s.model, s.tokenizer, samples, batch_size=bs)
    return _rows(vector.layer_activations, num_layers)


def _rows(per_layer: dict[int, Any], num_layers: int) -> torch.Tensor:
    """Peer layer index k -> persona-lens position k+1; missing positions are NaN."""
    out = torch.full((num_layers + 1, 0), float("nan"))
    for k, value in per_layer.items():
        row = torch.as_tensor(np.asarray(value) if not torch.is_tensor(value) else value)
        if out.shape[1] == 0:
            out = torch.full((num_layers + 1, row.shape[-1]), float("nan"))
        out[k + 1] = row.detach().float().cpu()
    return out


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-layer cosine similarity (NaN where either is missing)."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


# --- part 1: steering ---------------------------------------------------------------------
class SteerBench:
    def __init__(self, s: Subject, args: argparse.Namespace, vector: torch.Tensor) -> None:
        self.s, self.args = s, args
        self.layout = find_blocks(s.model)
        self.n = self.layout.num_layers
        self.mid = max(1, self.n // 2)
        self.vector = vector  # [L+1, d], persona-lens rows
        self.pv = steering_vector(vector, "bench")
        self.prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
        self.counter = FixedLengthGenerate(s.model)
        self.max_new_tokens = args.max_new_tokens
        self.outputs: dict[str, torch.Tensor] = {}

    def layers(self, which: str) -> list[int]:
        return [self.mid] if which == "1" else list(range(1, self.n + 1))

    def generate(self, name: str) -> None:
        out = hf_generate(
            self.s.model,
            self.s.tokenizer,
            self.prompts,
            self.args.batch_size,
            self.max_new_tokens,
        )
        self.outputs[name] = torch.cat([o.flatten() for o in out])

    def run_plain(self) -> None:
        self.generate("plain")

    def run_pl(self, which: str) -> None:
        spec = SteeringSpec(self.pv, self.args.coefficient, self.layers(which))
        with steer(self.s.model, spec):
            self.generate(f"persona-lens {which}")

    def run_repeng(self, which: str) -> None:
        ids = [layer - 1 for layer in self.layers(which)]
        directions = {k: self.vector[k + 1].numpy() for k in ids}
        control = ControlModel(self.s.model, ids)  # wraps the blocks in place
        try:
            control.set_control(
                ControlVector(self.s.model.config.model_type, directions), self.args.coefficient
            )
            self.generate(f"repeng {which}")
        finally:
            control.unwrap()

    def run_sv(self, which: str) -> None:
        acts = {
            layer - 1: self.vector[layer].to(self.s.device, self.s.dtype)
            for layer in self.layers(which)
        }
        with SteeringVector(acts).apply(self.s.model, multiplier=self.args.coefficient):
            self.generate(f"steering-vectors {which}")

    def runners(self) -> dict[str, Callable[[], Sample]]:
        def wrap(fn: Callable[[], None]) -> Callable[[], Sample]:
            def run() -> Sample:
                sample, _ = timed(fn, self.s.device)
                sample.tokens = self.counter.take()
                return sample

            return run

        configs = {"plain": wrap(self.run_plain)}
        for which in ("1", "all"):
            configs[f"persona-lens {which}"] = wrap(lambda w=which: self.run_pl(w))
            configs[f"repeng {which}"] = wrap(lambda w=which: self.run_repeng(w))
            configs[f"steering-vectors {which}"] = wrap(lambda w=which: self.run_sv(w))
        return configs

    def run(self) -> dict[str, list[Sample]]:
        configs = self.runners()
        with self.counter:
            if self.args.warmup:
                self.max_new_tokens = 4
                interleaved(configs, repeats=0, warmup=self.args.warmup)
            self.max_new_tokens = self.args.max_new_tokens
            return interleaved(configs, repeats=self.args.repeats, warmup=0)


class _Pass(nn.Module):
    def forward(self, hidden: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return hidden


class _StubInner(nn.Module):
    def __init__(self, n: int, d: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(64, d, device=device, dtype=dtype)
        self.layers = nn.ModuleList(_Pass() for _ in range(n))


class PeerStub(nn.Module):
    """``model.layers.N`` identity blocks (the layout repeng and steering-vectors expect):
    timing its forward with each library's steering isolates their host cost per step."""

    def __init__(self, n: int, d: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = _StubInner(n, d, device, dtype)
        self.config = type("Cfg", (), {"model_type": "stub"})()

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        hidden = self.model.embed_tokens(input_ids)
        for block in self.model.layers:
            hidden = block(hidden, position_ids=kwargs.get("position_ids"))
        return hidden


def peer_host_cost(bench: SteerBench, rounds: int = 15, steps: int = 64) -> dict[str, float]:
    """Median host time per decoding step of the stub under each library's steering."""
    s, n = bench.s, bench.n
    stub = PeerStub(n, bench.layout.hidden_size, s.device, s.dtype).eval()
    layout = BlockLayout(
        "model.layers", tuple(stub.model.layers), "stub", bench.layout.hidden_size, ("other",) * n
    )
    batch = min(bench.args.batch_size, len(bench.prompts))
    token = torch.full((batch, 1), 5, device=s.device)
    position = torch.full((batch, 1), 40, device=s.device)
    coef = bench.args.coefficient

    def decode() -> None:
        for _ in range(steps):
            stub(token, position_ids=position, cache=True)

    @contextlib.contextmanager
    def pl(which: str) -> Iterator[None]:
        spec = SteeringSpec(bench.pv, coef, bench.layers(which))
        with steer(stub, spec, layout=layout):
            yield

    @contextlib.contextmanager
    def rp(which: str) -> Iterator[None]:
        ids = [layer - 1 for layer in bench.layers(which)]
        control = ControlModel(stub, ids)  # type: ignore[arg-type]
        control.set_control(
            ControlVector("stub", {k: bench.vector[k + 1].numpy() for k in ids}), coef
        )
        try:
            yield
        finally:
            control.unwrap()

    @contextlib.contextmanager
    def sv(which: str) -> Iterator[None]:
        acts = {
            layer - 1: bench.vector[layer].to(s.device, s.dtype) for layer in bench.layers(which)
        }
        with SteeringVector(acts).apply(stub, multiplier=coef):
            yield

    configs: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
        "no steering": contextlib.nullcontext
    }
    for which in ("1", "all"):
        configs[f"persona-lens {which}"] = lambda w=which: pl(w)
        configs[f"repeng {which}"] = lambda w=which: rp(w)
        configs[f"steering-vectors {which}"] = lambda w=which: sv(w)
    times: dict[str, list[float]] = {k: [] for k in configs}
    names = list(configs)
    with torch.no_grad():
        for rnd in range(rounds + 1):
            for name in names[rnd % len(names) :] + names[: rnd % len(names)]:
                with configs[name]():
                    sample, _ = timed(decode, s.device)
                if rnd:
                    times[name].append(sample.wall / steps)
    return {k: median(v) for k, v in times.items()}


# --- part 3: capture for screening --------------------------------------------------------
def logits_kwargs(s: Subject, keep: int | None) -> dict[str, Any]:
    """``logits_to_keep`` for the forward, where the model accepts it."""
    if keep is None or "logits_to_keep" not in inspect.signature(s.model.forward).parameters:
        return {}
    return {"logits_to_keep": keep}


def hidden_states_capture(
    s: Subject, texts: Texts, bs: int, keep: int | None = None
) -> list[torch.Tensor]:
    """A plain forward with output_hidden_states=True, reduced like capture_forward."""
    out = []
    for chunk in batches(texts, bs):
        ids, attn, resp = encode(s, chunk)
        with torch.no_grad():
            result = s.model(
                input_ids=ids,
                output_hidden_states=True,
                **padded_forward_kwargs(s.model, attn),
                **logits_kwargs(s, keep),
            )
        prompt = attn.bool() & ~resp
        wp = prompt.float() / prompt.sum(1, keepdim=True).clamp_min(1)
        wr = resp.float() / resp.sum(1, keepdim=True).clamp_min(1)
        pos = torch.arange(ids.shape[1], device=ids.device)
        last = torch.where(prompt, pos, -1).max(1).values.clamp_min(0)
        rows = torch.arange(ids.shape[0], device=ids.device)
        means, pmeans, lasts = [], [], []
        for h in result.hidden_states:
            means.append(torch.einsum("bt,btd->bd", wr, h.float()))
            pmeans.append(torch.einsum("bt,btd->bd", wp, h.float()))
            lasts.append(h[rows, last].float())
        out.append(torch.stack(means, 1).cpu())
        del result
    return out


def forward_only(s: Subject, texts: Texts, bs: int, keep: int | None = None) -> None:
    for chunk in batches(texts, bs):
        ids, attn, _ = encode(s, chunk)
        with torch.no_grad():
            s.model(input_ids=ids, **padded_forward_kwargs(s.model, attn), **logits_kwargs(s, keep))


def pl_capture(
    s: Subject, texts: Texts, bs: int, layout: Any, keep: int | None = LAST_LOGITS
) -> list[torch.Tensor]:
    out = []
    for chunk in batches(texts, bs):
        ids, attn, resp = encode(s, chunk)
        result = pl_capture_batch(s, ids, attn, resp, layout, keep)
        assert result.response_mean is not None
        out.append(result.response_mean)
    return out


def peak_memory(s: Subject, fn: Callable[[], Any]) -> float | None:
    if s.device.type != "cuda":
        return None
    sync(s.device)
    torch.cuda.reset_peak_memory_stats(s.device)
    base = torch.cuda.memory_allocated(s.device)
    fn()
    sync(s.device)
    return (torch.cuda.max_memory_allocated(s.device) - base) / 2**20


# --- main ---------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    s = bench_subject(args)
    layout = find_blocks(s.model)
    n, bs = layout.num_layers, args.batch_size
    dtype = str(s.dtype).removeprefix("torch.")
    lines = [
        f"### Peers: {s.label}, {s.device.type} {dtype}",
        "",
        f"- command: `{command_line()}`",
        *machine_lines(s.device),
        f"- peers: repeng {version('repeng')}, steering-vectors {version('steering-vectors')} "
        "(PyPI, installed with --no-deps; `np.float_` aliased for repeng on numpy 2)",
        f"- model: {s.label}, {n} blocks, d={layout.hidden_size}; {args.repeats} interleaved "
        f"repeats after {args.warmup} warm-up round(s); medians",
        "",
    ]
    raw: dict[str, Any] = {}
    print("generating contrastive pairs ...", file=sys.stderr)
    pos, neg = contrastive_texts(s, args)
    both = pos + neg
    vector = pl_extract(s, pos, neg, bs, layout)

    if "2" in parts:
        methods = {
            "persona-lens (capture_forward, response mean diff)": lambda: pl_extract(
                s, pos, neg, bs, layout
            ),
            "persona-lens, all logits (the peers' work)": lambda: pl_extract(
                s, pos, neg, bs, layout, keep=None
            ),
            "repeng ControlVector.train (pca_diff, last token)": lambda: repeng_extract(
                s, pos, neg, bs, n
            ),
            "steering-vectors train_steering_vector (mean diff, last token)": lambda: sv_extract(
                s, pos, neg, bs, n
            ),
        }
        vectors: dict[str, torch.Tensor] = {}

        def runner(name: str) -> Callable[[], Sample]:
            def run() -> Sample:
                sample, result = timed(methods[name], s.device)
                vectors[name] = result
                return sample

            return run

        samples = interleaved({k: runner(k) for k in methods}, args.repeats, args.warmup)
        pl_v, pl_full_v, rp_v, sv_v = (vectors[k] for k in methods)
        assert torch.allclose(pl_v, pl_full_v, rtol=1e-4, atol=1e-5), "same vector either way"
        last_v = pl_extract_last(s, pos, neg, bs, layout)
        pairs = {
            "persona-lens vs repeng": cosines(pl_v, rp_v),
            "persona-lens vs steering-vectors": cosines(pl_v, sv_v),
            "repeng vs steering-vectors": cosines(rp_v, sv_v),
            "persona-lens last-token vs steering-vectors (same method)": cosines(last_v, sv_v),
            "persona-lens last-token vs repeng": cosines(last_v, rp_v),
        }
        pl_name = next(iter(methods))
        rows = [
            [
                k,
                "last" if k == pl_name else "all",
                fmt(median([x.wall for x in v]), 2),
                fmt(median([x.cpu for x in v]), 2),
                fmt(paired_ratio(v, samples[pl_name], "wall"), 2),
                fmt(paired_ratio(v, samples[pl_name], "cpu"), 2),
            ]
            for k, v in samples.items()
        ]
        lines += [
            f"**Vector extraction** from {args.pairs} contrastive pairs of the built-in trait "
            f"`{args.trait}` (system prompts pos/neg x extraction questions, the model's own "
            f"greedy {args.response_tokens}-token responses), batch {bs}; every method gets the "
            "same prompt + response texts. `logits`: whether the forward computes the LM head "
            "at every position (`all`, as the peers do) or at the last one only (`last`, "
            "`capture_forward`'s `logits_to_keep=1`); both persona-lens rows give the same "
            "vector.",
            "",
            md_table(
                [
                    "method",
                    "logits",
                    "wall s",
                    "CPU s",
                    "time vs persona-lens (wall)",
                    "time vs persona-lens (CPU)",
                ],
                rows,
            ),
            "",
            "Cosine similarity per layer position of the resulting vectors (positions "
            f"1..{n - 1}; the top position {n} listed apart because repeng reads it after the "
            "final norm; repeng has no position 1: it skips block 0 by default):",
            "",
        ]
        mid, deep = max(1, n // 2), max(1, (2 * n) // 3)
        crow = []
        for name, cos in pairs.items():
            inner = cos[1:n]
            inner = inner[~torch.isnan(inner)]
            lo = int(torch.nan_to_num(cos[1:n], nan=9).argmin()) + 1
            crow.append(
                [
                    name,
                    fmt(float(inner.mean())),
                    f"{fmt(float(inner.min()))} (pos {lo})",
                    fmt(float(cos[mid])),
                    fmt(float(cos[deep])),
                    fmt(float(cos[n])),
                ]
            )
        lines += [
            md_table(
                ["pair", "mean", "min (position)", f"pos {mid}", f"pos {deep}", f"pos {n}"], crow
            ),
            "",
        ]
        raw["extraction"] = {k: [vars(x) for x in v] for k, v in samples.items()}
        raw["cosines"] = {k: v.tolist() for k, v in pairs.items()}

    if "1" in parts:
        bench = SteerBench(s, args, vector)
        samples = bench.run()
        host = peer_host_cost(bench)
        same = {}
        for which in ("1", "all"):
            ref = bench.outputs[f"persona-lens {which}"]
            for lib in ("repeng", "steering-vectors"):
                same[f"{lib} {which}"] = bool(torch.equal(bench.outputs[f"{lib} {which}"], ref))
        rows = []
        for name, runs in samples.items():
            ratio = paired_ratio(runs, samples["plain"]) if name != "plain" else 1.0
            cpu_ratio = paired_ratio(runs, samples["plain"], "cpu_tps") if name != "plain" else 1.0
            h = host.get(name)
            extra = (
                f"{(h - host['no steering']) * 1e6:.0f}"
                if h is not None and name != "plain"
                else ""
            )
            agree = "" if name not in same else ("yes" if same[name] else "no")
            rows.append(
                [
                    name,
                    fmt(median([r.tps for r in runs]), 1),
                    fmt(ratio),
                    fmt(cpu_ratio),
                    pct(cpu_ratio),
                    extra,
                    agree,
                ]
            )
        lines += [
            f"**Steered generation**: {len(bench.prompts)} chat prompts, batch {bs}, greedy, "
            f"{args.max_new_tokens} new tokens (EOS masked), the persona-lens vector above times "
            f"{args.coefficient}, added at position {bench.mid} (`1`) or at every block 1..{n} "
            "(`all`, the same row per block in all three libraries: persona-lens gets an "
            'explicit layer list, not its layer-incremental `"all"`). Each library wraps the '
            "same `model.generate` call.",
            "",
            md_table(
                [
                    "configuration",
                    "tokens/s",
                    "ratio (wall)",
                    "ratio (CPU)",
                    "overhead (CPU)",
                    "hook host us/step",
                    "same tokens as persona-lens",
                ],
                rows,
            ),
            "",
            "`hook host us/step`: extra host time per decoding step of each library's steering "
            f"on a stub of {n} identity blocks (batch {min(bs, len(bench.prompts))}, 64 steps x "
            "15 rounds, medians) - the cost that matters when decoding is launch-bound (small "
            "models on a GPU).",
            "",
        ]
        raw["steering"] = {k: [vars(x) for x in v] for k, v in samples.items()}
        raw["host"] = host

    if "3" in parts:
        ways: dict[str, tuple[str, int | None]] = {  # name -> (way, logits kept)
            "forward only (no activations), all logits": ("forward", None),
            "forward only (no activations), logits_to_keep=1": ("forward", LAST_LOGITS),
            "forward, output_hidden_states=True, reduced, all logits": ("hidden", None),
            "forward, output_hidden_states=True, reduced, logits_to_keep=1": (
                "hidden",
                LAST_LOGITS,
            ),
            "persona-lens capture hooks (all layers), all logits": ("pl", None),
            "persona-lens capture_forward (all layers), logits_to_keep=1": ("pl", LAST_LOGITS),
        }

        def call(way: str, keep: int | None) -> Any:
            if way == "forward":
                return forward_only(s, both, bs, keep)
            if way == "hidden":
                return hidden_states_capture(s, both, bs, keep)
            return pl_capture(s, both, bs, layout, keep)

        kept: dict[str, Any] = {}

        def runner3(name: str) -> Callable[[], Sample]:
            def run() -> Sample:
                sample, result = timed(lambda: call(*ways[name]), s.device)
                kept[name] = result
                return sample

            return run

        samples3 = interleaved({k: runner3(k) for k in ways}, args.repeats, args.warmup)
        memory = {k: peak_memory(s, lambda k=k: call(*ways[k])) for k in ways}
        bases = {keep: name for name, (way, keep) in ways.items() if way == "forward"}
        hs = torch.cat(kept["forward, output_hidden_states=True, reduced, logits_to_keep=1"])
        pc = torch.cat(kept["persona-lens capture_forward (all layers), logits_to_keep=1"])
        rel = ((hs - pc).norm(dim=-1) / pc.norm(dim=-1).clamp_min(1e-6)).amax(0)
        tokens = int(sum(encode(s, c)[1].sum() for c in batches(both, bs)))
        has_keep = bool(logits_kwargs(s, LAST_LOGITS))
        rows = []
        for name, runs in samples3.items():
            mem = memory.get(name)
            base = samples3[bases[ways[name][1]]]
            rows.append(
                [
                    name,
                    fmt(median([r.wall for r in runs]), 2),
                    fmt(median([r.cpu for r in runs]), 2),
                    fmt(paired_ratio(runs, base, "wall"), 2),
                    fmt(paired_ratio(runs, base, "cpu"), 2),
                    "n/a (CPU)" if mem is None else f"{mem:.0f}",
                ]
            )
        lines += [
            f"**Activation capture for screening**: {len(both)} prompt + response texts "
            f"({tokens} tokens), batch {bs}; the hidden-states variant reduces the same "
            "statistics (response mean, prompt mean, prompt last) per layer. Every way runs "
            "with all logits and with the last position's only (`logits_to_keep=1`"
            + ("" if has_keep else ", which this model does not accept: the rows are equal")
            + "), and is compared with the bare forward that computes the same logits.",
            "",
            md_table(
                [
                    "method",
                    "wall s",
                    "CPU s",
                    "time vs forward, same logits (wall)",
                    "time vs forward, same logits (CPU)",
                    "peak extra memory MiB",
                ],
                rows,
            ),
            "",
            f"Response means agree at positions 0..{n - 1} (max relative difference "
            f"{float(rel[:n].max()):.1e}); at position {n} they differ by {float(rel[n]):.2f} "
            "(relative): `output_hidden_states` ends after the final norm, persona-lens reads "
            "the block output.",
            "",
        ]
        raw["capture"] = {k: [vars(x) for x in v] for k, v in samples3.items()}

    text = "\n".join(lines)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1, default=str))
    if not args.no_write:
        write_section(
            args.section or f"peers {args.model} {s.device.type} {dtype}", text, args.results
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
