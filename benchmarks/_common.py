"""Shared helpers for the benchmark scripts: subjects, timing, and RESULTS.md sections.

Benchmarks measure; they are never collected by the test suite. Every timed configuration
runs several times, interleaved (the order rotates each repeat), and reports medians, so
drift on a shared machine hits every configuration alike.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

# Sixteen varied chat prompts (plain questions, a system prompt, a short multi-turn chat).
PROMPTS: list[Any] = [
    "What is the difference between weather and climate?",
    "Write a short poem about a lighthouse keeper who is afraid of the dark.",
    "How do I reverse a linked list in Python? Show the code.",
    "Give me three tips for a first job interview.",
    "Why is the sky blue?",
    "Explain compound interest to a ten-year-old.",
    {
        "messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Summarize the plot of Hamlet."},
        ]
    },
    "What should I pack for a weekend hiking trip in the mountains?",
    "Is it rude to leave a party without saying goodbye?",
    "Translate 'good morning, how are you?' into French and Spanish.",
    {
        "messages": [
            {"role": "user", "content": "I planted tomatoes last week."},
            {"role": "assistant", "content": "Nice! How are they doing?"},
            {"role": "user", "content": "The leaves are turning yellow. What is wrong?"},
        ]
    },
    "List the planets of the solar system in order from the sun.",
    "My friend keeps cancelling plans at the last minute. How should I bring it up?",
    "What are the pros and cons of electric cars?",
    "Describe how a bill becomes a law, step by step, as briefly as you can.",
    "Tell me a joke about programmers.",
]

# Random-weight Llama configs built from scratch (nothing downloaded).
RANDOM_PRESETS: dict[str, dict[str, int]] = {
    # ~1.2B parameters with a 49k vocabulary: the shape of Llama-3.2-1B.
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
    # 30 thin blocks: compute is negligible, so per-step host overhead (hooks, Python) dominates,
    # the launch-bound regime of small models on a GPU.
    "thin30": dict(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=30,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    # for dry runs of gpu.sh on a CPU
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
}


# --- subjects -----------------------------------------------------------------------------
@dataclass
class Subject:
    """The model under test."""

    model: nn.Module
    tokenizer: Any
    label: str
    device: torch.device
    dtype: torch.dtype
    params: int = 0


def byte_tokenizer() -> Any:
    """An offline byte-level tokenizer (259 ids), used when the embedded one is unavailable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<pad>", "<s>", "</s>"):
        vocab[special] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tok.padding_side = "left"
    return tok


def offline_tokenizer() -> Any:
    """The embedded model's tokenizer, or the byte tokenizer where it is not installed."""
    from persona_lens.core.models import load_model, prepare_tokenizer

    try:
        return load_model("embedded", device="cpu").tokenizer
    except Exception as exc:  # no embedded model on this machine: fall back to bytes
        print(f"embedded tokenizer unavailable ({exc}); using a byte tokenizer", file=sys.stderr)
        return prepare_tokenizer(byte_tokenizer())


def load_subject(spec: str, device: str, dtype: str) -> Subject:
    """``embedded`` or ``random:PRESET`` (a random Llama using the embedded tokenizer)."""
    from persona_lens.core.models import load_model, resolve_device, resolve_dtype

    if not spec.startswith("random:"):
        lm = load_model(spec, device=device, dtype=dtype)
        params = sum(p.numel() for p in lm.model.parameters())
        return Subject(lm.model, lm.tokenizer, lm.name, lm.device, lm.dtype, params)
    preset = spec.split(":", 1)[1]
    if preset not in RANDOM_PRESETS:
        raise SystemExit(f"unknown random preset {preset!r}; choose from {sorted(RANDOM_PRESETS)}")
    try:  # the tokenizer only: the embedded weights are never loaded
        from transformers import AutoTokenizer

        from persona_lens.core.models import model_source, prepare_tokenizer

        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(model_source("embedded")))
    except Exception as exc:  # no embedded model on this machine: fall back to bytes
        print(f"embedded tokenizer unavailable ({exc}); using a byte tokenizer", file=sys.stderr)
        tokenizer = byte_tokenizer()
    from transformers import AutoModelForCausalLM, LlamaConfig

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **RANDOM_PRESETS[preset],
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with dev:
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    params = sum(p.numel() for p in model.parameters())
    return Subject(model, tokenizer, f"random Llama {preset}", dev, torch_dtype, params)


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every timing script shares: subject, repeats, threads, where to write."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="embedded", help="embedded | random:1b|thin30|tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1; 0 = torch's default). On a shared 2-core "
        "machine 2 threads run up to 10x slower under load (spin-waiting)",
    )
    p.add_argument("--results", type=Path, default=RESULTS, help="markdown file to update")
    p.add_argument("--section", default=None, help="section name (default from model/device)")
    p.add_argument("--json", type=Path, default=None, help="also dump raw samples here")
    p.add_argument("--no-write", action="store_true", help="print the section, write nothing")
    return p


