"""Run every benchmark in turn; each one replaces its own section of RESULTS.md.

    python benchmarks/run.py                      # all, 3 interleaved repeats each
    python benchmarks/run.py --only overhead,extract --repeats 5
    python benchmarks/run.py --dry-run            # print the commands only

Steps whose optional packages are missing are skipped with a note (``peers`` needs repeng and
steering-vectors; ``extract`` adds the vLLM rows when vLLM is installed; ``serve`` needs the
``[serve]`` extra and httpx). Every section records
the machine, the versions, its own command line and the medians of its repeats. Not part of
the test suite: benchmarks measure, tests assert.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def steps(repeats: int) -> dict[str, tuple[list[str], str | None]]:
    """Name -> (arguments of the script, why it is skipped or None)."""
    r = ["--repeats", str(repeats)]
    peers_missing = None if _installed("repeng", "steering_vectors") else "repeng/steering-vectors"
    extract = ["bench_extract.py", *r] + (["--vllm"] if _installed("vllm") else [])
    backend = "vllm" if _installed("vllm") else "hf"
    screen_parts = "throughput,ray" if _installed("ray") else "throughput"
    train_ok = _installed("peft", "accelerate")
    return {
        "overhead": (["bench_overhead.py", *r], None),
        "overhead-thin30": (["bench_overhead.py", "--model", "random:thin30", *r], None),
        "peers": (
            ["bench_peers.py", *r],
            f"{peers_missing} not installed" if peers_missing else None,
        ),
        "extract": (extract, None),
        "stability": (["seed_stability.py", "--backend", backend], None),
        "screen": (["bench_screen.py", "--parts", screen_parts, *r], None),
        "screen-tiny": (
            ["bench_screen.py", "--model", "random:tiny", "--parts", screen_parts, *r],
            None,
        ),
        "screen-memory": (["bench_screen.py", "--parts", "memory"], None),
        "screen-seeds": (["bench_screen.py", "--parts", "seeds"], None),
        "train": (["bench_train.py", *r], None if train_ok else "peft/accelerate not installed"),
        "training-shift": (
            ["training_shift.py"],
            None if train_ok else "peft/accelerate not installed",
        ),
        "diffusion": (["bench_diffusion.py", *r], None),
        "diffusion-streams": (["diffusion_streams.py"], None),
        "judge": (["judge_agreement.py"], None),
        "quick-budget": (["quick_budget.py", "--section", "quick budget"], None),
        "fidelity": (
            ["fidelity.py", "--extract", "optimistic", "--section", "fidelity optimistic"],
            None,
        ),
        "serve": (
            ["bench_serve.py", *r],
            None if _installed("fastapi", "uvicorn", "httpx") else "fastapi/uvicorn/httpx",
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default="", help="comma-separated step names")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    plan = steps(args.repeats)
    chosen = [s for s in args.only.split(",") if s] or list(plan)
    unknown = set(chosen) - set(plan)
    if unknown:
        parser.error(f"unknown steps {sorted(unknown)}; choose from {sorted(plan)}")
    failed = []
    for name in chosen:
        script_args, skipped = plan[name]
        command = [sys.executable, str(HERE / script_args[0]), *script_args[1:]]
        shown = "python benchmarks/" + shlex.join(script_args)
        if skipped:
            print(f"[{name}] skipped: {skipped}", flush=True)
            continue
        print(f"[{name}] {shown}", flush=True)
        if args.dry_run:
            continue
        started = time.perf_counter()
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        code = subprocess.call(command, cwd=ROOT, env=env)
        print(f"[{name}] exit {code} after {time.perf_counter() - started:.0f} s", flush=True)
        if code:
            failed.append(name)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
