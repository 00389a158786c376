"""The whole pipeline from outside, on saved tiny models of the two newest families: a block-
diffusion model (DiffusionGemma) and dynamic sparse attention (DeepSeek-V3.2 DSA).

Each runs ``persona extract`` (rollouts through the model's own ``generate``, mean
difference, layer choice), ``persona generate --steer --monitor`` and ``persona monitor`` in
subprocesses, as a user's shell would, and the results are checked against the library run
in this process on the same directory. Where diffusion decoding has no counterpart (per-token
guards, temperature), the command says so in one line and exits 2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from persona_lens.cli import app
from persona_lens.core.capture import Monitor
from persona_lens.core.errors import InputError
from persona_lens.core.generation import Generation, generate
from persona_lens.core.models import LoadedModel, load_model
from persona_lens.core.vectors import PersonaVector
from tests.cli_run import persona
from tests.tiny import zoo_model_dir

FAMILIES = ["diffusion_gemma", "deepseek_v32"]
PROMPTS = [{"prompt": "hello w10 w20 w30", "id": 1}, {"prompt": "world w40", "id": 2}]
NEW_TOKENS = 16


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module", params=FAMILIES)
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A saved model, the vector ``persona extract`` made for it, and ``persona generate``'s
    steered and monitored output."""
    root = tmp_path_factory.mktemp(request.param)
    model_dir = zoo_model_dir(root / "model", request.param)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    extracted = persona(
        "extract", "evil", "--model", str(model_dir), "--judge", "none", "--budget", "quick",
        "--out", str(root / "vectors"), cwd=root, env=_env(), timeout=600,
    )  # fmt: skip
    assert extracted.returncode == 0, extracted.stderr
    vector_path = Path(extracted.stdout.strip().splitlines()[-1])
    out = root / "steered.jsonl"
    generated = persona(
        "generate", "--model", str(model_dir), "-p", str(prompts), "--steer", f"{vector_path}:8",
        "--monitor", str(vector_path), "--max-new-tokens", str(NEW_TOKENS), "--token-projections",
        "--out", str(out), cwd=root, env=_env(), timeout=600,
    )  # fmt: skip
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.strip() == str(out)
    return {
        "name": request.param,
        "root": root,
        "model": model_dir,
        "prompts": prompts,
        "vector": vector_path,
        "steered": _read(out),
    }


def _library_run(run: dict[str, Any], **kwargs: Any) -> tuple[LoadedModel, list[Generation]]:
    """The saved model, loaded here, generating unsteered for the prompts with the extracted
    vector as a monitor at its best layer."""
    lm = load_model(str(run["model"]))
    vector = PersonaVector.load(run["vector"])
    layer = vector.best_layer
    assert layer is not None
    monitor = Monitor("evil", vector.at(layer), layer)
    generations = generate(
        lm.model, lm.tokenizer, PROMPTS, monitors=[monitor], layout=lm.layout, **kwargs
    )
    return lm, generations


def test_extract_writes_a_vector_for_the_model(run: dict[str, Any]) -> None:
    lm = load_model(str(run["model"]))
    vector = PersonaVector.load(run["vector"])
    vector.check_compatible(lm.layout.num_layers, lm.layout.hidden_size, lm.fingerprint)
    assert vector.best_layer is not None and 1 <= vector.best_layer <= lm.layout.num_layers
    assert torch.isfinite(vector.vectors).all() and vector.vectors[1:].norm() > 0
    assert (vector.metadata.get("stream") == "encoder") == lm.layout.is_block_diffusion
    assert (run["root"] / "vectors").is_dir()


