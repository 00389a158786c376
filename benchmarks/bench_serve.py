"""Load benchmark of ``persona serve`` on loopback (the server runs as its own process).

    python benchmarks/bench_serve.py                    # embedded model, CPU, 1 torch thread
    python benchmarks/bench_serve.py --requests 50 --repeats 1   # a quick look

Three measurements, each on the same server:

a. load: ``--requests`` chat requests from ``--concurrency`` client threads, a mix of steered
   (random coefficients on one or two vectors, some at all layers) and unsteered ones:
   throughput, p50/p99 latency, errors (must be 0);
b. steering cost under concurrency: 8 concurrent requests with 8 different steering settings
   against 8 concurrent unsteered ones (same prompts), at the best layer and at all layers;
   the goal is a throughput ratio >= 0.9 (EasySteer reports 0.76 for all-layer steering);
c. batching: the same 8 requests sent concurrently against one at a time; goal >= 3x.

Equal work on both sides: every request asks for ``--tokens`` tokens with ``min_tokens`` equal
to it, so steering that changes the text never changes the token count. The vectors are random
directions (the cost of steering does not depend on the direction) with the norm of a typical
mean-difference vector. Configurations of b and c alternate over ``--repeats`` rounds; ratios
are medians of per-round ratios. Results go to RESULTS.md (section ``serve``).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PROMPTS, ROOT, command_line, fmt, machine_lines, md_table, write_section

VECTOR_NORM = 20.0  # per layer, about a third of a crude mean-difference vector's on the model
TRAITS = ("alpha", "beta", "gamma")


def random_vectors(spec: str, folder: Path, device: str) -> tuple[str, int]:
    """Random vectors for ``spec`` in ``folder``; returns (model name, number of layers)."""
    from persona_lens.core.models import load_model
    from persona_lens.core.vectors import PersonaVector

    loaded = load_model(spec, device=device)
    layout = loaded.layout
    generator = torch.Generator().manual_seed(0)
    for i, trait in enumerate(TRAITS):
        rows = torch.randn(layout.num_layers + 1, layout.hidden_size, generator=generator)
        rows = rows / rows.norm(dim=-1, keepdim=True) * VECTOR_NORM
        best = max(1, round(layout.num_layers * (0.4 + 0.1 * i)))
        meta = {"best_layer": str(best), "model_fingerprint": loaded.fingerprint, "model": spec}
        PersonaVector(rows, trait, meta).save(folder / f"{trait}.safetensors")
    return loaded.name, layout.num_layers


class Server:
    """``persona serve`` in a subprocess on a free loopback port."""

    def __init__(self, spec: str, folder: Path, threads: int, max_batch: int, device: str) -> None:
        entry = "from persona_lens.cli import main; main()"
        args = ["serve", "--model", spec, "--vectors", str(folder), "--port", "0"]
        args += ["--threads", str(threads), "--max-batch", str(max_batch), "--max-tokens", "512"]
        args += ["--request-timeout", "600"] + (["--device", device] if device else [])
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", entry, *args],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        self.url = ""
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            print(f"  server: {line.rstrip()}", file=sys.stderr)
            if line.startswith("serving "):
                self.url = line.split(" on ", 1)[1].split()[0].replace("localhost", "127.0.0.1")
                break
        if not self.url:
            raise SystemExit("persona serve did not start")
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            print(f"  server: {line.rstrip()}", file=sys.stderr)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def body(model: str, prompt: Any, tokens: int, persona: dict[str, Any]) -> dict[str, Any]:
    messages = (
        prompt["messages"] if isinstance(prompt, dict) else [{"role": "user", "content": prompt}]
    )
    return {
        "model": model,
        "messages": messages,
        "max_tokens": tokens,
        "min_tokens": tokens,
        "temperature": 0,
        "persona": persona,
    }


def post(client: httpx.Client, payload: dict[str, Any]) -> tuple[float, int, int]:
    """(latency s, status, completion tokens)."""
    start = time.perf_counter()
    response = client.post("/v1/chat/completions", json=payload)
    latency = time.perf_counter() - start
    tokens = response.json()["usage"]["completion_tokens"] if response.status_code == 200 else 0
    return latency, response.status_code, tokens


def run_batch(
    url: str, payloads: list[dict[str, Any]], concurrency: int
) -> tuple[float, list[Any]]:
    """Send ``payloads`` from ``concurrency`` threads; (wall s, per-request results)."""
    local = threading.local()

    def send(payload: dict[str, Any]) -> tuple[float, int, int]:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=url, timeout=600)
        return post(local.client, payload)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(send, payloads))
    return time.perf_counter() - start, results


def steering_mix(rng: random.Random, all_layers: bool) -> dict[str, Any]:
    """A random steering setting: one or two vectors, coefficients in [-2, 2]."""
    chosen = rng.sample(TRAITS, rng.choice((1, 2)))
    persona: dict[str, Any] = {"steer": {t: round(rng.uniform(-2, 2), 2) or 0.5 for t in chosen}}
    if all_layers:
        persona["layers"] = {chosen[0]: "all"}
    return persona


def eight_settings(all_layers: bool) -> list[dict[str, Any]]:
    coefficients = (-2.0, -1.5, -1.0, -0.5, 0.5, 1.0, 1.5, 2.0)
    settings = []
    for i, c in enumerate(coefficients):
        trait = TRAITS[i % len(TRAITS)]
        persona: dict[str, Any] = {"steer": {trait: c}}
        if all_layers:
            persona["layers"] = {trait: "all"}
        settings.append(persona)
    return settings


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--device", default="", help="cpu, cuda (default: the best one)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32, help="tokens per reply (min = max)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of parts b and c")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    model, num_layers = random_vectors(args.model, folder, args.device or "cpu")
    server = Server(args.model, folder, args.threads, args.max_batch, args.device)
    rng = random.Random(0)
    try:
        warm = [body(model, PROMPTS[0], 4, {})]
        run_batch(server.url, warm * 2, 2)

        # a. load
        payloads = []
        for i in range(args.requests):
            prompt = PROMPTS[i % len(PROMPTS)]
            persona = steering_mix(rng, all_layers=i % 4 == 3) if i % 2 else {}
            payloads.append(body(model, prompt, args.tokens, persona))
        print(f"[a] {args.requests} requests, {args.concurrency} concurrent", file=sys.stderr)
        wall, results = run_batch(server.url, payloads, args.concurrency)
        latencies = [r[0] for r in results]
        errors = sum(1 for r in results if r[1] != 200)
        tokens = sum(r[2] for r in results)
        steered_lat = [r[0] for r, p in zip(results, payloads, strict=True) if p["persona"]]
        plain_lat = [r[0] for r, p in zip(results, payloads, strict=True) if not p["persona"]]

        # b and c: 8 requests, the same prompts everywhere
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(8)]
        configs = {
            "8 concurrent, unsteered": ([body(model, p, args.tokens, {}) for p in prompts], 8),
            "8 concurrent, 8 steering settings (best layer)": (
                [
                    body(model, p, args.tokens, s)
                    for p, s in zip(prompts, eight_settings(False), strict=True)
                ],
                8,
            ),
            "8 concurrent, 8 steering settings (all layers)": (
                [
                    body(model, p, args.tokens, s)
                    for p, s in zip(prompts, eight_settings(True), strict=True)
                ],
                8,
            ),
            "8 one at a time, unsteered": ([body(model, p, args.tokens, {}) for p in prompts], 1),
        }
        samples: dict[str, list[float]] = {name: [] for name in configs}
        names = list(configs)
        for round_ in range(args.repeats):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for name in order:
                batch, concurrency = configs[name]
                seconds, out = run_batch(server.url, batch, concurrency)
                assert all(r[1] == 200 for r in out), out
                done = sum(r[2] for r in out)
                samples[name].append(done / seconds)
                print(
                    f"  [round {round_ + 1}] {name:<48} {done / seconds:7.1f} tok/s",
                    file=sys.stderr,
                )
        stats = httpx.get(f"{server.url}/v1/persona/stats").json()
    finally:
        server.stop()

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(samples[a], samples[b], strict=True))

    unsteered = "8 concurrent, unsteered"
    rows_b = [
        [name, fmt(statistics.median(v), 1), fmt(ratio(name, unsteered), 3)]
        for name, v in samples.items()
    ]
    device = torch.device(args.device or "cpu")
    body_md = "\n".join(
        [
            f"### Serving: {model}, {device.type}",
            "",
            f"- command: `{command_line()}`",
            *machine_lines(device),
            f"- server: `persona serve --threads {args.threads} --max-batch {args.max_batch}` "
            "in its own process, loopback; the client (httpx threads) in this one",
            f"- workload: chat requests over 16 prompts, {args.tokens} tokens each "
            f"(`min_tokens` = `max_tokens`: equal work), greedy; every loaded vector monitored "
            f"(3 random vectors, norm {VECTOR_NORM:g} per layer, model of {num_layers} blocks)",
            "",
            f"**a. load**: {args.requests} requests, {args.concurrency} concurrent clients, "
            "half of them steered (one or two vectors, random coefficients, a quarter of those "
            "at all layers)",
            "",
            md_table(
                [
                    "requests",
                    "errors",
                    "wall s",
                    "requests/s",
                    "tokens/s",
                    "p50 s",
                    "p99 s",
                    "p50 steered s",
                    "p50 unsteered s",
                ],
                [
                    [
                        args.requests,
                        errors,
                        fmt(wall, 1),
                        fmt(args.requests / wall, 2),
                        fmt(tokens / wall, 1),
                        fmt(percentile(latencies, 0.5), 2),
                        fmt(percentile(latencies, 0.99), 2),
                        fmt(percentile(steered_lat, 0.5), 2),
                        fmt(percentile(plain_lat, 0.5), 2),
                    ]
                ],
            ),
            "",
            f"**b, c.** 8 requests, {args.repeats} interleaved rounds, medians; ratio = tokens/s "
            "over the 8 concurrent unsteered requests (median of per-round ratios)",
            "",
            md_table(["configuration", "tokens/s", "ratio"], rows_b),
            "",
            f"- steered / unsteered, 8 concurrent: {fmt(ratio(names[1], unsteered), 3)} at the "
            f"best layer, {fmt(ratio(names[2], unsteered), 3)} at all layers (goal >= 0.9)",
            f"- concurrent / one at a time: {fmt(ratio(unsteered, names[3]), 2)}x (goal >= 3x)",
            f"- decoding steps by rows in the batch (whole run): {stats['rows_per_step']}",
        ]
    )
    print(body_md)
    if not args.no_write:
        write_section(f"serve {args.model} {device.type}", body_md)
    if errors:
        sys.exit(f"{errors} requests failed")


if __name__ == "__main__":
    main()
