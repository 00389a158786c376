"""``persona screen`` and ``screen()`` on a tiny Llama saved to a directory: the scores equal a
hand-made forward pass, one forward reads every vector, the outputs (ranked JSONL, skipped-row
log, clean copy, report), bad input (one line, exit 2, nothing written), kill -9 and resume
(byte-identical output), and Ray (local instance, 2 workers) equal to the local run."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from persona_lens.cli import app
from persona_lens.cli.screen import with_optional_values
from persona_lens.core.errors import (
    InputError,
    LayerError,
    PersonaLensError,
    VectorError,
    VectorMismatchError,
)
from persona_lens.core.generation import eos_token_ids, render_chat, response_tokens
from persona_lens.core.models import LoadedModel, load_model
from persona_lens.core.vectors import PersonaVector
from persona_lens.screening.screen import screen
from tests.cli_run import ENTRY, persona
from tests.tiny import HIDDEN_SIZE, tiny_model_dir

L = 4
WORDS = ["hello", "world", "user", "assistant", ":"]


def _text(seed: int, length: int) -> str:
    return " ".join(WORDS[(seed * 7 + k * 3 + k * k) % len(WORDS)] for k in range(length))


def _record(i: int) -> dict[str, Any]:
    messages = [
        {"role": "user", "content": _text(i, 2 + i % 5)},
        {"role": "assistant", "content": _text(i + 11, 1 + i % 9)},
    ]
    if i % 6 == 0:  # a multi-turn conversation, screened on its last answer
        messages += [
            {"role": "user", "content": _text(i + 3, 3)},
            {"role": "assistant", "content": _text(i + 5, 4)},
        ]
    return {"id": i, "messages": messages}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny model, vectors for it (and for other models), and a dataset with bad rows."""
    root = tmp_path_factory.mktemp("screen")
    model_dir = tiny_model_dir(root / "model", seed=3, num_layers=L)
    loaded = load_model(str(model_dir))
    gen = torch.Generator().manual_seed(1)

    def save(name: str, best: int | None, fp: str | None = None, d: int = HIDDEN_SIZE) -> Path:
        meta = {"model": str(model_dir), "model_fingerprint": fp or loaded.fingerprint}
        if best is not None:
            meta["best_layer"] = str(best)
        vector = PersonaVector(torch.randn(L + 1, d, generator=gen), name, meta)
        return vector.save(root / f"{name}.safetensors")

    lines = [json.dumps(_record(i)) for i in range(30)]
    lines.insert(4, '{"messages": [oops')
    lines.insert(9, json.dumps({"messages": [{"role": "user", "content": "hello"}]}))
    lines.insert(13, "")
    data = root / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return {
        "root": root,
        "model": model_dir,
        "loaded": loaded,
        "data": data,
        "evil": save("evil", 2),
        "kind": save("kind", 3),
        "nobest": save("nobest", None),
        "other_model": save("other", 2, fp="f" * 16),
        "other_width": save("wide", 2, d=2 * HIDDEN_SIZE),
    }


def _invoke(*args: Any) -> Any:
    return CliRunner().invoke(app, ["screen", *[str(a) for a in args]])


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- the numbers ------------------------------------------------------------------------------
def _manual_means(loaded: LoadedModel, prompt: list[dict[str, str]], response: list[int]) -> Any:
    """Block outputs (layers < L: hidden_states[l] is block l's output) of one unpadded forward:
    (mean over the response tokens, last prompt token)."""
    tok = loaded.tokenizer
    ids = tok(render_chat(tok, prompt), add_special_tokens=False)["input_ids"]
    full = torch.tensor([[*ids, *response]])
    with torch.no_grad():
        states = loaded.model(input_ids=full, output_hidden_states=True).hidden_states
    return ids, [(s[0, len(ids) :].mean(0), s[0, len(ids) - 1]) for s in states]


