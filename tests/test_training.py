"""Fine-tuning plumbing on a tiny Llama: data and assistant-only labels, intervention checks,
hooks only during training forwards, the model restored, the projection penalty, outputs,
the adapter outside the tool, the finetuning shift, and bad input (one line, exit 2, nothing
written). Resume after SIGKILL and DDP live in ``test_training_processes.py``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import TrainerCallback
from typer.testing import CliRunner

from persona_lens.cli import app
from persona_lens.core.errors import InputError, LayerError, VectorMismatchError
from persona_lens.core.models import LoadedModel, load_model
from persona_lens.core.vectors import PersonaVector
from persona_lens.training.config import TrainConfig, preset_config
from persona_lens.training.data import (
    IGNORE,
    Conversation,
    read_dataset,
    split_holdout,
    tokenize,
)
from persona_lens.training.interventions import Intervention, check_interventions
from persona_lens.training.regularization import ProjectionPenalty
from persona_lens.training.run import train
from persona_lens.training.shift import finetuning_shift, mean_prompt_last, shift_between
from persona_lens.training.workdir import partial_dir
from tests.cli_run import assert_one_line_error, persona
from tests.tiny import load_tiny, random_trait_vector

L = 3
FAST = TrainConfig(
    lora_rank=4,
    lora_alpha=8.0,
    learning_rate=2e-2,
    max_steps=4,
    batch_size=4,
    grad_accum=1,
    warmup_steps=0,
    scheduler="constant",
    holdout=0.2,
    save_steps=2,
)


def conversations(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` user/assistant rows over the tiny vocabulary (hello, world)."""
    gen = torch.Generator().manual_seed(seed)
    words = ["hello", "world"]

    def text(k: int) -> str:
        return " ".join(words[int(i)] for i in torch.randint(0, 2, (k,), generator=gen))

    return [
        {
            "messages": [
                {"role": "user", "content": text(3)},
                {"role": "assistant", "content": text(4)},
            ]
        }
        for _ in range(n)
    ]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Path]:
    return load_tiny(tmp_path_factory.mktemp("train") / "model", seed=7, num_layers=L)


@pytest.fixture(scope="module")
def vector(tiny: tuple[Any, Any, Path]) -> PersonaVector:
    return random_trait_vector(tiny, "evil", seed=1, best_layer=2, scale=4.0)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, vector: PersonaVector) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train-files")
    other = PersonaVector(
        vector.vectors, "evil", {**vector.metadata, "model_fingerprint": "f" * 16}
    )
    return {
        "data": write_jsonl(root / "data.jsonl", conversations(20)),
        "vector": vector.save(root / "evil.safetensors"),
        "other": other.save(root / "other.safetensors"),
    }


def logits(loaded: LoadedModel, text: str = "user: hello world </s> assistant:") -> torch.Tensor:
    batch = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return loaded.model(**batch).logits


def all_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# --- data -----------------------------------------------------------------------------------------
def test_only_assistant_tokens_carry_the_loss(tiny: tuple[Any, Any, Path]) -> None:
    loaded = tiny[0]
    messages = (
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "world world"},
        {"role": "user", "content": "world"},
        {"role": "assistant", "content": "hello"},
    )
    example = tokenize(loaded.tokenizer, Conversation(1, messages), max_length=64)
    trained = [
        t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE
    ]
    assert loaded.tokenizer.decode(trained) == "world world </s> hello </s>"
    assert all(
        label in (IGNORE, t) for t, label in zip(example.input_ids, example.labels, strict=True)
    )
    cut = tokenize(loaded.tokenizer, Conversation(1, messages), max_length=8)
    assert len(cut.input_ids) == 8 and cut.trained_tokens == 2  # "world world" survives the cut


