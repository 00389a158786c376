"""Training across processes on a tiny Llama: ``persona train`` killed with SIGKILL resumes
from its last complete checkpoint and ends where an uninterrupted run ends; under
``accelerate launch`` with two CPU processes (DDP over gloo) the steering hooks work and the
adapter matches a single-process run with the same global batch."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from persona_lens.training.config import preset_config
from persona_lens.training.interventions import Intervention
from persona_lens.training.run import train
from persona_lens.training.workdir import COMPLETE, last_complete_checkpoint, partial_dir
from tests.cli_run import ENTRY, assert_one_line_error, persona
from tests.test_training import conversations, write_jsonl
from tests.tiny import load_tiny, random_trait_vector

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("train-proc")
    tiny = load_tiny(root / "model", seed=7, num_layers=3)
    vector = random_trait_vector(tiny, "evil", seed=1, best_layer=2, scale=4.0)
    return {
        "loaded": tiny[0],
        "model": tiny[2],
        "vector": vector,
        "vector_file": vector.save(root / "evil.safetensors"),
        "data": write_jsonl(root / "data.jsonl", conversations(40)),
    }


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_last_complete_checkpoint_skips_half_written_ones(tmp_path: Path) -> None:
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / COMPLETE).write_text(str(step))
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert last_complete_checkpoint(tmp_path / "none") is None


def test_resume_after_sigkill_matches_an_uninterrupted_run(
    setup: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    settings = {"max_steps": 40, "save_steps": 3, "batch_size": 2, "lora_rank": 4}
    args = [
        "train", str(setup["data"]), "--model", str(setup["model"]), "--out", str(out),
        "--preset", "cpu-small", "--prevent", f"{setup['vector_file']}:2",
        *[f"--{k.replace('_', '-')}={v}" for k, v in settings.items()],
    ]  # fmt: skip
    work = partial_dir(out)
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen([sys.executable, "-c", ENTRY, *args], stdout=log, stderr=log)
    deadline = time.time() + 300
    while last_complete_checkpoint(work / "checkpoints") is None:
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()
        assert time.time() < deadline, "no checkpoint within 5 minutes"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not out.exists() and work.is_dir(), "nothing under --out until the run finishes"

    assert_one_line_error(persona(*args, timeout=180), "--resume", out)
    resumed = persona(*args, "--resume", timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip().splitlines()[-1] == str(out) and not work.exists()
    record = json.loads((out / "train.json").read_text())
    assert record["steps"] == 40 and record["resumed_from_step"] in range(3, 40, 3)
    steps = [c["step"] for c in record["loss_curve"]]
    assert steps == list(range(1, 41)), "the loss curve spans the run, before and after the kill"

    reference = train(
        setup["loaded"],
        setup["data"],
        tmp_path / "reference",
        config=preset_config("cpu-small", **settings),
        interventions=[Intervention("prevent", setup["vector"], 2.0)],
    )
    assert _max_difference(_adapter(out), _adapter(reference.out)) < 1e-5
    ours = [c["loss"] for c in record["loss_curve"]]
    theirs = [c["loss"] for c in reference.record["loss_curve"]]
    assert ours == pytest.approx(theirs, abs=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_accelerate_ddp_on_two_cpu_processes_matches_one_process(
    setup: dict[str, Any], tmp_path: Path
) -> None:
    """Two processes x batch 1 x accumulation 2 against one process x batch 2 x accumulation
    2: the same rows per optimiser step, so the same adapter (to float tolerance); and both
    differ from a run without the steering hook, so the hook was active under DDP."""
    out = tmp_path / "ddp"
    common = ["--preset", "cpu-small", "--max-steps", "4", "--lora-rank", "4", "--grad-accum", "2"]
    prevent = ["--prevent", f"{setup['vector_file']}:2"]
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), "-m", "persona_lens.cli",
        "train", str(setup["data"]), "--model", str(setup["model"]), "--out", str(out),
        *common, "--batch-size", "1", *prevent,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(launch, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "train.json").read_text())
    assert record["world_size"] == 2 and record["steps"] == 4
    assert proc.stdout.strip().splitlines()[-1] == str(out), "one process prints the result"

    config = preset_config("cpu-small", max_steps=4, lora_rank=4, grad_accum=2, batch_size=2)
    single = train(
        setup["loaded"], setup["data"], tmp_path / "single", config=config,
        interventions=[Intervention("prevent", setup["vector"], 2.0)],
    )  # fmt: skip
    plain = train(setup["loaded"], setup["data"], tmp_path / "plain", config=config)
    assert _max_difference(_adapter(out), _adapter(single.out)) < 1e-5
    assert _max_difference(_adapter(single.out), _adapter(plain.out)) > 1e-3
    ddp_losses = [c["loss"] for c in record["loss_curve"]]
    assert ddp_losses == pytest.approx([c["loss"] for c in single.record["loss_curve"]], abs=1e-5)
