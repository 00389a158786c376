"""Data screening: throughput per mode against its bound, Ray against local, memory at scale,
and how much the AUROC of II vs Normal moves between extraction seeds.

Parts (``--parts``, default ``throughput,ray,memory``):

- ``throughput``: the same samples (the shipped synthetic datasets, round-robin) scored by
  :class:`~persona_lens.screening.scoring.Scorer` in each mode, against a bare forward pass over
  the same tokens: the same tokenization (chat template + tokenizer), the same length-sorted
  left-padded batches, ``logits_to_keep=1``, no hooks. Goal: ``response`` at least 0.9 of the
  bare forward. ``diff`` against its bound: plain greedy ``generate`` of the base answers y'
  (same prompts, same batches, same cap) plus the bare forward over x + y. ``prompt forward``
  is what sharing the prompt between y and y' could save at most.
- ``ray``: ``screen()`` end to end (JSONL in, ranked JSONL out) locally, and with a local Ray
  instance with 1 and 2 workers (start-up included; steady-state rows/s from the first to the
  last finished shard).
- ``memory``: peak RSS of ``screen()`` in a fresh process on 10k and 200k rows with the tiny
  random model (``random:tiny``), response mode: it must not grow with the row count.
- ``seeds``: on the embedded model, vectors from ``persona extract TRAIT --seed S`` (the
  defaults: quick budget, offline judge) for each seed (reused from ``--vector-dir`` when
  there), then one diff-mode run per trait over its Normal, I and II versions with every seed's
  vector and 10 random directions of the same norm: AUROC of ΔP (II vs Normal), the twin win
  rate, and the dataset-level mean ΔP per version; also the AUROC of each seed's vector read at
  each of ``--auroc-layers`` instead of its own layer. The embedded acceptance test's margin
  comes from here.

Usage: ``python benchmarks/bench_screen.py [--model embedded] [--parts ...] [--repeats 3]``.
Writes ``screen ...`` sections of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import (
    ROOT,
    Sample,
    command_line,
    interleaved,
    load_subject,
    machine_lines,
    md_table,
    median,
    write_section,
)

from persona_lens.core.capture import padded_forward_kwargs
from persona_lens.core.generation import eos_token_ids, render_chat
from persona_lens.core.models import LoadedModel, load_model
from persona_lens.core.vectors import PersonaVector
from persona_lens.screening.samples import Sample as ScreenSample
from persona_lens.screening.samples import to_sample
from persona_lens.screening.scoring import MODES, Scorer, ScoreSettings, _encode
from persona_lens.screening.screen import screen
from persona_lens.screening.synthetic import SYNTHETIC_TRAITS, SYNTHETIC_VERSIONS, synthetic_dataset


# --- inputs -----------------------------------------------------------------------------------
def synthetic_records(count: int) -> list[dict[str, Any]]:
    """``count`` records from the nine synthetic files, round-robin (varied lengths)."""
    files = [
        [json.loads(line) for line in synthetic_dataset(t, v).read_text().splitlines()]
        for t in SYNTHETIC_TRAITS
        for v in SYNTHETIC_VERSIONS
    ]
    out = []
    for k in range(count):
        record = files[k % len(files)][(k // len(files)) % len(files[0])]
        out.append({**record, "id": f"{record['id']}#{k}"})
    return out


def loaded_subject(spec: str, device: str | None, dtype: str | None) -> LoadedModel:
    """``embedded`` (or any spec), or ``random:PRESET`` (see ``_common.load_subject``)."""
    if not spec.startswith("random:"):
        return load_model(spec, device=device, dtype=dtype)
    subject = load_subject(spec, device or "auto", dtype or "auto")
    return LoadedModel(subject.model, subject.tokenizer, spec, subject.device, subject.dtype)


def random_vector(loaded: LoadedModel, name: str, seed: int) -> PersonaVector:
    layout = loaded.layout
    rows = torch.randn(
        layout.num_layers + 1, layout.hidden_size, generator=torch.Generator().manual_seed(seed)
    )
    meta = {
        "best_layer": str(max(1, layout.num_layers // 2)),
        "model_fingerprint": loaded.fingerprint,
    }
    return PersonaVector(rows, name, meta)


GENERATE = "bound: generate y'"


def _name(loaded: LoadedModel) -> str:
    return loaded.name if loaded.spec == "embedded" else loaded.spec


# --- throughput -------------------------------------------------------------------------------
def _tokenized(
    loaded: LoadedModel, samples: Sequence[ScreenSample]
) -> tuple[list[list[int]], list[list[int]]]:
    """The tokenization the Scorer does (chat template, one batched tokenizer call each)."""
    tok = loaded.tokenizer
    return (
        _encode(tok, [render_chat(tok, s.prompt) for s in samples]),
        _encode(tok, [s.response for s in samples]),
    )


def bare_forward(
    loaded: LoadedModel,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    batch_size: int,
) -> int:
    """The forward passes of ``capture_sequences`` (same order, padding, positions and
    ``logits_to_keep``) with no hooks; returns the tokens it read."""
    model, pad = loaded.model, loaded.tokenizer.pad_token_id
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(lengths[i] for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, i in enumerate(rows):
            tokens = [*prompts[i], *responses[i]]
            ids[j, width - len(tokens) :] = torch.tensor(tokens)
            mask[j, width - len(tokens) :] = 1
        kwargs = padded_forward_kwargs(model, mask.to(loaded.device))
        with torch.no_grad():
            model(input_ids=ids.to(loaded.device), logits_to_keep=1, **kwargs)
    return sum(lengths)


def bare_generate(
    loaded: LoadedModel, samples: Sequence[ScreenSample], max_new_tokens: int, batch_size: int
) -> int:
    """Plain greedy ``generate`` of the base answers: the prompts of ``Scorer`` (distinct,
    sorted by length, same batches), no capture; returns the tokens generated."""
    tok, model = loaded.tokenizer, loaded.model
    texts = list(dict.fromkeys(render_chat(tok, s.prompt) for s in samples))
    lengths = {t: len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts}
    texts.sort(key=lambda t: -lengths[t])
    eos = eos_token_ids(model, tok)
    generated = 0
    for start in range(0, len(texts), batch_size):
        batch = tok(
            texts[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        )
        with torch.no_grad():
            out = model.generate(
                input_ids=batch["input_ids"].to(loaded.device),
                attention_mask=batch["attention_mask"].to(loaded.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tok.pad_token_id,
                eos_token_id=eos or None,
            )
        generated += int((out[:, batch["input_ids"].shape[1] :] != tok.pad_token_id).sum())
    return generated


def part_throughput(args: argparse.Namespace, loaded: LoadedModel) -> str:
    records = synthetic_records(args.samples)
    samples = [
        s
        for s in (to_sample(r, k + 1) for k, r in enumerate(records))
        if isinstance(s, ScreenSample)
    ]
    vectors = [random_vector(loaded, f"v{k}", k) for k in range(3)]
    layers = [
        loaded.layout.num_layers // 2,
        loaded.layout.num_layers // 2,
        3 * loaded.layout.num_layers // 4,
    ]
    from persona_lens.core.capture import Monitor

    monitors = [
        Monitor(f"v{k}", v.at(layer), layer)
        for k, (v, layer) in enumerate(zip(vectors, layers, strict=True))
    ]
    scorers = {
        mode: Scorer(
            loaded,
            monitors,
            ScoreSettings(
                mode=mode, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size
            ),
        )
        for mode in MODES
    }
    prompts, responses = _tokenized(loaded, samples)
    response_tokens = sum(len(r) for r in responses)
    total_tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))

    def timed(fn: Callable[[], Any], tokens: int = 0) -> Callable[[], Sample]:
        def run() -> Sample:
            cpu0, wall0 = time.process_time(), time.perf_counter()
            fn()
            return Sample(time.perf_counter() - wall0, time.process_time() - cpu0, tokens)

        return run

    def bare() -> None:
        p, r = _tokenized(loaded, samples)
        bare_forward(loaded, p, r, args.batch_size)

    def prompt_forward() -> None:
        p, _ = _tokenized(loaded, samples)
        bare_forward(loaded, [x[:-1] for x in p], [x[-1:] for x in p], args.batch_size)

    configs = {
        "bare forward": timed(bare, total_tokens),
        "response": timed(lambda: scorers["response"].score(samples), total_tokens),
        "prompt-last": timed(lambda: scorers["prompt-last"].score(samples), total_tokens),
        "diff": timed(lambda: scorers["diff"].score(samples), total_tokens),
        GENERATE: timed(
            lambda: bare_generate(loaded, samples, args.max_new_tokens, args.batch_size)
        ),
        "prompt forward": timed(prompt_forward),
    }
    runs = interleaved(configs, args.repeats, warmup=1)
    wall = {name: median([s.wall for s in runs[name]]) for name in runs}
    cpu = {name: median([s.cpu for s in runs[name]]) for name in runs}
    bound = [a.wall + b.wall for a, b in zip(runs[GENERATE], runs["bare forward"], strict=True)]
    bound_cpu = [a.cpu + b.cpu for a, b in zip(runs[GENERATE], runs["bare forward"], strict=True)]

    def ratio(name: str, base: str = "bare forward", key: str = "wall") -> str:
        pairs = zip(runs[base], runs[name], strict=True)
        return f"{median([getattr(b, key) / getattr(a, key) for b, a in pairs]):.3f}"

    n = len(samples)
    rows = []
    for name in ("bare forward", "response", "prompt-last", "diff"):
        rows.append(
            [
                name,
                f"{wall[name]:.2f}",
                f"{cpu[name]:.2f}",
                f"{n / wall[name]:.1f}",
                f"{total_tokens / wall[name]:.0f}",
                ratio(name),
                ratio(name, key="cpu"),
            ]
        )
    diff_vs_bound = median([b / d.wall for b, d in zip(bound, runs["diff"], strict=True)])
    diff_vs_bound_cpu = median([b / d.cpu for b, d in zip(bound_cpu, runs["diff"], strict=True)])
    share = wall["prompt forward"] / wall["diff"]
    return "\n".join(
        [
            f"### Screening throughput: {_name(loaded)}, "
            f"{loaded.device.type} {str(loaded.dtype).removeprefix('torch.')}",
            "",
            f"- command: `{command_line()}`",
            *machine_lines(loaded.device),
            f"- workload: {n} samples of the synthetic datasets ({total_tokens} tokens, "
            f"{response_tokens} of them response tokens), batch {args.batch_size}, 3 vectors at "
            f"2 layers, diff mode with y' of at most {args.max_new_tokens} tokens (greedy); "
            f"{args.repeats} interleaved repeats after a warm-up, medians",
            "",
            md_table(
                [
                    "way",
                    "wall s",
                    "CPU s",
                    "samples/s",
                    "tokens/s",
                    "vs bare (wall)",
                    "vs bare (CPU)",
                ],
                rows,
            ),
            "",
            "`bare forward`: the same tokenization, batches, padding, positions and "
            "`logits_to_keep=1` as the screening forward, with no hooks (equal work but the "
            "reductions). `vs bare` = bare time / mode time (1.0 = as fast). Goal: `response` "
            ">= 0.9.",
            "",
            md_table(
                ["diff mode vs its bound", "seconds"],
                [
                    [
                        "plain greedy generate of y' (same prompts, batches, cap)",
                        f"{wall[GENERATE]:.2f}",
                    ],
                    ["+ bare forward over x + y = bound", f"{median(bound):.2f}"],
                    ["diff mode", f"{wall['diff']:.2f}"],
                    ["bound / diff (wall, CPU)", f"{diff_vs_bound:.3f}, {diff_vs_bound_cpu:.3f}"],
                    [
                        "forward over the prompts alone (the most a shared prompt could save)",
                        f"{wall['prompt forward']:.2f} ({share:.1%} of diff)",
                    ],
                ],
            ),
        ]
    )


# --- Ray ------------------------------------------------------------------------------------------
def part_ray(args: argparse.Namespace, loaded: LoadedModel, spec: str) -> str:
    records = synthetic_records(args.ray_samples)
    folder = Path(tempfile.mkdtemp(prefix="persona-screen-bench-"))
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    vector = random_vector(loaded, "v", 0)
    common: dict[str, Any] = {
        "mode": args.ray_mode,
        "max_new_tokens": args.max_new_tokens,
        "shard_size": args.shard_size,
        "batch_size": args.batch_size,
    }

    def run(label: str, **extra: Any) -> Callable[[], Sample]:
        def go() -> Sample:
            stamps: list[float] = []
            start = time.perf_counter()
            result = screen(
                data,
                vector,
                out=folder / f"{label}.jsonl",
                progress=lambda *_: stamps.append(time.perf_counter()),
                **common,
                **extra,
            )
            wall = time.perf_counter() - start
            steady = (
                (args.ray_samples - args.shard_size) / (stamps[-1] - stamps[1])
                if len(stamps) > 2
                else float("nan")
            )
            outputs[label] = [
                r["screening"]["traits"]["v"][result.summary.traits[0].score_key]
                for r in result.records
            ]
            return Sample(wall, 0.0, args.ray_samples, {"steady": steady})

        return go

    outputs: dict[str, list[float]] = {}

    def local(threads: int) -> Callable[[], Sample]:
        inner = run(f"local{threads}", model=loaded)

        def go() -> Sample:
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                return inner()
            finally:
                torch.set_num_threads(before)

        return go

    cpus = os.cpu_count() or 1
    configs = {
        "local, 1 thread": local(1),
        f"local, {cpus} threads": local(cpus),
        "Ray, 1 worker": run("ray1", model=spec, ray=True, workers=1),
        "Ray, 2 workers": run("ray2", model=spec, ray=True, workers=2),
    }
    runs = interleaved(configs, args.repeats, warmup=0)
    base = median([s.wall for s in runs[next(iter(configs))]])
    rows = []
    for name, samples in runs.items():
        wall = median([s.wall for s in samples])
        steady = median([s.extra["steady"] for s in samples])
        rows.append(
            [
                name,
                f"{wall:.1f}",
                f"{args.ray_samples / wall:.1f}",
                f"{steady:.1f}",
                f"{base / wall:.2f}",
            ]
        )
    same = all(np.allclose(outputs["local1"], outputs[k], atol=1e-5) for k in outputs)
    # a random model is screened from a saved copy: name it by its preset, not that folder
    title = args.model if args.model.startswith("random:") else _name(loaded)
    return "\n".join(
        [
            f"### Screening with Ray: {title}, {args.ray_mode} mode",
            "",
            f"- command: `{command_line()}`",
            *machine_lines(loaded.device),
            f"- workload: `screen()` on {args.ray_samples} synthetic rows (JSONL in, ranked JSONL "
            f"out), shards of {args.shard_size}, batch {args.batch_size}; Ray: a local instance "
            f"(`ray.init(num_cpus={cpus})`), each worker loads its own replica and gets "
            f"{cpus} // workers CPUs (torch threads); {args.repeats} interleaved repeats, medians",
            "",
            md_table(
                [
                    "run",
                    "wall s (start-up included)",
                    "rows/s",
                    "rows/s after the first shard",
                    "vs local",
                ],
                rows,
            ),
            "",
            "Ranked outputs equal the local run's (order, and scores within 1e-5): "
            + ("yes." if same else "NO."),
        ]
    )


# --- memory ---------------------------------------------------------------------------------------
_CHILD = """
import json, resource, sys, time, torch
sys.path.insert(0, {bench!r})
torch.set_num_threads(1)
from bench_screen import loaded_subject, random_vector
from persona_lens.screening.screen import screen
loaded = loaded_subject("random:tiny", "cpu", "fp32")
vector = random_vector(loaded, "v", 0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
result = screen({data!r}, vector, model=loaded, mode="response", out={out!r},
                shard_size=512, batch_size=32)
print(json.dumps({{"rows": result.summary.screened, "seconds": time.perf_counter() - start,
    "before_kib": before, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}))
"""


def part_memory(args: argparse.Namespace) -> str:
    folder = Path(tempfile.mkdtemp(prefix="persona-screen-mem-"))
    base = synthetic_records(1440)
    rows = []
    for count in args.memory_rows:
        data = folder / f"rows{count}.jsonl"
        with data.open("w") as handle:
            for k in range(count):
                handle.write(json.dumps({**base[k % len(base)], "id": k}) + "\n")
        code = _CHILD.format(
            bench=str(Path(__file__).parent), data=str(data), out=str(folder / "out.jsonl")
        )
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        }
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
        )
        if proc.returncode:
            raise SystemExit(proc.stderr[-2000:])
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        size = data.stat().st_size / 2**20
        rows.append(
            [
                f"{count:,}",
                f"{size:.0f}",
                f"{got['before_kib'] / 1024:.0f}",
                f"{got['peak_kib'] / 1024:.0f}",
                f"{(got['peak_kib'] - got['before_kib']) / 1024:.0f}",
                f"{got['seconds']:.0f}",
                f"{got['rows'] / got['seconds']:.0f}",
            ]
        )
        print(rows[-1], file=sys.stderr, flush=True)
        data.unlink()
    return "\n".join(
        [
            "### Screening memory: peak RSS vs row count (random:tiny, response mode)",
            "",
            f"- command: `{command_line()}`",
            *machine_lines(torch.device("cpu")),
            "- each count in a fresh process: the tiny random Llama (d=64, 4 blocks, the embedded "
            "tokenizer), synthetic rows cycled, `screen()` with a ranked output file, shards of "
            "512, batch 32, one torch thread",
            "",
            md_table(
                [
                    "rows",
                    "input MiB",
                    "RSS after model load MiB",
                    "peak RSS MiB",
                    "growth MiB",
                    "seconds",
                    "rows/s",
                ],
                rows,
            ),
            "",
            "Rows stream in shards; what stays in memory is one float per row and trait plus a "
            "row number and a file offset (about 24 bytes a row with one vector), for the ranks "
            "and percentiles at the end.",
        ]
    )


# --- seeds ----------------------------------------------------------------------------------------
CI_QUESTIONS = 32  # the first N questions per version that tests/test_screening_embedded.py reads
RANDOM_DIRECTIONS = 10  # controls per trait: random directions with the vector's norms


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    diff = positive[:, None] - negative[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def strongest_random(
    scores: dict[str, dict[str, np.ndarray]], suffix: str = "", n: int | None = None
) -> float:
    """The largest AUROC (II vs Normal) of the random directions ``random{k}{suffix}``, on the
    first ``n`` questions (None: all)."""
    return max(
        auroc(scores["ii"][f"random{k}{suffix}"][:n], scores["normal"][f"random{k}{suffix}"][:n])
        for k in range(RANDOM_DIRECTIONS)
    )


def part_seeds(args: argparse.Namespace, loaded: LoadedModel) -> str:
    from persona_lens.extraction.extract import ExtractionOptions, extract
    from persona_lens.traits.definitions import load_trait

    vector_dir = Path(args.vector_dir)
    vectors: dict[tuple[str, int], PersonaVector] = {}
    for seed in args.seeds:
        for trait in SYNTHETIC_TRAITS:
            path = vector_dir / f"s{seed}" / f"{trait}.safetensors"
            if not path.is_file():
                print(f"extracting {trait} seed {seed}", file=sys.stderr, flush=True)
                options = ExtractionOptions(seed=seed)  # the defaults: quick, offline judge
                extract(
                    loaded, load_trait(trait), options, cache_dir=vector_dir / ".cache"
                ).vector.save(path)
            vectors[(trait, seed)] = PersonaVector.load(path)
    table: list[list[Any]] = []
    spread: list[list[Any]] = []
    by_layer: list[list[Any]] = []
    for trait in SYNTHETIC_TRAITS:
        records = []
        for version in SYNTHETIC_VERSIONS:
            lines = synthetic_dataset(trait, version).read_text().splitlines()[: args.questions]
            records += [{**json.loads(line), "version": version} for line in lines]
        chosen = [vectors[(trait, s)] for s in args.seeds]
        controls = []
        base = chosen[0]
        gen = torch.Generator().manual_seed(7)
        for k in range(RANDOM_DIRECTIONS):
            rows = torch.randn(base.vectors.shape, generator=gen)
            rows = rows / rows.norm(dim=-1, keepdim=True) * base.norms().unsqueeze(-1)
            controls.append(PersonaVector(rows, f"random{k}", dict(base.metadata)))
        fixed: list[tuple[PersonaVector, int]] = [  # every vector read at each fixed layer too
            (PersonaVector(v.vectors, f"{name}@{layer}", dict(v.metadata)), layer)
            for v, name in [
                *((v, f"seed{s}") for v, s in zip(chosen, args.seeds, strict=True)),
                *((c, c.trait) for c in controls),
            ]
            for layer in args.auroc_layers
        ]
        named = [
            PersonaVector(v.vectors, f"seed{s}", dict(v.metadata))
            for v, s in zip(chosen, args.seeds, strict=True)
        ]
        start = time.perf_counter()
        result = screen(
            records,
            [*named, *controls, *fixed],
            model=loaded,
            mode="diff",
            max_new_tokens=args.max_new_tokens,
            shard_size=4096,
        )
        seconds = time.perf_counter() - start
        by_version: dict[str, dict[str, list[tuple[str, float]]]] = {}
        for record in result.records:
            for name, value in record["screening"]["traits"].items():
                by_version.setdefault(record["version"], {}).setdefault(name, []).append(
                    (record["id"].rsplit("-", 1)[1], value["delta_p"])
                )
        scores = {
            v: {n: np.array([x for _, x in sorted(p)]) for n, p in names.items()}
            for v, names in by_version.items()
        }
        aurocs = []
        for seed in args.seeds:
            name = f"seed{seed}"
            ii, normal, mild = scores["ii"][name], scores["normal"][name], scores["i"][name]
            a = auroc(ii, normal)
            aurocs.append(a)
            subsets = [auroc(ii[:n], normal[:n]) for n in args.ci_questions]
            layer = result.summary.trait(name).layer
            table.append(
                [
                    trait,
                    seed,
                    layer,
                    f"{a:.3f}",
                    *(f"{x:.3f}" for x in subsets),
                    f"{float((ii > normal).mean()):.3f}",
                    f"{normal.mean():+.3f}",
                    f"{mild.mean():+.3f}",
                    f"{ii.mean():+.3f}",
                    "yes" if normal.mean() < mild.mean() < ii.mean() else "NO",
                ]
            )

        at_layers = [
            statistics.mean(
                auroc(scores["ii"][f"seed{s}@{layer}"], scores["normal"][f"seed{s}@{layer}"])
                for s in args.seeds
            )
            for layer in args.auroc_layers
        ]
        by_layer.append([trait, *(f"{a:.3f}" for a in at_layers)])
        by_layer.append(
            [
                f"{trait}, max of {RANDOM_DIRECTIONS} random directions",
                *(f"{strongest_random(scores, f'@{layer}'):.3f}" for layer in args.auroc_layers),
            ]
        )
        spread.append(
            [
                trait,
                f"{statistics.mean(aurocs):.3f}",
                f"{statistics.stdev(aurocs) if len(aurocs) > 1 else 0.0:.3f}",
                f"{min(aurocs):.3f}",
                f"{strongest_random(scores):.3f}",
                *(f"{strongest_random(scores, n=n):.3f}" for n in args.ci_questions),
                f"{seconds:.0f}",
            ]
        )
        print(table[-len(args.seeds) :], spread[-1], file=sys.stderr, flush=True)
    return "\n".join(
        [
            "### Screening: AUROC across extraction seeds (embedded, synthetic datasets)",
            "",
            f"- command: `{command_line()}`",
            *machine_lines(loaded.device),
            f"- vectors: `persona extract TRAIT --seed S` (defaults: quick, offline judge), S in "
            f"{', '.join(map(str, args.seeds))}; screening: diff mode, y' greedy of at most "
            f"{args.max_new_tokens} tokens, the first {args.questions} questions of each version "
            f"(the embedded test uses the first {CI_QUESTIONS}; also shown: the first "
            f"{', '.join(map(str, args.ci_questions))})",
            "",
            md_table(
                [
                    "trait",
                    "seed",
                    "layer read",
                    "AUROC II vs Normal",
                    *(f"AUROC, first {n}" for n in args.ci_questions),
                    "II > its Normal twin",
                    "mean ΔP Normal",
                    "mean ΔP I",
                    "mean ΔP II",
                    "Normal < I < II",
                ],
                table,
            ),
            "",
            md_table(
                [
                    "trait",
                    "AUROC mean over seeds",
                    "std",
                    "min",
                    f"max of {RANDOM_DIRECTIONS} random directions",
                    *(f"random max, first {n}" for n in args.ci_questions),
                    "screening s",
                ],
                spread,
            ),
            "",
            "AUROC II vs Normal (mean over the seeds) with each seed's vector read at a fixed "
            "layer instead of the layer it screens at (its read_layer), and the strongest of "
            f"the {RANDOM_DIRECTIONS} random directions read at that layer:",
            "",
            md_table(["trait", *(f"layer {layer}" for layer in args.auroc_layers)], by_layer),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded", help="embedded, a spec, or random:PRESET")
    parser.add_argument("--parts", default="throughput,ray,memory")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=96, help="throughput samples")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--ray-samples", type=int, default=192)
    parser.add_argument("--ray-mode", default="response", choices=MODES)
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument(
        "--memory-rows", type=lambda s: [int(x) for x in s.split(",")], default=[10_000, 200_000]
    )
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    parser.add_argument(
        "--vector-dir", default=str(Path(tempfile.gettempdir()) / "persona-screen-seeds")
    )
    parser.add_argument("--questions", type=int, default=160)
    parser.add_argument(
        "--auroc-layers", type=lambda s: [int(x) for x in s.split(",")], default=[6, 10, 15, 20, 24]
    )
    parser.add_argument(
        "--ci-questions",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[CI_QUESTIONS],
        help="subsets (first N questions) to report the AUROCs on too",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - {"throughput", "ray", "memory", "seeds"}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}")
    loaded = None
    if set(parts) - {"memory"}:
        loaded = loaded_subject(args.model, args.device, args.dtype)
    tag = args.model
    for part in parts:
        if part == "throughput":
            assert loaded is not None
            write_section(f"screen throughput {tag}", part_throughput(args, loaded))
        elif part == "ray":
            assert loaded is not None
            spec = args.model
            if spec.startswith("random:"):  # the workers load a saved copy
                folder = Path(tempfile.mkdtemp(prefix="persona-screen-model-"))
                loaded.model.save_pretrained(folder)
                loaded.tokenizer.save_pretrained(folder)
                spec = str(folder)
                loaded = load_model(spec)
            write_section(f"screen ray {tag}", part_ray(args, loaded, spec))
        elif part == "memory":
            write_section("screen memory", part_memory(args))
        elif part == "seeds":
            assert loaded is not None
            write_section("screen seeds", part_seeds(args, loaded))


if __name__ == "__main__":
    main()
