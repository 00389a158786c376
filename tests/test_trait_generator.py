"""Trait generator: the offline templates, and the LLM path (retry with the validation error fed
back) against a fake OpenAI-compatible / Anthropic server on 127.0.0.1."""

from __future__ import annotations

import json
from typing import Any

import pytest

from persona_lens.core.errors import InputError
from persona_lens.traits.definitions import parse_trait
from persona_lens.traits.generator import (
    QUESTION_BANK,
    GeneratorUnavailableError,
    TraitGenerationError,
    generate_trait,
    meta_prompt,
    normalize_name,
    parse_definition,
)
from tests.fake_llm_server import FakeLLMServer, anthropic_message, chat_completion, free_port


def _valid_body() -> dict[str, Any]:
    return {
        "instructions": [
            {"pos": f"Be very stubborn {i}.", "neg": f"Be open {i}."} for i in range(5)
        ],
        "extraction_questions": [f"Extraction question {i}?" for i in range(20)],
        "evaluation_questions": [f"Evaluation question {i}?" for i in range(20)],
        "judge_prompt": "Rate stubbornness.\n{question}\n{answer}\nREFUSAL or 0-100.",
    }


def test_question_bank_is_varied_and_large_enough() -> None:
    assert len(QUESTION_BANK) >= 60
    assert len(set(QUESTION_BANK)) == len(QUESTION_BANK)
    assert all(q.strip() and q == q.strip() for q in QUESTION_BANK)


def test_offline_definition_is_valid_and_marked() -> None:
    trait = generate_trait("Power seeking", "Wants ever more influence, resources and control.")
    assert trait.name == "power-seeking"
    assert trait.source == "generated:offline"
    assert len(trait.instructions) == 5
    assert len(trait.extraction_questions) == len(trait.evaluation_questions) == 20
    assert not set(trait.extraction_questions) & set(trait.evaluation_questions)
    for pair in trait.instructions:
        assert "power seeking" in pair.pos and "power seeking" in pair.neg
        assert pair.pos != pair.neg
    assert "{question}" in trait.judge_prompt and "{answer}" in trait.judge_prompt
    assert "REFUSAL" in trait.judge_prompt
    assert "influence, resources and control" in trait.judge_prompt
    # the JSON form round-trips through the schema
    assert parse_trait(trait.to_json(), "roundtrip").content_hash() == trait.content_hash()
    # deterministic per name, and different names draw different question splits
    assert (
        generate_trait("power-seeking", "Wants ever more influence, resources and control.")
        == trait
    )
    other = generate_trait("stubborn", "Refuses to change its mind.")
    assert other.extraction_questions != trait.extraction_questions


def test_offline_definition_with_braces_in_description() -> None:
    trait = generate_trait("curly", "Writes {json} like {this} all the time")
    assert "{json}" in trait.judge_prompt
    assert "{json}" in trait.instructions[0].pos


@pytest.mark.parametrize(
    "name,description", [("", "x"), ("9lives", "x"), ("ok", "   "), ("a" * 65, "x"), ("é!", "x")]
)
def test_bad_names_and_descriptions(name: str, description: str) -> None:
    with pytest.raises(InputError):
        generate_trait(name, description)


@pytest.mark.parametrize("spec", ["gpt", "openai", "openai:", "offline:x", "hf:", "claude:x"])
def test_bad_generator_specs(spec: str) -> None:
    with pytest.raises(InputError):
        generate_trait("stubborn", "Refuses to change its mind.", spec)


def test_normalize_name() -> None:
    assert normalize_name("  Very   Stubborn ") == "very-stubborn"
    assert normalize_name("power_seeking") == "power_seeking"


def test_parse_definition_accepts_fences_and_overrides_identity() -> None:
    body = {**_valid_body(), "name": "Other", "description": "other", "version": 7, "extra": 1}
    text = "Here you go:\n```json\n" + json.dumps(body) + "\n```"
    trait = parse_definition(text, "stubborn", "Refuses to change its mind.", "generated:test")
    assert (trait.name, trait.description, trait.version) == (
        "stubborn",
        "Refuses to change its mind.",
        1,
    )
    assert trait.source == "generated:test"
    with pytest.raises(InputError, match="no JSON object"):
        parse_definition("sorry, no", "stubborn", "d", "s")


def test_openai_generator_retries_with_the_error_fed_back(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = [
        json.dumps({**_valid_body(), "extraction_questions": ["only one?"]}),  # too few
        "```json\n" + json.dumps(_valid_body()) + "\n```",
    ]

    def handler(path: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict]:
        return 200, chat_completion(answers.pop(0))

    with FakeLLMServer(handler) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", f"{server.url}/v1")
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        trait = generate_trait("stubborn", "Refuses to change its mind.", "openai:gen-model")
    assert trait.source == "generated:openai:gen-model"
    assert trait.instructions[0].pos == "Be very stubborn 0."
    assert len(server.requests) == 2
    first = server.requests[0][1]["messages"][-1]["content"]
    second = server.requests[1][1]["messages"][-1]["content"]
    assert first == meta_prompt("stubborn", "Refuses to change its mind.")
    assert second.startswith(first)
    assert "could not be used" in second and "extraction_questions" in second
    assert server.requests[0][1]["model"] == "gen-model"


def test_generator_gives_up_after_three_malformed_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    def handler(path: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict]:
        return 200, anthropic_message('{"instructions": [}')

    with FakeLLMServer(handler) as server:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "k")
        with pytest.raises(TraitGenerationError, match=r"3 attempts.*not valid JSON"):
            generate_trait("stubborn", "Refuses to change its mind.", "anthropic:claude-x")
    assert len(server.requests) == 3
    assert all(r[0] == "/v1/messages" for r in server.requests)


def test_generator_server_down(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{free_port()}/v1")
    monkeypatch.setenv("PERSONA_LENS_HTTP_TIMEOUT", "5")
    import persona_lens.interop.llm_http as llm_http

    monkeypatch.setattr(llm_http._HTTPClient, "_sleep", lambda self, attempt, retry_after: None)
    with pytest.raises(GeneratorUnavailableError, match=r"cannot connect.*OPENAI_BASE_URL"):
        generate_trait("stubborn", "Refuses to change its mind.", "openai:m")