def test_scores_equal_a_manual_forward_in_every_mode(env: dict[str, Any]) -> None:
    loaded: LoadedModel = env["loaded"]
    records = [_record(i) for i in range(1, 9)]
    evil = PersonaVector.load(env["evil"])
    unit = {layer: evil.at(layer) / evil.at(layer).norm() for layer in (1, 2, 3)}
    vectors: list[Any] = [(evil, 1), (evil, 2), (evil, 3)]
    results = {
        mode: screen(records, vectors, model=loaded, mode=mode, max_new_tokens=5, order="input")
        for mode in ("response", "prompt-last", "diff")
    }
    eos = eos_token_ids(loaded.model, loaded.tokenizer)
    for k, record in enumerate(records):
        prompt, answer = record["messages"][:-1], record["messages"][-1]["content"]
        response = loaded.tokenizer(answer, add_special_tokens=False)["input_ids"]
        ids, means = _manual_means(loaded, prompt, response)
        with torch.no_grad():
            generated = loaded.model.generate(
                input_ids=torch.tensor([ids]), max_new_tokens=5, do_sample=False
            )
        own = response_tokens(generated[0, len(ids) :].tolist(), eos, 5)
        _, base_means = _manual_means(loaded, prompt, own) if own else (None, None)
        for layer in (1, 2, 3):
            name = f"evil@{layer}"
            response_p = float(means[layer][0] @ unit[layer])
            last_p = float(means[layer][1] @ unit[layer])
            base_p = float(base_means[layer][0] @ unit[layer]) if own else last_p
            got = {m: results[m].records[k]["screening"]["traits"][name] for m in results}
            assert got["response"]["projection"] == pytest.approx(response_p, abs=1e-4)
            assert got["prompt-last"]["delta_p"] == pytest.approx(response_p - last_p, abs=1e-4)
            assert got["diff"]["base_projection"] == pytest.approx(base_p, abs=1e-4)
            assert got["diff"]["delta_p"] == pytest.approx(response_p - base_p, abs=1e-4)
    summary = results["diff"].summary
    assert summary.trait("evil@2").mean == pytest.approx(
        np.mean([r["screening"]["traits"]["evil@2"]["delta_p"] for r in results["diff"].records])
    )
    assert summary.multi_turn == sum(1 for r in records if len(r["messages"]) > 2)


def test_one_forward_reads_every_vector_at_every_layer(env: dict[str, Any]) -> None:
    loaded: LoadedModel = env["loaded"]
    calls = []
    handle = loaded.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        vectors = [(env["evil"], 1), (env["evil"], 3), env["kind"], (env["kind"], 1)]
        result = screen([_record(i) for i in range(12)], vectors, model=loaded, mode="response")
    finally:
        handle.remove()
    assert len(calls) == 1  # 12 rows, batch 16: one forward for 4 vectors at 2 layers
    assert [t.name for t in result.summary.traits] == ["evil@1", "evil@3", "kind@3", "kind@1"]


def test_screening_reads_each_vector_at_its_read_layer(env: dict[str, Any]) -> None:
    kind = PersonaVector.load(env["kind"])  # best_layer 3, no read_layer
    reading = PersonaVector(kind.vectors, "reading", {**kind.metadata, "read_layer": "1"})
    result = screen([_record(i) for i in range(4)], [kind, reading], model=env["loaded"])
    assert [(t.name, t.layer) for t in result.summary.traits] == [("kind", 3), ("reading", 1)]


