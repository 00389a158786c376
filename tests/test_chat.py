"""``ChatSession`` and ``persona chat`` on a tiny Llama: history through the chat template,
per-turn projections, /steer /monitor /guard /reset /save, and bad commands that keep the
session alive."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from persona_lens.cli import app
from persona_lens.core.errors import InputError, LayerError, PersonaLensError, VectorMismatchError
from persona_lens.core.generation import generate
from persona_lens.core.models import LoadedModel, load_model, model_fingerprint
from persona_lens.core.vectors import PersonaVector
from persona_lens.monitoring.chat import NEUTRAL_EXCHANGE, ChatSession
from tests.tiny import HIDDEN_SIZE, tiny_model_dir

L = 4


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat")
    model_dir = tiny_model_dir(root / "model", seed=9, num_layers=L)
    lm = load_model(str(model_dir))
    fingerprint = model_fingerprint(lm.model, lm.tokenizer)
    gen = torch.Generator().manual_seed(2)
    (root / "vectors").mkdir()

    def save(name: str, fp: str = fingerprint, folder: str = ".") -> Path:
        meta = {"model_fingerprint": fp, "best_layer": "2"}
        vector = PersonaVector(torch.randn(L + 1, HIDDEN_SIZE, generator=gen), name, meta)
        return vector.save(root / folder / f"{name}.safetensors")

    return {
        "root": root,
        "model": model_dir,
        "humorous": save("humorous"),
        "evil": save("evil"),
        "stored": save("optimistic", folder="vectors"),
        "other": save("other", fp="f" * 16),
    }


@pytest.fixture(scope="module")
def loaded(env: dict[str, Path]) -> LoadedModel:
    return load_model(str(env["model"]))


@pytest.fixture
def session(loaded: LoadedModel, env: dict[str, Path]) -> ChatSession:
    return ChatSession.from_loaded(loaded, max_new_tokens=4, vector_dir=env["root"] / "vectors")


def _or_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def _unit(path: Path, layer: int = 2) -> torch.Tensor:
    row = PersonaVector.load(path).at(layer)
    return row / row.norm()


def test_history_goes_through_the_chat_template(
    session: ChatSession, loaded: LoadedModel, env: dict[str, Path]
) -> None:
    session.command(f"/monitor {env['humorous']}")
    first = session.send("hello world")
    second = session.send("world")
    assert [t.index for t in session.turns] == [1, 2]
    assert [m["role"] for m in session.history] == ["user", "assistant"] * 2
    assert session.history[1]["content"] == first.reply
    # the second reply is exactly what generate gives for the whole conversation
    again = generate(
        loaded.model,
        loaded.tokenizer,
        [session.messages()[:3]],
        max_new_tokens=4,
        capture_layers=(),
    )[0]
    assert second.reply == again.response.strip()
    assert "world" in again.prompt_text and first.reply in again.prompt_text
    for turn in (first, second):
        assert set(turn.projections) == set(turn.prompt_projections) == {"humorous"}
        scale = session.scales["humorous"]
        assert turn.levels["humorous"] == pytest.approx(
            (turn.projections["humorous"] - scale.baseline) / scale.scale
        )
    assert session.command("/reset") == "conversation cleared"
    assert session.history == [] and session.turns == []


def test_steer_moves_the_prompt_projection_by_the_added_vector(
    session: ChatSession, env: dict[str, Path]
) -> None:
    session.command("/monitor " + str(env["evil"]))
    plain = session.send("hello")
    session.command("/reset")
    message = session.command(f"/steer {env['humorous']} +1.5")
    assert message == "steering humorous: +1.5 at layer 2"
    steered = session.send("hello")
    added = 1.5 * PersonaVector.load(env["humorous"]).at(2)
    delta = steered.prompt_projections["evil"] - plain.prompt_projections["evil"]
    assert delta == pytest.approx(float(added @ _unit(env["evil"])), rel=1e-3, abs=1e-4)
    assert steered.steering == {"humorous": 1.5}
    # by trait name once loaded, with a layer, and off again
    assert session.command("/steer humorous -2@3") == "steering humorous: -2 at layer 3"
    assert session.command("/steer humorous off") == "steering humorous: off"
    assert session.steering == {}
    session.command("/steer humorous 1")
    assert session.command("/steer off") == "steering: off" and session.steering == {}
    # NAME resolves to VECTOR_DIR/NAME.safetensors
    assert session.command("/steer optimistic 1") == "steering optimistic: +1 at layer 2"


def test_guard_fires_and_is_recorded(session: ChatSession, env: dict[str, Path]) -> None:
    message = session.command(f"/guard {env['evil']} -1e9 -3")
    assert message.startswith("guarding evil: above -1e+09 gap at layer 2 (raw projection")
    assert message.endswith("steer -3 at layer 2 for the rest of the reply")
    turn = session.send("hello world")
    assert [(e.guard, e.token_index) for e in turn.guard_events] == [("evil", 0)]
    assert session.command("/guard off") == "guards: off"
    assert session.send("hello").guard_events == []


def test_guard_threshold_is_in_the_meters_unit(
    session: ChatSession, loaded: LoadedModel, env: dict[str, Path]
) -> None:
    """A guard fires at the first reply token whose meter level (gaps from a neutral reply)
    passes the threshold, and reports that level: one unit for meters and guards."""
    from persona_lens.core.capture import Monitor

    session.max_new_tokens = 8
    session.command(f"/monitor {env['evil']}")
    scale = session.scales["evil"]
    vector = PersonaVector.load(env["evil"])
    (plain,) = generate(
        loaded.model,
        loaded.tokenizer,
        [session.messages("hello world")],
        max_new_tokens=8,
        monitors=[Monitor("evil", vector.at(2), 2)],
    )
    levels = [scale.level(p) for p in plain.token_projections["evil"]]
    assert len(levels) >= 3
    threshold = (min(levels) + max(levels)) / 2
    assert min(levels) < threshold < max(levels)
    first = next(i for i, level in enumerate(levels) if level > threshold)
    session.guard(str(env["evil"]), threshold, 0.0)  # coefficient 0: watch, change nothing
    raw = session.guards["evil"].threshold
    assert raw == pytest.approx(scale.baseline + threshold * scale.scale)
    turn = session.send("hello world")
    (event,) = turn.guard_events
    assert event.token_index == first
    assert turn.guard_event_levels[0] == pytest.approx(levels[first], abs=1e-4)
    assert turn.guard_event_levels[0] > threshold
    saved = session.to_dict()
    assert saved["unit"] == "gap" and saved["guards"]["evil"]["threshold"] == threshold


def test_save_writes_per_turn_projections(
    session: ChatSession, env: dict[str, Path], tmp_path: Path
) -> None:
    session.command(f"/monitor {env['humorous']}")
    session.command(f"/monitor {env['evil']}@3")
    turns = [session.send(text) for text in ("hello", "world", "hello world")]
    out = tmp_path / "talk.json"
    assert session.command(f"/save {out}") == f"saved 3 turns to {out}"
    data = json.loads(out.read_text())
    assert [t["user"] for t in data["turns"]] == ["hello", "world", "hello world"]
    assert data["monitors"]["evil"]["layer"] == 3
    for name in ("humorous", "evil"):
        # an empty reply has no projection: NaN in the record, null in the file
        expected = [_or_none(t.projections[name]) for t in turns]
        assert data["drift"][name] == pytest.approx(expected)
        assert any(value is not None for value in expected)
        for saved, turn in zip(data["turns"], turns, strict=True):
            assert saved["prompt_projections"][name] == pytest.approx(turn.prompt_projections[name])
    assert session.scales["evil"].scale == pytest.approx(
        float(PersonaVector.load(env["evil"]).at(3).norm())
    )
    assert NEUTRAL_EXCHANGE[1]  # the baseline exchange is fixed text


@pytest.mark.parametrize(
    ("line", "error", "needle"),
    [
        ("/bogus", InputError, "unknown command"),
        ("steer", InputError, "start with '/'"),
        ("/steer nothing 1", InputError, "unknown trait or vector file 'nothing'"),
        ("/steer humorous", InputError, "usage: /steer"),
        ("/steer humorous abc", InputError, "not a number"),
        ("/steer humorous 1@99", LayerError, "out of range"),
        ("/steer humorous nan", InputError, "finite"),
        ("/monitor", InputError, "usage: /monitor"),
        ("/monitor humorous@x", InputError, "not a layer"),
        ("/guard humorous", InputError, "usage: /guard"),
        ("/guard humorous high", InputError, "not a number"),
        ("/save", InputError, "usage: /save"),
        ("/reset now", InputError, "no arguments"),
        ('/steer "humorous 1', InputError, "cannot parse"),
    ],
)
def test_bad_commands_raise_one_clear_error(
    session: ChatSession, env: dict[str, Path], line: str, error: type[Exception], needle: str
) -> None:
    session.command(f"/monitor {env['humorous']}")
    with pytest.raises(error) as info:
        session.command(line)
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert session.send("hello").reply is not None  # still alive


def test_vector_for_another_model_is_refused(session: ChatSession, env: dict[str, Path]) -> None:
    with pytest.raises(VectorMismatchError, match="fingerprint"):
        session.command(f"/monitor {env['other']}")
    with pytest.raises(PersonaLensError):
        session.send("   ")
    assert session.command("/quit") == "bye" and session.closed


def test_cli_chat_session(env: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "talk.json"
    script = "\n".join(
        [
            "hello",
            f"/steer {env['humorous']} +1.5",
            "/steer nothing 2",
            "/frobnicate",
            "world hello",
            "/guard humorous -1e9",
            "hello",
            f"/save {out}",
            "/help",
            "/quit",
            "never sent",
        ]
    )
    result = CliRunner().invoke(
        app,
        [
            "chat",
            "--model",
            str(env["model"]),
            "--monitor",
            str(env["evil"]),
            "--max-new-tokens",
            "3",
            "--vector-dir",
            str(env["root"] / "vectors"),
        ],
        input=script + "\n",
    )
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "monitoring evil at layer 2" in text
    assert text.count("assistant>") == 3
    assert "steering humorous: +1.5 at layer 2" in text
    assert "error: unknown trait or vector file 'nothing'" in text
    assert "error: unknown command /frobnicate" in text
    assert "guard humorous: token 0" in text
    assert "/steer TRAIT COEF" in text and "bye" in text
    assert "│" in text and "last prompt token" in text
    saved = json.loads(out.read_text())
    assert [t["user"] for t in saved["turns"]] == ["hello", "world hello", "hello"]
    assert [t["steering"] for t in saved["turns"]] == [{}, {"humorous": 1.5}, {"humorous": 1.5}]
    assert len(saved["drift"]["evil"]) == 3


def test_cli_chat_bad_start_is_a_user_error(env: dict[str, Path]) -> None:
    for args, error in (
        (["--guard", f"{env['evil']}:high"], InputError),
        (["--steer", f"{env['root']}/missing.safetensors:1"], PersonaLensError),
        (["--monitor", str(env["other"])], VectorMismatchError),
    ):
        result = CliRunner().invoke(
            app, ["chat", "--model", str(env["model"]), *args], input="/quit\n"
        )
        assert isinstance(result.exception, error), (args, result.output)


def test_cli_chat_end_of_input_hints_at_save_first(env: dict[str, Path]) -> None:
    """Ctrl-D (end of input) with unsaved turns shows the /save hint; a second one leaves."""
    result = CliRunner().invoke(
        app,
        ["chat", "--model", str(env["model"]), "--max-new-tokens", "2"],
        input="hello\n",  # then end of input, twice
    )
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "/save FILE keeps the conversation (1 unsaved turns)" in text
    assert text.rstrip().endswith("bye")
    assert text.index("assistant>") < text.index("/save FILE keeps") < text.index("bye")