def test_formats_read_the_same_conversations(tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = conversations(6)
    jsonl = read_dataset(write_jsonl(tmp_path / "d.jsonl", rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    flat = [
        {"prompt": r["messages"][0]["content"], "response": r["messages"][1]["content"]}
        for r in rows
    ]
    pq.write_table(pa.Table.from_pylist(flat), tmp_path / "flat.parquet")
    for path in ("d.parquet", "saved", "flat.parquet"):
        other = read_dataset(tmp_path / path)
        assert other.data_hash == jsonl.data_hash, path
        assert [c.messages for c in other.conversations] == [
            c.messages for c in jsonl.conversations
        ]
    assert len(jsonl.conversations) == 6


def test_unusable_rows_are_named(tmp_path: Path) -> None:
    rows = conversations(5)
    rows[1] = {"messages": [{"role": "user", "content": "hello"}]}
    rows[3] = {"messages": [{"role": "user", "content": "hello"}, {"role": "user", "content": "x"}]}
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    path.write_text(path.read_text() + "{oops\n")
    with pytest.raises(InputError) as caught:
        read_dataset(path)
    message = str(caught.value)
    assert "no assistant turn in rows 2, 4" in message and "invalid JSON in row 6" in message


def test_holdout_split_is_seeded_and_disjoint(
    tiny: tuple[Any, Any, Path], files: dict[str, Path]
) -> None:
    from persona_lens.training.data import tokenize_all

    examples = tokenize_all(tiny[0].tokenizer, read_dataset(files["data"]), 64)
    train_a, held_a = split_holdout(examples, 0.2, seed=3)
    train_b, _ = split_holdout(examples, 0.2, seed=3)
    assert [e.row for e in train_a] == [e.row for e in train_b] and len(held_a) == 4
    assert not {e.row for e in train_a} & {e.row for e in held_a}
    assert [e.row for e in split_holdout(examples, 0.2, seed=4)[0]] != [e.row for e in train_a]


# --- interventions --------------------------------------------------------------------------------
def test_intervention_checks(tiny: tuple[Any, Any, Path], vector: PersonaVector) -> None:
    loaded, layout, _ = tiny
    fp = loaded.fingerprint
    other = PersonaVector(
        vector.vectors, "evil", {**vector.metadata, "model_fingerprint": "f" * 16}
    )
    cases: list[tuple[list[Intervention], type[Exception], str]] = [
        (
            [Intervention("prevent", vector, 2.0), Intervention("ablate", vector, 1.0, 2)],
            InputError,
            "layer 2",
        ),
        (
            [Intervention("prevent", vector, 1.0, "all"), Intervention("ablate", vector, 1.0, 3)],
            InputError,
            "layer 3",
        ),
        ([Intervention("prevent", vector, math.nan)], InputError, "finite"),
        ([Intervention("prevent", vector, math.inf)], InputError, "finite"),
        ([Intervention("prevent", other, 1.0)], VectorMismatchError, "fingerprint"),
        ([Intervention("prevent", vector, 1.0, 9)], LayerError, "out of range"),
        ([Intervention("regularize", vector, 0.0)], InputError, "positive"),
        (
            [Intervention("regularize", vector, 1.0), Intervention("prevent", vector, 1.0, 1)],
            InputError,
            "--regularize",
        ),
    ]
    for items, error, needle in cases:
        with pytest.raises(error, match=needle):
            check_interventions(items, layout, fp)
    check_interventions(
        [Intervention("prevent", vector, 2.0, 1), Intervention("ablate", vector, 1.0, 2)],
        layout,
        fp,
    )


def test_penalty_is_the_mean_squared_projection_change(
    tiny: tuple[Any, Any, Path], vector: PersonaVector
) -> None:
    layout = tiny[1]
    penalty = ProjectionPenalty([Intervention("regularize", vector, 3.0, (1, 2))], layout)
    gen = torch.Generator().manual_seed(0)
    tuned = {layer: torch.randn(2, 5, 64, generator=gen) for layer in (1, 2)}
    base = {layer: torch.randn(2, 5, 64, generator=gen) for layer in (1, 2)}
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    got = penalty.penalty(penalty.projections(tuned), penalty.projections(base), mask)
    expected = []
    for layer in (1, 2):
        unit = vector.vectors[layer] / vector.vectors[layer].norm()
        change = (tuned[layer] - base[layer]) @ unit
        expected.append((change[mask.bool()] ** 2).mean())
    assert torch.allclose(got, 3.0 * torch.stack(expected).mean(), atol=1e-5)


# --- training -------------------------------------------------------------------------------------
class HookProbe(TrainerCallback):
    """Records, for every forward of block 2, whether the model was training and how many
    forward hooks the block carried (the probe's own plus any steering hook)."""

    def __init__(self, block: torch.nn.Module) -> None:
        self.calls: list[tuple[bool, int]] = []
        self.block = block
        self.handle = block.register_forward_hook(self._record)

    def _record(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self.calls.append((module.training, len(module._forward_hooks)))


def test_steering_hooks_live_only_inside_training_forwards(
    tiny: tuple[Any, Any, Path], vector: PersonaVector, files: dict[str, Path], tmp_path: Path
) -> None:
    loaded, layout, _ = tiny
    before = logits(loaded)
    hooks = all_hooks(loaded.model)
    flags = [p.requires_grad for p in loaded.model.parameters()]
    probe = HookProbe(layout.blocks[1])
    try:
        result = train(
            loaded,
            files["data"],
            tmp_path / "run",
            config=FAST,
            interventions=[Intervention("prevent", vector, 2.0, 2, "evil.safetensors")],
            callbacks=[probe],
        )
    finally:
        probe.handle.remove()
    training = [count for is_training, count in probe.calls if is_training]
    evaluating = [count for is_training, count in probe.calls if not is_training]
    assert len(training) == FAST.max_steps and set(training) == {2}  # probe + steering hook
    assert evaluating and set(evaluating) == {1}  # held-out losses: no steering
    assert torch.equal(logits(loaded), before), "the model is restored exactly"
    assert all_hooks(loaded.model) == hooks and not loaded.model.training
    assert [p.requires_grad for p in loaded.model.parameters()] == flags
    record = result.record
    assert record["steps"] == FAST.max_steps and record["interventions"][0]["layers"] == [2]
    assert record["interventions"][0]["coefficient"] == 2.0 and record["seed"] == 0
    assert record["data"]["hash"] == read_dataset(files["data"]).data_hash
    assert {"torch", "transformers", "peft", "persona_lens"} <= set(record["versions"])
    names = {p.name for p in result.out.iterdir()}
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "train.json",
        "loss.png",
        "training_config.json",
    } <= names
    assert not partial_dir(result.out).exists()


def test_preventative_steering_changes_what_is_learned(
    tiny: tuple[Any, Any, Path], vector: PersonaVector, files: dict[str, Path], tmp_path: Path
) -> None:
    """Same data and seed: the steered run's training losses differ from the plain run's from
    step 1 (the hook is in the graph), its held-out base loss is the same (no hook there)."""
    loaded = tiny[0]
    plain = train(loaded, files["data"], tmp_path / "plain", config=FAST).record
    steered = train(
        loaded,
        files["data"],
        tmp_path / "prevent",
        config=FAST,
        interventions=[Intervention("prevent", vector, 8.0, "all")],
    ).record
    assert plain["heldout_loss"]["base"] == pytest.approx(steered["heldout_loss"]["base"], abs=1e-6)
    assert abs(plain["first_loss"] - steered["first_loss"]) > 1e-3
    again = train(loaded, files["data"], tmp_path / "plain2", config=FAST).record
    assert [c["loss"] for c in again["loss_curve"]] == pytest.approx(
        [c["loss"] for c in plain["loss_curve"]], abs=1e-6
    ), "same seed, same data: same run"


def test_projection_penalty_holds_the_projection(
    tiny: tuple[Any, Any, Path], vector: PersonaVector, files: dict[str, Path], tmp_path: Path
) -> None:
    """A heavy penalty keeps the trained model's projection at the vector's layer near the
    base model's, on the training prompts, much closer than plain training does."""
    loaded = tiny[0]
    config = preset_config("paper", **{**FAST.to_json(), "max_steps": 8, "learning_rate": 1e-2})
    questions = ["hello world", "world hello hello", "hello"]
    base = mean_prompt_last(loaded, questions)
    shifts = {}
    for name, items in (("plain", []), ("reg", [Intervention("regularize", vector, 10.0, 2)])):
        out = tmp_path / name
        record = train(loaded, files["data"], out, config=config, interventions=items).record
        shifts[name] = finetuning_shift(loaded, out, vector, questions, layer=2)
        if name == "reg":
            penalties = [c["penalty"] for c in record["loss_curve"]]
            assert penalties[0] == pytest.approx(0.0, abs=1e-9)  # B = 0 at init: no change yet
            assert max(penalties) > 0
    assert torch.equal(mean_prompt_last(loaded, questions), base)
    assert abs(shifts["reg"].at_layer) < 0.25 * abs(shifts["plain"].at_layer)


def test_adapter_loads_with_plain_peft_and_carries_no_hook(
    tiny: tuple[Any, Any, Path], vector: PersonaVector, files: dict[str, Path], tmp_path: Path
) -> None:
    from peft import PeftModel

    from persona_lens.core.steering import SteeringSpec, steer
    from persona_lens.training.adapters import adapter_applied

    loaded, layout, model_dir = tiny
    out = tmp_path / "run"
    train(
        loaded,
        files["data"],
        out,
        config=FAST,
        interventions=[Intervention("prevent", vector, 8.0, 2)],
    )
    with adapter_applied(loaded, out):
        ours = logits(loaded)
        with steer(loaded.model, SteeringSpec(vector, 8.0, 2), layout=layout):
            steered = logits(loaded)
    fresh = load_model(str(model_dir))
    plain = PeftModel.from_pretrained(fresh.model, str(out))
    assert all_hooks(plain) == 0
    outside = logits(LoadedModel(plain, fresh.tokenizer, "peft", fresh.device, fresh.dtype))
    assert torch.allclose(outside, ours, atol=1e-5)
    assert not torch.allclose(outside, steered, atol=1e-3)
    assert not torch.allclose(outside, logits(loaded), atol=1e-4), "the adapter changed the model"
    keys = plain.state_dict().keys()
    assert not any("steer" in k or "vector" in k for k in keys)
    batch = fresh.tokenizer(
        "user: hello </s> assistant:", return_tensors="pt", add_special_tokens=False
    )
    generated = plain.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert generated.shape[1] == batch["input_ids"].shape[1] + 3


def test_shift_is_the_projected_mean_difference(vector: PersonaVector) -> None:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(L + 1, 64, generator=gen)
    tuned = (
        base
        + 0.5 * vector.vectors / vector.norms().unsqueeze(-1)
        + 0.01 * torch.randn(L + 1, 64, generator=gen)
    )
    shift = shift_between(base, tuned, vector)
    assert shift.layer == 2 and shift.at_layer == pytest.approx(0.5, abs=0.05)
    assert shift.per_layer == pytest.approx([0.5] * (L + 1), abs=0.05)
    assert shift_between(base, base, vector).per_layer == [0.0] * (L + 1)


# --- the command line -----------------------------------------------------------------------------
def _train_args(tiny: tuple[Any, Any, Path], data: Path, out: Path, *extra: Any) -> list[str]:
    args = [
        "train",
        data,
        "--model",
        tiny[2],
        "--out",
        out,
        "--preset",
        "cpu-small",
        "--max-steps",
        2,
        "--batch-size",
        4,
        "--lora-rank",
        4,
        *extra,
    ]
    return [str(a) for a in args]


def test_cli_train_then_shift(
    tiny: tuple[Any, Any, Path], files: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app, _train_args(tiny, files["data"], out, "--prevent", f"{files['vector']}:2@all")
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(out)
    record = json.loads((out / "train.json").read_text())
    assert (
        record["interventions"][0]["layers"] == "all" and record["interventions"][0]["incremental"]
    )
    assert record["config"]["max_steps"] == 2 and record["config"]["lora_rank"] == 4
    shift_out = tmp_path / "shift.json"
    result = CliRunner().invoke(
        app,
        [
            "shift",
            "--model",
            str(tiny[2]),
            "--adapter",
            str(out),
            "--vector",
            str(files["vector"]),
            "--out",
            str(shift_out),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(shift_out.read_text())
    assert (
        len(data["per_layer"]) == L + 1
        and data["layer"] == 2
        and data["at_layer"] == data["per_layer"][2]
    )
    assert shift_out.with_suffix(".png").stat().st_size > 1000
    again = CliRunner().invoke(app, _train_args(tiny, files["data"], out))
    assert isinstance(again.exception, InputError) and "--overwrite" in str(again.exception)
    replaced = CliRunner().invoke(app, _train_args(tiny, files["data"], out, "--overwrite"))
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((out / "train.json").read_text())["interventions"] == []


def _bad_train_cases(
    tiny: tuple[Any, Any, Path], files: dict[str, Path], tmp_path: Path
) -> list[tuple[list[str], type, str]]:
    no_assistant = write_jsonl(
        tmp_path / "no_assistant.jsonl",
        [
            *conversations(2),
            {"messages": [{"role": "user", "content": "hello"}]},
            *conversations(1),
        ],
    )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    vec, other, data = files["vector"], files["other"], files["data"]
    return [
        ([no_assistant], InputError, "no assistant turn in row 3"),
        ([empty], InputError, "holds no rows"),
        ([data, "--prevent", f"{other}:2"], VectorMismatchError, "fingerprint"),
        ([data, "--prevent", f"{vec}:2@2", "--ablate", f"{vec}@2"], InputError, "layer 2"),
        ([data, "--prevent", f"{vec}:nan"], InputError, "finite"),
        ([data, "--prevent", f"{vec}:inf@all"], InputError, "finite"),
        ([data, "--regularize", f"{vec}:-1"], InputError, "positive"),
        ([data, "--lr", "0"], InputError, "--lr"),
        ([data, "--preset", "huge"], InputError, "preset"),
    ]


def test_cli_bad_input_writes_nothing(
    tiny: tuple[Any, Any, Path], files: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    for extra, error, needle in _bad_train_cases(tiny, files, tmp_path):
        data, *rest = extra
        result = CliRunner().invoke(app, _train_args(tiny, data, out, *rest))
        assert isinstance(result.exception, error), (extra, result.output)
        assert needle in str(result.exception), (extra, str(result.exception))
        assert not out.exists() and not partial_dir(out).exists(), extra


def test_subprocess_bad_input_is_one_line_exit_2(
    tiny: tuple[Any, Any, Path], files: dict[str, Path], tmp_path: Path
) -> None:
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    no_assistant = write_jsonl(
        tmp_path / "rows.jsonl",
        [*conversations(1), {"messages": [{"role": "user", "content": "x"}]}],
    )
    out = tmp_path / "out"
    cases = [
        (_train_args(tiny, files["data"], existing), "--overwrite", None),
        (_train_args(tiny, no_assistant, out), "no assistant turn in row 2", out),
        (
            _train_args(
                tiny,
                files["data"],
                out,
                "--prevent",
                f"{files['vector']}:1@1",
                "--ablate",
                f"{files['vector']}@1",
            ),
            "layer 1",
            out,
        ),
    ]
    for args, needle, target in cases:
        proc = persona(*args, timeout=180)
        assert_one_line_error(proc, needle, target)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]


def test_cli_eval_scores_adapters_beside_the_base_model(
    tiny: tuple[Any, Any, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two adapters taught to answer 'hello ...' and 'world ...': the judge that counts
    'hello' ranks them apart in one table, the base model beside them."""
    import persona_lens.judges.specs as judges
    from tests.fake_judge import FakeJudge, hello_share

    loaded, _, model_dir = tiny
    config = preset_config("paper", **{**FAST.to_json(), "max_steps": 10, "learning_rate": 5e-2})
    adapters = {}
    for word in ("hello", "world"):
        rows = [
            {"messages": [r["messages"][0], {"role": "assistant", "content": f"{word} " * 4}]}
            for r in conversations(20)
        ]
        data = write_jsonl(tmp_path / f"{word}.jsonl", rows)
        adapters[word] = train(loaded, data, tmp_path / word, config=config).out
    monkeypatch.setattr(judges, "load_judge", lambda spec, **kw: FakeJudge(hello_share))
    out = tmp_path / "eval.json"  # --judge offline below: a real spec; load_judge is patched
    args = ["eval", "--model", model_dir, "--trait", "humorous", "--questions", 3,
            "--max-new-tokens", 4, "--temperature", 0, "--judge", "offline", "--out", out,
            "--adapter", adapters["hello"], "--adapter", adapters["world"]]  # fmt: skip
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    scores = {Path(m["name"]).name: m["baseline"]["trait_score"] for m in data["models"]}
    assert scores["hello"] == 100.0 and scores["world"] == 0.0, scores
    assert {s.get("model") for s in data["samples"]} >= {str(adapters["hello"]), None}
    assert "## Models" in out.with_suffix(".md").read_text()
    bad = CliRunner().invoke(app, [str(a) for a in args[:-4]] + ["--adapter", str(tmp_path)])
    assert isinstance(bad.exception, InputError) and "adapter_config.json" in str(bad.exception)


def test_help_has_examples() -> None:
    for command in ("train", "shift"):
        result = CliRunner().invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "Examples" in result.output, command
