"""Tests of persona_lens.interop.prompts_io: prompt JSONL, atomic JSONL output, --steer and
--monitor values."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from persona_lens.core.errors import InputError
from persona_lens.interop.prompts_io import (
    SteerArg,
    VectorRef,
    parse_layers,
    parse_steer,
    parse_vector_ref,
    read_prompts,
    unique_names,
    write_jsonl,
)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- read_prompts -------------------------------------------------------------------------------
def test_read_prompts_keeps_fields_and_skips_blank_lines(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "p.jsonl",
        '{"prompt": "hi", "id": 7}\n\n   \n'
        '{"messages": [{"role": "user", "content": "yo"}], "tag": ["a"]}\n',
    )
    records = read_prompts(path)
    assert records == [
        {"prompt": "hi", "id": 7},
        {"messages": [{"role": "user", "content": "yo"}], "tag": ["a"]},
    ]


@pytest.mark.parametrize(
    ("lines", "line_no", "needle"),
    [
        (['{"prompt": "a"}', "", "{not json"], 3, "not valid JSON"),
        (['{"prompt": "a"}', "[1, 2]"], 2, "expected a JSON object"),
        (['{"text": "a"}'], 1, "'messages' list or a 'prompt' string"),
        (['{"prompt": 5}'], 1, "'prompt' string"),
        (['{"messages": []}'], 1, "non-empty list"),
        (['{"messages": [{"role": "user"}]}'], 1, "'role' and 'content'"),
    ],
)
def test_read_prompts_names_the_bad_line(
    tmp_path: Path, lines: list[str], line_no: int, needle: str
) -> None:
    path = _write(tmp_path / "bad.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(InputError) as info:
        read_prompts(path)
    message = str(info.value)
    assert f"bad.jsonl:{line_no}:" in message and needle in message
    assert "\n" not in message


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_read_prompts_empty_file(tmp_path: Path, text: str) -> None:
    with pytest.raises(InputError, match="holds no prompts"):
        read_prompts(_write(tmp_path / "e.jsonl", text))


def test_read_prompts_missing_and_binary(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no prompt file"):
        read_prompts(tmp_path / "nope.jsonl")
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(b'{"prompt": "\xff\xfe"}\n')
    with pytest.raises(InputError, match="not UTF-8"):
        read_prompts(binary)


# --- write_jsonl --------------------------------------------------------------------------------
def test_write_jsonl_round_trip_and_strict_json(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "out.jsonl"
    records = [{"a": 1, "p": {"x": float("nan")}, "t": [1.5, float("inf")]}, {"é": "ü"}]
    assert write_jsonl(out, records) == out
    lines = out.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [
        {"a": 1, "p": {"x": None}, "t": [1.5, None]},
        {"é": "ü"},
    ]
    assert "NaN" not in out.read_text(encoding="utf-8")
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.jsonl"]


def test_write_jsonl_is_atomic_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")

    def records() -> Iterator[dict[str, Any]]:
        yield {"ok": 1}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_jsonl(out, records())
    assert out.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_write_jsonl_refuses_a_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="is a directory"):
        write_jsonl(tmp_path, [{"a": 1}])


# --- --steer / --monitor ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("humorous.safetensors:2", SteerArg(Path("humorous.safetensors"), 2.0, None)),
        ("h.safetensors:-1.5@12", SteerArg(Path("h.safetensors"), -1.5, 12)),
        ("h.safetensors:1e-1@all", SteerArg(Path("h.safetensors"), 0.1, "all")),
        ("h.safetensors:2@3-5", SteerArg(Path("h.safetensors"), 2.0, (3, 4, 5))),
        ("h.safetensors:2@3,7", SteerArg(Path("h.safetensors"), 2.0, (3, 7))),
        ("C:/vec/h.safetensors:3", SteerArg(Path("C:/vec/h.safetensors"), 3.0, None)),
        ("/u@host/h.safetensors:3", SteerArg(Path("/u@host/h.safetensors"), 3.0, None)),
        ("/u@host/h.safetensors:3@4", SteerArg(Path("/u@host/h.safetensors"), 3.0, 4)),
    ],
)
def test_parse_steer(text: str, expected: SteerArg) -> None:
    assert parse_steer(text) == expected


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("x.safetensors:abc", "coefficient 'abc' is not a number"),
        ("x.safetensors", "expected VEC:COEF"),
        (":2", "expected VEC:COEF"),
        ("x.safetensors:nan", "finite"),
        ("x.safetensors:inf", "finite"),
        ("x.safetensors:2@top", "'top' is not a layer"),
        ("x.safetensors:2@", "is not a layer"),
        ("x.safetensors:2@5-3", "empty"),
    ],
)
def test_parse_steer_errors(text: str, needle: str) -> None:
    with pytest.raises(InputError) as info:
        parse_steer(text)
    assert needle in str(info.value)


def test_parse_vector_ref_and_layers() -> None:
    assert parse_vector_ref("v.safetensors") == VectorRef(Path("v.safetensors"), None)
    assert parse_vector_ref("v.safetensors@0") == VectorRef(Path("v.safetensors"), 0)
    assert parse_vector_ref("a@b/v.safetensors") == VectorRef(Path("a@b/v.safetensors"), None)
    assert parse_layers("ALL") == "all"
    assert parse_layers(" 4 ") == 4
    with pytest.raises(InputError):
        parse_vector_ref("  ")
    with pytest.raises(InputError):
        parse_layers("-3")


def test_unique_names() -> None:
    assert unique_names(["evil", "kind"], [3, 3]) == ["evil", "kind"]
    assert unique_names(["evil", "evil", "kind"], [3, 5, 3]) == ["evil@3", "evil@5", "kind"]
    with pytest.raises(InputError, match="twice"):
        unique_names(["evil", "evil"], [3, 3])


# --- roles, prefill, context (need the tiny model) --------------------------------------------
@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.tiny import load_tiny

    return load_tiny(tmp_path_factory.mktemp("tiny"), seed=0)[0]


def test_prefill_is_continued_not_answered(tiny_lm: Any) -> None:
    """A record's "prefill" starts the reply: the prompt ends with it, with no end-of-turn."""
    from persona_lens.core.generation import generate, render_prompt

    record = {"prompt": "hello", "prefill": "world world"}
    text = render_prompt(tiny_lm.tokenizer, record)
    assert text.endswith("assistant: world world")
    plain = render_prompt(tiny_lm.tokenizer, {"prompt": "hello"})
    assert plain.endswith("assistant: ") and text.startswith(plain.rstrip())
    (gen,) = generate(tiny_lm.model, tiny_lm.tokenizer, [record], max_new_tokens=2)
    assert gen.prompt_text == text


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        ([{"role": "wizard", "content": "x"}], "role 'wizard'"),
        ([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}], "only come"),
        ([{"role": "assistant", "content": "x"}], "no user message"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "prefill"),
        ([{"role": "user", "content": "  "}], "(user) is empty"),
    ],
)
def test_generate_refuses_conversations_it_cannot_answer(
    tiny_lm: Any, messages: list[dict[str, str]], needle: str
) -> None:
    from persona_lens.core.generation import generate

    with pytest.raises(InputError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        generate(tiny_lm.model, tiny_lm.tokenizer, [messages], max_new_tokens=1)


def test_fit_prompts_refuses_or_cuts_long_prompts(tmp_path: Path, tiny_lm: Any) -> None:
    from persona_lens.interop.prompts_io import context_length, fit_prompts, read_prompt_file

    assert context_length(tiny_lm.model) == 64
    path = _write(
        tmp_path / "p.jsonl", '{"prompt": "hi"}\n\n' + json.dumps({"prompt": "hello " * 70}) + "\n"
    )
    prompts = read_prompt_file(path)
    assert prompts.lines == [1, 3]
    with pytest.raises(InputError, match=r"p.jsonl:3: the prompt has 75 tokens"):
        fit_prompts(prompts, tiny_lm.model, tiny_lm.tokenizer, max_new_tokens=8)
    fitted = fit_prompts(
        prompts, tiny_lm.model, tiny_lm.tokenizer, max_new_tokens=8, max_prompt_tokens=30
    )
    assert fitted[0] == {"prompt": "hi"}
    assert fitted[1]["prompt"].split() == ["hello"] * 25 and fitted[1]["prompt_tokens_cut"] == 45
    assert prompts.records[1]["prompt"] == "hello " * 70  # the input record is untouched