def test_generate_steers_and_monitors(run: dict[str, Any]) -> None:
    """The steered CLI output differs from an unsteered run of the library on the same model,
    and its projections are the mean of its per-token projections."""
    lm, plain = _library_run(run, max_new_tokens=NEW_TOKENS)
    rows = run["steered"]
    assert [r["id"] for r in rows] == [1, 2]
    assert [r["response"] for r in rows] != [g.response for g in plain]
    for row, base in zip(rows, plain, strict=True):
        values = row["token_projections"]["evil"]
        assert len(values) == len(row["tokens"]) <= NEW_TOKENS
        if values:
            assert row["projections"]["evil"] == pytest.approx(sum(values) / len(values))
        # the prompt is the same: its last-token projection moves only by the steering there
        assert isinstance(row["prompt_projections"]["evil"], float)
        assert isinstance(base.prompt_projections["evil"], float)
        if lm.layout.is_block_diffusion:
            steps = lm.model.generation_config.max_denoising_steps
            series = row["denoising_projections"]["evil"]
            assert series and all(1 <= len(s) <= steps for s in series)
        else:
            assert "denoising_projections" not in row


def test_monitor_matches_the_library(run: dict[str, Any]) -> None:
    """``persona monitor`` (one forward pass) gives the last-prompt-token projections that
    capture while generating records for the same prompts."""
    out = run["root"] / "scores.jsonl"
    proc = persona(
        "monitor", "--model", str(run["model"]), "-v", str(run["vector"]), "-p",
        str(run["prompts"]), "--out", str(out), cwd=run["root"], env=_env(), timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    _, during = _library_run(run, max_new_tokens=2, batch_size=1)  # each prompt alone
    for row, generation in zip(_read(out), during, strict=True):
        assert row["prompt_projections"]["evil"] == pytest.approx(
            generation.prompt_projections["evil"], rel=1e-4, abs=1e-4
        )


def test_denoising_plot(run: dict[str, Any]) -> None:
    plot = run["root"] / "denoising.png"
    result = CliRunner().invoke(
        app,
        [
            "generate", "--model", str(run["model"]), "-p", str(run["prompts"]),
            "--monitor", str(run["vector"]), "--max-new-tokens", "8",
            "--denoising-plot", str(plot), "--out", str(run["root"] / "plotted.jsonl"),
        ],
    )  # fmt: skip
    if run["name"] == "diffusion_gemma":
        assert result.exit_code == 0, result.output
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert isinstance(result.exception, InputError)
        assert "block-diffusion" in str(result.exception) and not plot.exists()


def test_what_does_not_apply_to_diffusion_exits_2(run: dict[str, Any]) -> None:
    """Guards (per-token timing) and temperature are refused on diffusion with one-line user
    errors (which ``persona`` prints as one line, exit 2); a guard is accepted on the
    autoregressive family."""
    if run["name"] != "diffusion_gemma":
        from persona_lens.monitoring.guard import GuardSpec, resolve_guards

        lm = load_model(str(run["model"]))
        guard = GuardSpec(PersonaVector.load(run["vector"]), threshold=1.0)
        assert len(resolve_guards([guard], lm.layout)) == 1
        return
    result = CliRunner().invoke(
        app, ["chat", "--model", str(run["model"]), "--guard", f"{run['vector']}:1"], input=""
    )
    message = str(result.exception)
    assert isinstance(result.exception, InputError) and "\n" not in message
    assert message.startswith("guards do not apply to block-diffusion decoding")
    out = run["root"] / "hot.jsonl"
    result = CliRunner().invoke(
        app,
        ["generate", "--model", str(run["model"]), "-p", str(run["prompts"]),
         "--temperature", "0.7", "--out", str(out)],
    )  # fmt: skip
    assert isinstance(result.exception, InputError) and "temperature" in str(result.exception)
    assert not out.exists()


def test_info_shows_both_streams(run: dict[str, Any]) -> None:
    result = CliRunner().invoke(app, ["info", str(run["model"]), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    if run["name"] == "diffusion_gemma":
        assert set(info["streams"]) == {"encoder", "decoder"}
        assert info["canvas_length"] == 8 and info["read_stream"] == "encoder"
    else:
        assert set(info["layout"].upper()) == {"D"} and "note" in info