def bench_subject(args: argparse.Namespace) -> Subject:
    """Apply ``--threads`` and load the ``--model`` subject on ``--device``/``--dtype``."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    return load_subject(args.model, args.device, args.dtype)


class FixedLengthGenerate:
    """Wraps ``model.generate`` so every call generates exactly ``max_new_tokens``.

    Throughput runs must generate the same number of tokens in every configuration, but
    greedy decoding with steering changes the text and may stop at a different EOS. This
    sets ``min_new_tokens = max_new_tokens`` (EOS is masked until the limit) and counts the
    tokens each call generated. The wrapper is an instance attribute, so persona-lens,
    repeng and steering-vectors all go through it, and its cost is the same for all.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.original = model.generate
        self.tokens = 0
        self.calls = 0

    def __enter__(self) -> FixedLengthGenerate:
        def generate(*args: Any, **kwargs: Any) -> Any:
            if "max_new_tokens" in kwargs:
                kwargs["min_new_tokens"] = kwargs["max_new_tokens"]
            out = self.original(*args, **kwargs)
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.tokens += int(out.shape[0]) * (int(out.shape[1]) - int(ids.shape[1]))
            self.calls += 1
            return out

        self.model.generate = generate  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        del self.model.generate

    def take(self) -> int:
        tokens, self.tokens = self.tokens, 0
        return tokens


def chat_text(tokenizer: Any, prompt: Any, system: str | None = None) -> str:
    """A prompt (text or ``{"messages": ...}``) rendered with the chat template."""
    messages = (
        list(prompt["messages"])
        if isinstance(prompt, dict)
        else [{"role": "user", "content": prompt}]
    )
    if system is not None:
        messages = [{"role": "system", "content": system}, *messages]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return str(text)
    return "\n".join([*(f"{m['role']}: {m['content']}" for m in messages), "assistant:"])


def hf_generate(
    model: Any, tokenizer: Any, prompts: Sequence[Any], batch_size: int, max_new_tokens: int
) -> list[torch.Tensor]:
    """Plain transformers: chat template, tokenize, greedy ``generate``, decode."""
    outputs = []
    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        texts = [chat_text(tokenizer, p) for p in prompts[start : start + batch_size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(device)
        with torch.no_grad():
            out = model.generate(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
                temperature=None,
                top_p=None,
                top_k=None,
            )
        new = out[:, enc["input_ids"].shape[1] :]
        tokenizer.batch_decode(new, skip_special_tokens=True)
        outputs.append(new.cpu())
    return outputs


# --- timing -------------------------------------------------------------------------------
@dataclass
class Sample:
    wall: float
    cpu: float
    tokens: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def tps(self) -> float:
        return self.tokens / self.wall if self.wall > 0 else float("nan")

    @property
    def cpu_tps(self) -> float:
        return self.tokens / self.cpu if self.cpu > 0 else float("nan")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Sample, Any]:
    """Wall and process CPU time of ``fn()`` (device synchronized on both ends)."""
    sync(device)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = fn()
    sync(device)
    return Sample(time.perf_counter() - wall0, time.process_time() - cpu0), result


Runner = Callable[[], Sample]


def interleaved(
    configs: dict[str, Runner], repeats: int, warmup: int, *, log: bool = True
) -> dict[str, list[Sample]]:
    """Run every config ``warmup + repeats`` times, rotating the order each round."""
    names = list(configs)
    samples: dict[str, list[Sample]] = {n: [] for n in names}
    for rnd in range(warmup + repeats):
        shift = rnd % len(names)
        for name in names[shift:] + names[:shift]:
            sample = configs[name]()
            if log:
                tag = "warmup" if rnd < warmup else f"rep {rnd - warmup + 1}"
                speed = f"  {sample.tps:8.1f} tok/s" if sample.tokens else ""
                print(
                    f"  [{tag}] {name:<24} {sample.wall:8.3f}s{speed}", file=sys.stderr, flush=True
                )
            if rnd >= warmup:
                samples[name].append(sample)
    return samples


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def paired_ratio(a: list[Sample], b: list[Sample], key: str = "tps") -> float:
    """Median over repeats of a[i]/b[i] (runs of the same round are paired)."""
    ratios = [getattr(x, key) / getattr(y, key) for x, y in zip(a, b, strict=True)]
    return median(ratios)


# --- reporting ----------------------------------------------------------------------------
def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_lines(device: torch.device) -> list[str]:
    """Markdown bullet lines describing machine, versions and date."""
    import transformers

    import persona_lens

    if device.type == "cuda":
        hw = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        hw = f"{os.cpu_count()} cores ({cpu_model()}), torch threads {torch.get_num_threads()}"
    commit = _git("rev-parse", "--short", "HEAD") or "?"
    dirty = " + uncommitted changes" if _git("status", "--porcelain", "--", "src") else ""
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return [
        f"- machine: {hw}; load average at the end {load}",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, persona-lens {persona_lens.__version__} "
        f"(commit {commit}{dirty})",
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
    ]


def command_line() -> str:
    script = Path(sys.argv[0])
    with contextlib.suppress(ValueError):
        script = script.resolve().relative_to(ROOT)
    return " ".join(["python", str(script), *map(shlex.quote, sys.argv[1:])])


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section between ``<!-- BEGIN name -->`` and ``<!-- END name -->``.

    A lock file serializes concurrent writers; the file is replaced atomically.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.strip()}\n{end}\n"
    lock_path = (
        Path(tempfile.gettempdir())
        / f"persona-lens-{hashlib.sha1(str(path).encode()).hexdigest()[:12]}.lock"
    )
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = path.read_text() if path.exists() else "# Benchmark results\n\n"
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            _, tail = rest.split(end, 1)
            text = head + block.rstrip("\n") + tail
        else:
            text = text.rstrip("\n") + "\n\n" + block
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    print(f"wrote section {name!r} to {path}", file=sys.stderr)


def fmt(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if value == value else "n/a"


def pct(ratio: float) -> str:
    """A throughput ratio as an overhead percentage (ratio 0.97 -> +3.1%)."""
    return f"{(1 / ratio - 1) * 100:+.1f}%" if ratio == ratio and ratio > 0 else "n/a"