# --- the outputs ------------------------------------------------------------------------------
def test_screen_writes_ranked_output_skip_log_clean_copy_and_report(
    env: dict[str, Any], tmp_path: Path
) -> None:
    out, clean, report = tmp_path / "ranked.jsonl", tmp_path / "clean.jsonl", tmp_path / "report"
    result = _invoke(
        env["data"], "-v", env["evil"], "-v", env["kind"], "-m", env["model"],
        "--filter-top", "20", "--max-new-tokens", "4", "--shard-size", "7",
        "-o", out, "--write-clean", clean, "--report", report,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(out)
    rows = _read(out)
    assert len(rows) == 30
    first = [r["screening"]["traits"]["evil"] for r in rows]
    assert [t["rank"] for t in first] == list(range(1, 31))  # ordered by the first vector
    assert all(a["delta_p"] >= b["delta_p"] for a, b in itertools.pairwise(first))
    flagged = {r["id"] for r in rows if r["screening"]["flagged"]}
    for trait in ("evil", "kind"):
        values = [r["screening"]["traits"][trait] for r in rows]
        assert sum(v["flagged"] for v in values) == math.ceil(30 * 0.2)
        assert {round(v["percentile"], 4) for v in values if v["rank"] == 1} == {100.0}
    assert all(set(r) >= {"id", "messages", "screening"} for r in rows)
    assert all(r["screening"]["base_response"] is not None for r in rows)
    assert sum(r["screening"]["multi_turn"] for r in rows) == 5
    log = (tmp_path / "ranked.skipped.log").read_text().splitlines()
    assert log[1:] == [
        "row 5: invalid JSON (Expecting value, column 15)",
        "row 10: no assistant turn",
    ]
    source_lines = env["data"].read_text().splitlines()
    kept = [json.loads(line)["id"] for line in clean.read_text().splitlines()]
    assert kept == [i for i in range(30) if i not in flagged]  # input order, verbatim lines
    assert set(clean.read_text().splitlines()) <= set(source_lines)
    text = (report / "report.md").read_text()
    assert "Top 10 flagged samples" in text and "| invalid JSON | 1 |" in text
    for name in ("evil", "kind"):
        assert (report / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not out.with_name("ranked.jsonl.partial").exists()  # the work folder is gone


def test_threshold_from_a_reference_uses_its_percentile(env: dict[str, Any]) -> None:
    records = [_record(i) for i in range(20)]
    reference = env["root"] / "reference.jsonl"
    reference.write_text("".join(json.dumps(_record(i + 40)) + "\n" for i in range(20)))
    common: dict[str, Any] = {"model": env["loaded"], "mode": "prompt-last"}
    ref_scores = [
        r["screening"]["traits"]["evil"]["delta_p"]
        for r in screen(str(reference), env["evil"], **common).records
    ]
    result = screen(records, env["evil"], threshold_from=reference, percentile=80, **common)
    threshold = float(np.percentile(ref_scores, 80))
    assert result.summary.trait("evil").threshold == pytest.approx(threshold)
    values = [r["screening"]["traits"]["evil"] for r in result.records]
    assert [v["flagged"] for v in values] == [v["delta_p"] > threshold for v in values]
    fixed = screen(records, env["evil"], threshold=threshold, **common)
    assert [r["screening"]["flagged"] for r in fixed.records] == [v["flagged"] for v in values]


# --- bad input --------------------------------------------------------------------------------
def _bad_cases(env: dict[str, Any], tmp: Path) -> list[tuple[list[Any], type, str]]:
    (tmp / "empty.jsonl").write_text("")
    (tmp / "garbage.jsonl").write_text("nope\n{broken\n" + json.dumps({"prompt": "q"}) + "\n")
    (tmp / "broken.parquet").write_bytes(b"PAR1 not really")
    d, m = env["data"], ["-m", env["model"]]
    return [
        ([tmp / "missing.jsonl", "-v", env["evil"], *m], InputError, "no dataset at"),
        ([tmp / "broken.parquet", "-v", env["evil"], *m], InputError, "not a readable Parquet"),
        ([tmp / "empty.jsonl", "-v", env["evil"], *m], InputError, "holds no rows"),
        ([tmp / "garbage.jsonl", "-v", env["evil"], *m], InputError, "no usable row"),
        ([d, "-v", env["other_model"], *m], VectorMismatchError, "fingerprint"),
        ([d, "-v", env["other_width"], *m], VectorMismatchError, "hidden size"),
        ([d, "-v", tmp / "none.safetensors", *m], VectorError, "no vector file"),
        ([d, "-v", env["nobest"], *m], LayerError, "no read_layer or best_layer"),
        ([d, "-v", f"{env['evil']}@9", *m], LayerError, "out of range 0..4"),
        ([d, "-v", env["evil"], *m, "--threshold", "abc"], InputError, "not a number"),
        (
            [d, "-v", env["evil"], *m, "--threshold", "evil=1", "--threshold", "x=2"],
            InputError,
            "x",
        ),
        ([d, "-v", env["evil"], *m, "--filter-top", "0"], InputError, "outside (0, 100)"),
        ([d, "-v", env["evil"], *m, "--filter-top", "100"], InputError, "outside (0, 100)"),
        ([d, "-v", env["evil"], *m, "--filter-top", "ten"], InputError, "not a number"),
        ([d, "-v", env["evil"], *m, "--write-clean", tmp / "c.jsonl"], InputError, "flagging rule"),
        (
            [d, "-v", env["evil"], *m, "--filter-top", "5", "--write-clean", tmp / "c.csv"],
            InputError,
            "give it .jsonl",
        ),
        ([d, "-v", env["evil"], *m, "--mode", "both"], InputError, "unknown mode"),
        ([d, "-v", env["evil"], *m, "--workers", "2"], InputError, "add --ray"),
        ([d, "-v", env["evil"], *m, "--percentile", "90"], InputError, "--threshold-from"),
    ]


def test_bad_input_raises_one_user_error_and_writes_nothing(
    env: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "ranked.jsonl"
    for args, error, needle in _bad_cases(env, tmp_path):
        result = _invoke(*args, "-o", out)
        assert isinstance(result.exception, error), (args, result.exception, result.output)
        assert isinstance(result.exception, PersonaLensError)
        assert needle in str(result.exception), (args, str(result.exception))
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ranked")) == []
        assert not (tmp_path / "c.jsonl").exists() and not (tmp_path / "c.csv").exists()


def test_missing_ray_and_other_errors_are_one_line_exit_2(
    env: dict[str, Any], tmp_path: Path
) -> None:
    fake = tmp_path / "no-ray"
    fake.mkdir()
    (fake / "ray.py").write_text("raise ImportError('No module named ray')\n")
    path = os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")])
    env_vars = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}
    base = [str(env["data"]), "-v", str(env["evil"]), "-m", str(env["model"]), "-o", "out.jsonl"]
    cases = [
        ([*base, "--ray"], "--ray needs Ray: pip install 'persona-lens[ray]'"),
        ([*base, "--threshold", "1e"], "not a number"),
    ]
    for args, needle in cases:
        proc = persona("screen", *args, cwd=tmp_path, env=env_vars, timeout=180)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, proc.stderr
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines
        assert proc.stdout == "" and not (tmp_path / "out.jsonl").exists()


def test_a_bare_ray_flag_means_a_local_instance() -> None:
    assert with_optional_values(["screen", "d.jsonl", "--ray", "-o", "x"]) == [
        "screen", "d.jsonl", "--ray=local", "-o", "x",
    ]  # fmt: skip
    assert with_optional_values(["screen", "d.jsonl", "--ray"])[-1] == "--ray=local"
    assert with_optional_values(["screen", "d", "--ray", "10.0.0.2:6379"])[-1] == "10.0.0.2:6379"
    assert with_optional_values(["generate", "--ray"]) == ["generate", "--ray"]


def test_help_has_examples() -> None:
    result = _invoke("--help")
    assert result.exit_code == 0 and "Examples" in result.output
    assert "--ray" in result.output and "ray extra" in " ".join(result.output.split())


# --- resuming ---------------------------------------------------------------------------------
def test_kill_9_then_rerun_gives_the_same_file(env: dict[str, Any], tmp_path: Path) -> None:
    data = tmp_path / "many.jsonl"
    data.write_text("".join(json.dumps(_record(i)) + "\n" for i in range(120)))
    args = ["screen", str(data), "-v", str(env["evil"]), "-v", str(env["kind"])]
    args += ["-m", str(env["model"]), "--max-new-tokens", "4", "--shard-size", "4"]
    run_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    killed, whole = tmp_path / "killed.jsonl", tmp_path / "whole.jsonl"
    work = tmp_path / "killed.jsonl.partial"
    proc = subprocess.Popen(
        [sys.executable, "-c", ENTRY, *args, "-o", str(killed)],
        env=run_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if work.is_dir() and len(list(work.glob("shard-*.jsonl"))) >= 3:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(work.glob("shard-*.jsonl")))
    assert 3 <= done < 30 and not killed.exists(), done
    rerun = persona(*args, "-o", str(killed), env=run_env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{done} shards from an earlier run" in " ".join(rerun.stderr.split())
    fresh = persona(*args, "-o", str(whole), env=run_env, timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    assert killed.read_bytes() == whole.read_bytes()
    assert not work.exists()


# --- Ray --------------------------------------------------------------------------------------
def test_ray_local_instance_equals_the_local_run(env: dict[str, Any], tmp_path: Path) -> None:
    pytest.importorskip("ray")
    common: dict[str, Any] = {"mode": "diff", "max_new_tokens": 4, "shard_size": 5}
    vectors = [env["evil"], env["kind"]]
    local = screen(
        env["data"], vectors, model=env["loaded"], out=tmp_path / "local.jsonl", **common
    )
    on_ray = screen(
        env["data"], vectors, model=str(env["model"]), ray=True, workers=2,
        out=tmp_path / "ray.jsonl", **common,
    )  # fmt: skip
    assert on_ray.summary.workers == 2 and on_ray.summary.shards == 7
    assert [r["id"] for r in on_ray.records] == [r["id"] for r in local.records]
    for a, b in zip(local.records, on_ray.records, strict=True):
        assert a["screening"]["base_response"] == b["screening"]["base_response"]
        for trait in ("evil", "kind"):
            x, y = a["screening"]["traits"][trait], b["screening"]["traits"][trait]
            assert y["delta_p"] == pytest.approx(x["delta_p"], abs=1e-5)
            assert (y["rank"], y["flagged"]) == (x["rank"], x["flagged"])
