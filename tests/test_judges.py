"""Judges: logprob aggregation, the OpenAI/Anthropic HTTP paths against a fake loopback server,
the hf trie scoring on a scripted model, the offline judge, and its agreement with hand labels."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from persona_lens.core.errors import InputError, PersonaLensError
from persona_lens.interop.llm_http import AnthropicClient, OpenAIClient
from persona_lens.judges.api import APIJudge
from persona_lens.judges.base import (
    COHERENCE_PROMPT,
    JudgeItem,
    JudgeScore,
    JudgeUnavailableError,
    aggregate_logprobs,
    fill_prompt,
    parse_score_text,
)
from persona_lens.judges.offline import OfflineJudge, coherence_score, fit_logistic
from persona_lens.judges.specs import load_judge, parse_judge_spec
from persona_lens.traits.definitions import load_trait
from tests.fake_llm_server import FakeLLMServer, anthropic_message, chat_completion, free_port

LABELLED = Path(__file__).parent / "data" / "labelled_responses.jsonl"


def _top(pairs: list[tuple[str, float]]) -> list[tuple[str, float]]:
    return [(t, math.log(p)) for t, p in pairs]


# --- pure scoring ---------------------------------------------------------------------------


def test_aggregate_weighted_mean_merges_spaced_tokens() -> None:
    score = aggregate_logprobs(_top([("80", 0.4), (" 80", 0.1), ("90", 0.3), ("The", 0.2)]))
    assert score.score == pytest.approx((80 * 0.5 + 90 * 0.3) / 0.8)
    assert not score.refusal


def test_aggregate_discards_under_quarter_mass_and_ignores_out_of_range() -> None:
    assert aggregate_logprobs(_top([("70", 0.24), ("I", 0.76)])) == JudgeScore(None)
    # 150 and -5 are not scores; 0 and 100 are
    score = aggregate_logprobs(_top([("150", 0.5), ("0", 0.2), ("100", 0.2), ("x", 0.1)]))
    assert score.score == pytest.approx(50.0)


def test_aggregate_refusal() -> None:
    score = aggregate_logprobs(_top([("REF", 0.7), ("50", 0.1), ("I", 0.2)]))
    assert score == JudgeScore(None, refusal=True)
    # numbers above the threshold win over a refusal token
    assert aggregate_logprobs(_top([("REF", 0.4), ("50", 0.3)])).score == pytest.approx(50.0)


def test_parse_score_text() -> None:
    assert parse_score_text(" 73\n") == JudgeScore(73.0)
    assert parse_score_text("Score: 12.5") == JudgeScore(12.5)
    assert parse_score_text("REFUSAL") == JudgeScore(None, refusal=True)
    assert parse_score_text("I'd say 250") == JudgeScore(None)
    assert parse_score_text("no idea") == JudgeScore(None)


def test_fill_prompt_leaves_other_braces_alone() -> None:
    text = fill_prompt('Q={question} A={answer} json={"k": 1}', "what {answer}?", "a {question}")
    assert text == 'Q=what {answer}? A=a {question} json={"k": 1}'


@pytest.mark.parametrize(
    "spec", ["", "gpt-4", "openai", "openai:", "anthropic: ", "hf:", "none:x", "offline:bert"]
)
def test_malformed_specs(spec: str) -> None:
    with pytest.raises(InputError):
        load_judge(spec)


def test_spec_parsing_keeps_colons_in_model_names() -> None:
    assert parse_judge_spec("openai:llama3:8b") == ("openai", "llama3:8b")
    assert parse_judge_spec("offline") == ("offline", "")
    assert load_judge("none").score_trait(load_trait("evil"), [JudgeItem("q", "a")]) == [
        JudgeScore(None)
    ]


# --- OpenAI-compatible HTTP path ------------------------------------------------------------


def _answer_of(body: dict[str, Any]) -> str:
    content = body["messages"][-1]["content"]
    match = re.search(r"<answer>\n(.*?)\n</answer>", content, re.S)
    return match.group(1) if match else ""


def _scripted(path: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict]:
    """Answers 'score N' -> all mass on N; 'split' -> 80/90 mix; 'refuse'; 'vague'."""
    answer = _answer_of(body)
    if answer.startswith("score "):
        return 200, chat_completion(answer[6:], [(answer[6:], 0.9), ("x", 0.1)])
    if answer == "split":
        return 200, chat_completion("80", [("80", 0.5), ("90", 0.3), ("I", 0.2)])
    if answer == "refuse":
        return 200, chat_completion("REF", [("REF", 0.8), ("I", 0.2)])
    return 200, chat_completion("I", [("I", 0.9), ("50", 0.1)])


def _openai_judge(url: str, monkeypatch: pytest.MonkeyPatch, **kwargs: Any) -> APIJudge:
    monkeypatch.setenv("OPENAI_BASE_URL", f"{url}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    client = OpenAIClient("judge-model", backoff=0.01, error=JudgeUnavailableError, **kwargs)
    return APIJudge("openai:judge-model", client, concurrency=4)


def test_openai_judge_scores_with_logprobs(monkeypatch: pytest.MonkeyPatch) -> None:
    trait = load_trait("evil")
    items = [JudgeItem(f"q{i}", f"score {i * 10}") for i in range(8)]
    items += [JudgeItem("q", "split"), JudgeItem("q", "refuse"), JudgeItem("q", "vague")]
    with FakeLLMServer(_scripted) as server:
        judge = _openai_judge(server.url, monkeypatch)
        scores = judge.score_trait(trait, items)
    assert [s.score for s in scores[:8]] == [pytest.approx(i * 10) for i in range(8)]
    assert scores[8].score == pytest.approx((80 * 0.5 + 90 * 0.3) / 0.8)
    assert scores[9] == JudgeScore(None, refusal=True)
    assert scores[10] == JudgeScore(None)
    path, body, headers = server.requests[0]
    assert path == "/v1/chat/completions"
    assert body["model"] == "judge-model"
    assert body["logprobs"] is True and body["top_logprobs"] == 20
    assert body["max_tokens"] == 1 and body["temperature"] == 0
    assert headers["authorization"] == "Bearer test-key"
    assert "evil" in body["messages"][-1]["content"]


def test_openai_judge_coherence_prompt_and_override(monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeLLMServer(_scripted) as server:
        judge = _openai_judge(server.url, monkeypatch)
        assert judge.score_coherence([JudgeItem("hi", "score 77")]) == [JudgeScore(77.0)]
        trait = load_trait("evil")
        custom = type(trait)(**{**trait.__dict__, "coherence_prompt": "C {question} {answer}"})
        judge.score_coherence([JudgeItem("hi", "score 5")], custom)
    first = server.requests[0][1]["messages"][-1]["content"]
    assert first == fill_prompt(COHERENCE_PROMPT, "hi", "score 77")
    assert server.requests[1][1]["messages"][-1]["content"] == "C hi score 5"


def test_openai_judge_retries_429_and_5xx(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}

    def flaky(path: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict]:
        calls["n"] += 1
        if calls["n"] == 1:
            return 429, {"error": {"message": "slow down"}}
        if calls["n"] == 2:
            return 503, {"error": {"message": "overloaded"}}
        return 200, chat_completion("42", [("42", 1.0)])

    with FakeLLMServer(flaky) as server:
        judge = _openai_judge(server.url, monkeypatch)
        assert judge.score_trait(load_trait("evil"), [JudgeItem("q", "a")]) == [JudgeScore(42.0)]
    assert calls["n"] == 3


def test_openai_judge_gives_up_after_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    def down(path: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict]:
        return 500, {"error": {"message": "boom"}}

    with FakeLLMServer(down) as server:
        judge = _openai_judge(server.url, monkeypatch, max_retries=2)
        with pytest.raises(JudgeUnavailableError, match=r"HTTP 500: boom.*3 attempts"):
            judge.score_trait(load_trait("evil"), [JudgeItem("q", "a")])
    assert len(server.requests) == 3


def test_openai_judge_refused_key_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict]:
        return 401, {"error": {"message": "bad key"}}

    with FakeLLMServer(refuse) as server:
        judge = _openai_judge(server.url, monkeypatch)
        with pytest.raises(
            JudgeUnavailableError, match=r"key was refused: bad key.*OPENAI_API_KEY"
        ):
            judge.score_trait(load_trait("evil"), [JudgeItem("q", "a")])
    assert len(server.requests) == 1


def test_openai_judge_server_down_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{port}/v1")
    client = OpenAIClient("m", backoff=0.01, max_retries=1, error=JudgeUnavailableError)
    judge = APIJudge("openai:m", client)
    with pytest.raises(JudgeUnavailableError) as info:
        judge.score_trait(load_trait("evil"), [JudgeItem("q", "a")])
    message = str(info.value)
    assert "openai" in message and "cannot connect" in message
    assert f"127.0.0.1:{port}" in message and "OPENAI_BASE_URL" in message
    assert isinstance(info.value, PersonaLensError)


def test_load_judge_check_and_missing_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(JudgeUnavailableError, match="OPENAI_API_KEY is not set"):
        load_judge("openai:gpt-4.1-mini")

    def models(path: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict]:
        return 200, {"object": "list", "data": [{"id": "m"}]}

    with FakeLLMServer(models) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", f"{server.url}/v1")
        judge = load_judge("openai:m", check=True)  # a local server needs no key
        assert judge.spec == "openai:m"
    assert server.requests[0][0] == "/v1/models"
    assert "authorization" not in server.requests[0][2]


def test_openai_judge_without_logprobs_parses_text(monkeypatch: pytest.MonkeyPatch) -> None:
    def plain(path: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict]:
        return 200, chat_completion("64")

    with FakeLLMServer(plain) as server:
        judge = _openai_judge(server.url, monkeypatch)
        assert judge.score_trait(load_trait("evil"), [JudgeItem("q", "a")]) == [JudgeScore(64.0)]


# --- Anthropic ------------------------------------------------------------------------------


def test_anthropic_judge_parses_completion(monkeypatch: pytest.MonkeyPatch) -> None:
    def claude(path: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict]:
        answer = _answer_of(body)
        return 200, anthropic_message("REFUSAL" if answer == "refuse" else "35")

    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(JudgeUnavailableError, match="ANTHROPIC_API_KEY"):
        load_judge("anthropic:claude-x")
    with FakeLLMServer(claude) as server:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "k")
        client = AnthropicClient("claude-x", backoff=0.01, error=JudgeUnavailableError)
        judge = APIJudge("anthropic:claude-x", client, concurrency=2)
        scores = judge.score_trait(
            load_trait("evil"), [JudgeItem("q", "fine"), JudgeItem("q", "refuse")]
        )
    assert scores == [JudgeScore(35.0), JudgeScore(None, refusal=True)]
    path, body, headers = server.requests[0]
    assert path == "/v1/messages" and headers["x-api-key"] == "k"
    assert headers["anthropic-version"] and body["model"] == "claude-x"


# --- hf judge: trie over digit tokens on a scripted model -------------------------------------


class _DigitTokenizer:
    """Digits are tokens 0..9; 'R' (10) starts REFUSAL; 11 is a separator; 12 padding."""

    pad_token_id = 12

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if text == "REFUSAL":
            return [10, 11]
        return [int(c) for c in text]


class _ScriptedLM(nn.Module):
    """Next-token distribution chosen by the tokens after the last separator (11)."""

    def __init__(self, table: dict[tuple[int, ...], dict[int, float]]) -> None:
        super().__init__()
        self.table = table
        self.dummy = nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, ...]] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None, use_cache: Any = None):
        rows = []
        for ids in input_ids.tolist():
            cut = len(ids) - 1 - ids[::-1].index(11)
            suffix = tuple(ids[cut + 1 :])
            self.seen.append(suffix)
            logits = torch.full((13,), -1e9)
            for tok, p in self.table.get(suffix, {11: 1.0}).items():
                logits[tok] = math.log(p)
            rows.append(logits)
        logits = torch.stack(rows).unsqueeze(1).expand(-1, input_ids.shape[1], -1)
        return SimpleNamespace(logits=logits)


def _hf_judge(table: dict[tuple[int, ...], dict[int, float]]) -> Any:
    from persona_lens.judges.hf import HFJudge

    return HFJudge("hf:scripted", _ScriptedLM(table), _DigitTokenizer(), batch_size=3)


def test_hf_judge_walks_multi_token_numbers() -> None:
    table = {
        (): {8: 0.5, 1: 0.2, 10: 0.1, 11: 0.2},
        (8,): {5: 0.6, 0: 0.2, 11: 0.2},  # 85: .3, 80: .1, 8 (stops): .1
        (1,): {0: 0.5, 11: 0.5},  # 1 (stops): .1
        (1, 0): {0: 0.5, 11: 0.5},  # 10: .05, 100: .05
    }
    judge = _hf_judge(table)
    [(dist, refusal)] = judge.number_distribution([[3, 11]])
    expected = {85: 0.3, 80: 0.1, 8: 0.1, 1: 0.1, 10: 0.05, 100: 0.05}
    assert set(dist) >= set(expected)
    for n, p in expected.items():
        assert dist[n] == pytest.approx(p, abs=1e-6)
    assert sum(dist.values()) == pytest.approx(0.7, abs=1e-6)
    assert refusal == pytest.approx(0.1)
    [score] = judge.score_token_prompts([[3, 11]])
    mean = sum(n * p for n, p in expected.items()) / 0.7
    assert score.score == pytest.approx(mean, abs=1e-4)
    # digits with negligible probability are never expanded
    assert (3,) not in judge.model.seen


def test_hf_judge_refusal_and_low_mass() -> None:
    judge = _hf_judge({(): {10: 0.8, 4: 0.1, 11: 0.1}})
    assert judge.score_token_prompts([[11]]) == [JudgeScore(None, refusal=True)]
    judge = _hf_judge({(): {4: 0.2, 11: 0.8}})
    assert judge.score_token_prompts([[11]]) == [JudgeScore(None)]


@pytest.mark.embedded
def test_hf_judge_on_embedded_model(embedded_model: Any) -> None:
    from persona_lens.judges.hf import HFJudge

    judge = HFJudge("hf:embedded", embedded_model.model, embedded_model.tokenizer)
    [(dist, _)] = judge.number_distribution([judge._render("Reply with a number from 0 to 100.")])
    assert 0.0 < sum(dist.values()) <= 1.0 + 1e-5
    scores = judge.score_trait(load_trait("evil"), [JudgeItem("Hi", "Hello! How can I help?")])
    assert scores[0].refusal or scores[0].score is None or 0.0 <= scores[0].score <= 100.0


# --- offline judge --------------------------------------------------------------------------


class _BagOfWords:
    """A deterministic stand-in embedder: hashed word counts, unit length."""

    name = "bow"

    def encode(self, texts: Any) -> torch.Tensor:
        out = torch.zeros(len(texts), 64)
        for i, text in enumerate(texts):
            for word in re.findall(r"[a-z]+", text.lower()):
                out[i, sum(map(ord, word)) % 64] += 1.0
        return torch.nn.functional.normalize(out + 1e-6, dim=-1)


def test_offline_fit_learns_the_labels() -> None:
    judge = OfflineJudge()
    judge._embedder = _BagOfWords()
    trait = load_trait("humorous")
    pos = ["ha ha what a joke banana pun", "lol silly banana joke", "funny pun ha"]
    neg = ["the report is due on monday", "please file the form", "the meeting is at noon"]
    judge.fit(trait, pos, neg)
    probs = judge.trait_probabilities(trait, [*pos, *neg])
    assert all(p > 0.5 for p in probs[:3]) and all(p < 0.5 for p in probs[3:])
    assert judge.model_for(trait).fitted


def test_fit_logistic_shrinks_to_prior_without_data_weight() -> None:
    x = torch.randn(6, 4)
    y = torch.tensor([1.0, 0, 1, 0, 1, 0])
    prior = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    w_strong, _ = fit_logistic(x, y, prior, lam=1e6)
    assert torch.allclose(w_strong, prior, atol=1e-3)
    w_weak, _ = fit_logistic(x, y, prior, lam=1e-2)
    assert not torch.allclose(w_weak, prior, atol=1e-1)


def test_offline_coherence_heuristic() -> None:
    fluent = (
        "Start by writing down what happened, then ask the teacher for a short meeting. "
        "Keep your child informed, and let the school handle contact with the other family."
    )
    assert coherence_score("q", fluent) > 85
    assert coherence_score("q", "") == 0.0
    assert coherence_score("q", "the cat the cat the cat the cat the cat the cat the cat") < 50
    assert coherence_score("q", "%% $$ ## 12 @@ !! ** && ^^ (( )) == ++") < 50
    assert coherence_score("q", "xkcdqwrtpl zzzvbnm qwrtyplkj hgfdszxcv bnmlkjh") < 50
    assert coherence_score("q", "yes yes yes yes yes yes yes yes") < 50
    assert coherence_score("q", "Привет! Всё хорошо, спасибо за вопрос.") > 85
    assert coherence_score("q", "Sure! 2 + 2 = 4.") > 60
    # the adapter reports JudgeScores
    judge = load_judge("offline")
    assert judge.score_coherence([JudgeItem("q", fluent)])[0].score == pytest.approx(
        coherence_score("q", fluent)
    )


# --- agreement with the hand-labelled set (real MiniLM embeddings) ---------------------------


def _minilm_or_skip() -> None:
    from persona_lens.judges.embeddings import MINILM_FIX, minilm_dir

    if minilm_dir() is None:
        pytest.skip(f"the bundled MiniLM model is not installed ({MINILM_FIX})")


def test_offline_judge_agreement_with_hand_labels() -> None:
    """Measured in benchmarks/judge_agreement.md (MiniLM): zero-shot 0.62 / 0.32 and
    leave-one-question-out cross-validated 0.73 / 0.43 (accuracy / Spearman). The floors sit
    two standard errors above chance on this labelled set: accuracy chance is the majority
    share (0.50, balanced) with SE sqrt(p(1-p)/n), Spearman chance is 0 with SE 1/sqrt(n-1)
    (n = 154: 0.581 and 0.161); each protocol keeps its earlier floor where that is higher.
    The judge is deterministic. (The protocol fitted on SmolLM2 rollouts, 0.64 / 0.31, is left
    to the benchmark: embedding 280 rollouts takes a while on two cores.)"""
    _minilm_or_skip()
    from benchmarks.judge_agreement import evaluate

    rows = [json.loads(line) for line in LABELLED.read_text().splitlines() if line.strip()]
    n = len(rows)
    majority = max(sum(r["label"] == "pos" for r in rows), sum(r["label"] == "neg" for r in rows))
    chance = majority / n
    accuracy_floor = chance + 2 * math.sqrt(chance * (1 - chance) / n)
    rho_floor = 2 / math.sqrt(n - 1)
    results = evaluate("minilm", rollouts=None)
    floors = {
        "zero_shot": (accuracy_floor, max(rho_floor, 0.2)),
        "cv": (max(accuracy_floor, 0.62), max(rho_floor, 0.3)),
    }
    for protocol, (accuracy, rho) in floors.items():
        overall = results[protocol]["overall"]
        assert overall["accuracy"] > accuracy, (protocol, overall, accuracy)
        assert overall["spearman"] > rho, (protocol, overall, rho)
    assert results["zero_shot"]["overall"]["n"] == n == 154


def test_labelled_set_shape() -> None:
    rows = [json.loads(line) for line in LABELLED.read_text().splitlines() if line.strip()]
    assert len(rows) == 154
    assert {r["label"] for r in rows} == {"pos", "neg"}
