"""The server on a tiny random Llama: the OpenAI formats, the persona field, every bad-input
case, limits, auth, guards, multi-turn projections, errors mid-stream, timeouts, disconnects
and rows joining a running batch. Fast: the real-model checks are in test_serving_embedded."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from tests.serving_support import (
    assert_error_shape,
    compare_greedy,
    greedy_reply,
    openai_client,
    serve,
    sse_events,
)
from tests.tiny import load_tiny, random_trait_vector

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from persona_lens.core.capture import Monitor, capture_forward  # noqa: E402
from persona_lens.core.errors import InputError, VectorMismatchError  # noqa: E402
from persona_lens.core.generation import render_chat  # noqa: E402
from persona_lens.core.models import load_model  # noqa: E402
from persona_lens.serving.detokenize import ReplyText  # noqa: E402
from persona_lens.serving.turns import assistant_spans  # noqa: E402
from persona_lens.serving.vectors import VectorLibrary, check_name, content_hash  # noqa: E402

KEY = "sekrit"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = dict(
    api_key=KEY,
    max_tokens=16,
    default_max_tokens=8,
    max_prompt_tokens=40,
    max_coefficient=5.0,
    max_body_bytes=4096,
)
HELLO = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Llama (4 blocks) and a folder with two random vectors for it."""
    root = tmp_path_factory.mktemp("serving")
    tiny = load_tiny(root / "model", seed=3, num_layers=4)  # a seed whose replies run long
    vectors = root / "vectors"
    vectors.mkdir()
    random_trait_vector(tiny, "humorous", seed=1, best_layer=2, scale=3.0).save(
        vectors / "humorous.safetensors"
    )
    random_trait_vector(tiny, "evil", seed=2, best_layer=3, scale=3.0).save(
        vectors / "evil.safetensors"
    )
    return tiny[2], vectors


@pytest.fixture(scope="module")
def server(tiny_dir: tuple[Path, Path]) -> Iterator[Any]:
    model_dir, vectors = tiny_dir
    with serve(load_model(str(model_dir)), vectors, **LIMITS) as served:
        yield served


@pytest.fixture(scope="module")
def http(server: Any) -> Iterator[Any]:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        yield client


def chat(server: Any, **fields: Any) -> dict[str, Any]:
    return {"model": server.model, "messages": HELLO, "temperature": 0, **fields}


# --- the OpenAI client ----------------------------------------------------------------------
def test_openai_client_streaming_and_not(server: Any) -> None:
    client = openai_client(server.url, KEY)
    persona = {"steer": {"humorous": 2.0}, "monitor": ["evil", "humorous"]}
    full = client.chat.completions.create(
        model=server.model,
        messages=HELLO,
        temperature=0,
        max_tokens=8,
        extra_body={"persona": persona},
    )
    text = full.choices[0].message.content
    extra = full.model_extra["persona"]
    assert full.usage.completion_tokens == len(extra["token_projections"]["evil"]) > 0
    assert set(extra["projections"]) == {"evil", "humorous"}
    mean = sum(extra["token_projections"]["humorous"]) / full.usage.completion_tokens
    assert math.isclose(extra["projections"]["humorous"], mean, rel_tol=1e-6)
    assert extra["steer"]["humorous"]["coefficient"] == 2.0

    stream = client.chat.completions.create(
        model=server.model,
        messages=HELLO,
        temperature=0,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"persona": persona},
    )
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert set(chunks[0].model_extra["persona"]["prompt_projections"]) == {"evil", "humorous"}
    tokens = [c for c in chunks if c.choices and "tokens" in (c.model_extra.get("persona") or {})]
    assert len(tokens) == full.usage.completion_tokens
    for chunk in tokens:  # every token chunk carries its token's projections
        (entry,) = chunk.model_extra["persona"]["tokens"]
        assert set(entry["projections"]) == {"evil", "humorous"}
    streamed = [t.model_extra["persona"]["tokens"][0]["projections"]["humorous"] for t in tokens]
    assert streamed == pytest.approx(extra["token_projections"]["humorous"], abs=1e-5)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_endpoint_with_logprobs(server: Any) -> None:
    client = openai_client(server.url, KEY)
    out = client.completions.create(
        model=server.model, prompt="hello world", max_tokens=4, temperature=0, logprobs=2
    )
    choice = out.choices[0]
    assert out.object == "text_completion"
    assert len(choice.logprobs.tokens) == out.usage.completion_tokens
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
    stream = list(
        client.completions.create(
            model=server.model, prompt="hello world", max_tokens=4, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == choice.text


def test_models_and_vectors_endpoints(server: Any, tiny_dir: tuple[Path, Path]) -> None:
    client = openai_client(server.url, KEY)
    assert [m.id for m in client.models.list().data] == [server.model]
    assert client.models.retrieve(server.model).id == server.model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    listed = httpx.get(f"{server.url}/v1/persona/vectors", headers=AUTH).json()["data"]
    by_name = {v["name"]: v for v in listed}
    assert set(by_name) == {"evil", "humorous"}
    library = VectorLibrary.load(tiny_dir[1], server.engine.layout)
    for served in library:
        entry = by_name[served.name]
        assert entry["hash"] == content_hash(served.vector) and entry["layer"] == served.layer
        assert entry["model_fingerprint"] == served.vector.model_fingerprint
        assert entry["trait"] == served.vector.trait and entry["meter"]["scale"] > 0


def test_a_vector_can_be_named_by_its_content_hash(server: Any, http: Any) -> None:
    digest = server.library.get("humorous").hash
    by_name = http.post(
        "/v1/chat/completions", json=chat(server, persona={"steer": {"humorous": 2}})
    )
    by_hash = http.post("/v1/chat/completions", json=chat(server, persona={"steer": {digest: 2}}))
    assert by_hash.status_code == 200, by_hash.text
    assert by_hash.json()["choices"][0]["message"] == by_name.json()["choices"][0]["message"]
    assert by_hash.json()["persona"]["steer"]["humorous"]["hash"] == digest


# --- bad input: status, error shape, param ------------------------------------------------
BAD: list[tuple[str, dict[str, Any], int, str, str | None]] = [
    ("unknown model", {"model": "gpt-4"}, 404, "model_not_found", "model"),
    (
        "path as name",
        {"persona": {"steer": {"../humorous": 1}}},
        400,
        "unknown_vector",
        "persona.steer.../humorous",
    ),
    (
        "absolute path",
        {"persona": {"steer": {"/etc/passwd": 1}}},
        400,
        "unknown_vector",
        "persona.steer./etc/passwd",
    ),
    (
        "unknown vector",
        {"persona": {"steer": {"sarcastic": 1}}},
        400,
        "unknown_vector",
        "persona.steer.sarcastic",
    ),
    (
        "unknown monitor",
        {"persona": {"monitor": ["nope"]}},
        400,
        "unknown_vector",
        "persona.monitor[0]",
    ),
    (
        "unknown persona key",
        {"persona": {"steerr": {"humorous": 1}}},
        400,
        "unknown_parameter",
        "persona.steerr",
    ),
    (
        "unknown guard key",
        {"persona": {"guard": {"evil": {"treshold": 1}}}},
        400,
        "unknown_parameter",
        "persona.guard.evil.treshold",
    ),
    (
        "guard without threshold",
        {"persona": {"guard": {"evil": {}}}},
        400,
        "missing_required_parameter",
        "persona.guard.evil.threshold",
    ),
    (
        "layers of an unsteered trait",
        {"persona": {"steer": {"humorous": 1}, "layers": {"evil": 2}}},
        400,
        "invalid_value",
        "persona.layers.evil",
    ),
    (
        "layer out of range",
        {"persona": {"steer": {"humorous": 1}, "layers": {"humorous": 9}}},
        400,
        "invalid_value",
        "persona.layers.humorous",
    ),
    (
        "coefficient too large",
        {"persona": {"steer": {"humorous": 5.5}}},
        400,
        "invalid_value",
        "persona.steer.humorous",
    ),
    (
        "guard coefficient too large",
        {"persona": {"guard": {"evil": {"threshold": 1, "coefficient": -50}}}},
        400,
        "invalid_value",
        "persona.guard.evil.coefficient",
    ),
    (
        "coefficient not a number",
        {"persona": {"steer": {"humorous": "1"}}},
        400,
        "invalid_value",
        "persona.steer.humorous",
    ),
    ("max_tokens above the limit", {"max_tokens": 17}, 400, "invalid_value", "max_tokens"),
    ("max_tokens zero", {"max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    (
        "prompt too long",
        {"messages": [{"role": "user", "content": "hello " * 40}]},
        400,
        "invalid_value",
        "messages",
    ),
    ("unknown parameter", {"temprature": 0.5}, 400, "unknown_parameter", "temprature"),
    ("n above 1", {"n": 2}, 400, "unsupported_parameter", "n"),
    ("tools", {"tools": [{"type": "function"}]}, 400, "unsupported_parameter", "tools"),
    ("temperature as text", {"temperature": "0"}, 400, "invalid_value", "temperature"),
    ("temperature out of range", {"temperature": 3}, 400, "invalid_value", "temperature"),
    ("no messages", {"messages": []}, 400, "invalid_value", "messages"),
    (
        "tool role",
        {"messages": [{"role": "tool", "content": "x"}]},
        400,
        "invalid_value",
        "messages[0].role",
    ),
    ("no model", {"model": None}, 400, "missing_required_parameter", "model"),
    ("top_logprobs alone", {"top_logprobs": 2}, 400, "invalid_value", "top_logprobs"),
    ("empty stop", {"stop": [""]}, 400, "invalid_value", "stop"),
    (
        "image content",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        None,
        None,
    ),
]


@pytest.mark.parametrize(
    ("what", "change", "status", "code", "param"), BAD, ids=[b[0] for b in BAD]
)
def test_bad_chat_requests(
    server: Any,
    http: Any,
    what: str,
    change: dict[str, Any],
    status: int,
    code: str,
    param: str | None,
) -> None:
    body = {**chat(server), **change}
    body = {k: v for k, v in body.items() if v is not None}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    assert_error_shape(response.json(), code, param)


def test_bad_request_bodies(server: Any, http: Any) -> None:
    cases = [
        (b"{not json", 400, "invalid_json"),
        (b"[]", 400, None),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
            400,
            None,
        ),
    ]
    for content, status, code in cases:
        response = http.post(
            "/v1/chat/completions", content=content, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == status, (content, response.text)
        assert_error_shape(response.json(), code)
    completion = {"model": server.model, "prompt": "hello"}
    for change, param in [
        ({"echo": True}, "echo"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"best_of": 2}, "best_of"),
    ]:
        response = http.post("/v1/completions", json={**completion, **change})
        assert response.status_code == 400, response.text
        assert_error_shape(response.json(), param=param)
    for method, path, status in [("GET", "/v1/chat/completions", 405), ("GET", "/v1/nothing", 404)]:
        response = http.request(method, path)
        assert response.status_code == status
        assert_error_shape(response.json())


def test_openai_client_raises_bad_request(server: Any) -> None:
    client = openai_client(server.url, KEY)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=server.model, messages=HELLO, extra_body={"persona": {"stear": {"humorous": 1}}}
        )
    assert caught.value.code == "unknown_parameter" and caught.value.param == "persona.stear"


def test_api_key_and_open_pages(server: Any) -> None:
    body = chat(server, max_tokens=2)
    for headers, what in [({}, "no API key"), ({"Authorization": "Bearer wrong"}, "wrong")]:
        response = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers)
        assert response.status_code == 401 and what in response.json()["error"]["message"]
        assert_error_shape(response.json(), "invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        openai_client(server.url, "wrong").models.list()
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and "persona-lens" in page.text


def test_body_size_limit(server: Any) -> None:
    big = chat(server, user="x" * 5000)
    response = httpx.post(f"{server.url}/v1/chat/completions", json=big, headers=AUTH)
    assert response.status_code == 413
    assert_error_shape(response.json(), "request_too_large")

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit is counted while reading
        data = json.dumps(big).encode()
        for start in range(0, len(data), 1000):
            yield data[start : start + 1000]

    response = httpx.post(f"{server.url}/v1/chat/completions", content=chunked(), headers=AUTH)
    assert response.status_code == 413


# --- multi-turn, guards ---------------------------------------------------------------------
def test_multi_turn_projections_match_an_independent_forward(
    server: Any, http: Any, tiny_dir: tuple[Path, Path]
) -> None:
    messages = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "world world hello"},
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "world"},
    ]
    response = http.post("/v1/chat/completions", json=chat(server, messages=messages, max_tokens=2))
    turns = response.json()["persona"]["turns"]
    assert [t["message"] for t in turns] == [1, 3]
    assert [t["tokens"] for t in turns] == [3, 1]
    # the same numbers from a separate copy of the model (the server's belongs to its engine)
    copy = load_model(str(tiny_dir[0]))
    tok = copy.tokenizer
    ids = tok(render_chat(tok, messages), add_special_tokens=False)["input_ids"]
    for turn in turns:
        head = messages[: turn["message"]]
        start = (
            len(
                tok(tok.apply_chat_template(head, tokenize=False), add_special_tokens=False)[
                    "input_ids"
                ]
            )
            + 2
        )
        mask = torch.zeros(1, len(ids), dtype=torch.long)
        mask[0, start : start + turn["tokens"]] = 1
        for served in server.library:
            monitor = Monitor(served.name, served.vector.at(served.layer), served.layer)
            expected = capture_forward(
                copy.model,
                torch.tensor([ids]),
                torch.ones(1, len(ids), dtype=torch.long),
                mask,
                layers=(),
                monitors=[monitor],
            ).response_projection(served.name)[0]
            assert turn["projections"][served.name] == pytest.approx(expected, abs=1e-4)


def test_guard_fires_and_steers_the_rest_of_the_reply(server: Any, http: Any) -> None:
    plain = http.post("/v1/chat/completions", json=chat(server, max_tokens=8)).json()
    low = {"guard": {"evil": {"threshold": -1e6, "coefficient": -5}}}
    guarded = http.post("/v1/chat/completions", json=chat(server, max_tokens=8, persona=low)).json()
    events = guarded["persona"]["guard_events"]
    assert [e["guard"] for e in events] == ["evil"] and events[0]["token_index"] == 0
    assert events[0]["projection"] == pytest.approx(
        guarded["persona"]["token_projections"]["evil"][0]
    )
    assert guarded["choices"][0]["message"]["content"] != plain["choices"][0]["message"]["content"]
    later = guarded["persona"]["token_projections"]["evil"][1:]
    before = plain["persona"]["token_projections"]["evil"][1 : len(later) + 1]
    assert max(later) < min(before)  # steered away from the trait once it fired
    high = {"guard": {"evil": {"threshold": 1e6}}}
    quiet = http.post("/v1/chat/completions", json=chat(server, max_tokens=8, persona=high)).json()
    assert quiet["persona"]["guard_events"] == []
    assert quiet["choices"][0]["message"] == plain["choices"][0]["message"]
    with http.stream(
        "POST", "/v1/chat/completions", json=chat(server, max_tokens=4, persona=low, stream=True)
    ) as s:
        chunks = [e for e in sse_events(s.iter_lines()) if e != "[DONE]"]
    fired = [c["persona"]["guard_events"] for c in chunks if "tokens" in c.get("persona", {})]
    assert fired[0] and fired[0][0]["guard"] == "evil" and not any(fired[1:])
    assert chunks[-1]["persona"]["guard_events"] == fired[0]


def test_stop_strings_cut_the_reply(server: Any, http: Any) -> None:
    plain = http.post("/v1/chat/completions", json=chat(server, max_tokens=8)).json()
    text = plain["choices"][0]["message"]["content"]
    words = text.split()
    stop = next(w for w in words if w != words[0])  # a word that first shows mid-reply
    cut = http.post("/v1/chat/completions", json=chat(server, max_tokens=8, stop=stop)).json()
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["choices"][0]["message"]["content"] == text[: text.index(stop)]
    with http.stream(
        "POST", "/v1/chat/completions", json=chat(server, max_tokens=8, stop=stop, stream=True)
    ) as s:
        chunks = [e for e in sse_events(s.iter_lines()) if e != "[DONE]"]
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == cut["choices"][0]["message"]["content"]


def test_rows_joining_a_running_batch_decode_as_alone(server: Any, http: Any) -> None:
    """A request that joins while another is mid-reply (caches of different lengths merged)."""
    ask = {"logprobs": True, "top_logprobs": 2}
    long_body = chat(server, max_tokens=16, persona={"steer": {"humorous": 2}}, **ask)
    short_body = chat(
        server,
        messages=[{"role": "user", "content": "world"}],
        max_tokens=6,
        persona={"steer": {"evil": -2}},
        **ask,
    )
    client = openai_client(server.url, KEY)

    def create(body: dict[str, Any]) -> Any:
        fields = {k: v for k, v in body.items() if k != "persona"}
        return client.chat.completions.create(**fields, extra_body={"persona": body["persona"]})

    alone_long = greedy_reply(create(long_body))
    alone_short = greedy_reply(create(short_body))
    before = server.engine.stats()["max_rows"]
    joined: dict[str, Any] = {}
    with http.stream("POST", "/v1/chat/completions", json={**long_body, "stream": True}) as s:
        lines = s.iter_lines()
        events = []
        for line in lines:
            if line.startswith("data: "):
                events.append(line)
            if len(events) == 4 and not joined:  # mid-reply: send the other request
                joined["short"] = create(short_body)
    assert server.engine.stats()["max_rows"] >= max(before, 2)
    compare_greedy(greedy_reply(joined["short"]), alone_short, 1e-3)
    chunks = [json.loads(e[6:]) for e in events if e != "data: [DONE]"]
    tokens = [
        c["persona"]["tokens"][0]["projections"] for c in chunks if "tokens" in c.get("persona", {})
    ]
    assert [t["humorous"] for t in tokens] == pytest.approx(
        [p["humorous"] for p in alone_long.projections], abs=1e-3
    )


# --- errors mid-stream, timeouts, disconnects, a full queue ---------------------------------
@contextmanager
def slow_server(tiny_dir: tuple[Path, Path], delay: float, **settings: Any) -> Iterator[Any]:
    """One row at a time, ``delay`` seconds added to every forward, room for one waiting
    request (timings only make the window in which each case is observed)."""
    loaded = load_model(str(tiny_dir[0]))
    settings = {"max_batch": 1, "max_queue": 1, "max_tokens": 64, **settings}
    with serve(loaded, tiny_dir[1], **settings) as served:
        loaded.model.register_forward_pre_hook(lambda *_: time.sleep(delay))
        yield served


def test_error_mid_stream_is_an_event_then_done(server: Any, http: Any) -> None:
    calls = {"n": 0}

    def boom(*_: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated device failure")

    hook = server.engine.model.register_forward_pre_hook(boom)
    try:
        with http.stream(
            "POST", "/v1/chat/completions", json=chat(server, max_tokens=10, stream=True)
        ) as s:
            events = sse_events(s.iter_lines())
    finally:
        hook.remove()
    assert events[-1] == "[DONE]"
    assert_error_shape(events[-2], "internal")
    assert events[-2]["error"]["type"] == "server_error"
    assert any("tokens" in e.get("persona", {}) for e in events[:-2])  # it had started
    again = http.post("/v1/chat/completions", json=chat(server, max_tokens=2))
    assert again.status_code == 200  # the server goes on


def test_timeouts(tiny_dir: tuple[Path, Path]) -> None:
    with slow_server(tiny_dir, 0.25, request_timeout=2.0) as served:  # 40 tokens take >= 10 s
        url = f"{served.url}/v1/chat/completions"
        body = {"model": served.model, "messages": HELLO, "temperature": 0, "max_tokens": 40}
        response = httpx.post(url, json=body, timeout=30)
        assert response.status_code == 408
        assert_error_shape(response.json(), "timeout")
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=30) as s:
            events = sse_events(s.iter_lines())
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "timeout"
    assert sum("tokens" in e.get("persona", {}) for e in events[:-2]) >= 1


def test_a_client_that_disconnects_frees_its_slot(tiny_dir: tuple[Path, Path]) -> None:
    with slow_server(tiny_dir, 0.1) as served:
        base, model = served.url, served.model
        url = f"{base}/v1/chat/completions"
        body = {"model": model, "messages": HELLO, "temperature": 0, "max_tokens": 16}
        stats = lambda: httpx.get(f"{base}/v1/persona/stats").json()  # noqa: E731
        before = stats()
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=30) as s:
            for count, _ in enumerate(line for line in s.iter_lines() if line.startswith("data: ")):
                if count == 2:
                    break  # leaving the block closes the connection
        limit = time.monotonic() + 5
        while (now := stats())["cancelled"] == before["cancelled"] and time.monotonic() < limit:
            time.sleep(0.05)
        assert now["cancelled"] == before["cancelled"] + 1 and now["active_rows"] == 0
        steps = now["decode_steps"] - before["decode_steps"]
        assert steps < 16, f"the row ran {steps} steps: it was not dropped"
        after = httpx.post(url, json={**body, "max_tokens": 2}, timeout=30)
        assert after.status_code == 200  # the single slot is free again


def test_a_full_queue_answers_429(tiny_dir: tuple[Path, Path]) -> None:
    with slow_server(tiny_dir, 0.1) as served:
        base, model = served.url, served.model
        url = f"{base}/v1/chat/completions"
        body = {"model": model, "messages": HELLO, "temperature": 0, "max_tokens": 12}
        with (
            ThreadPoolExecutor(2) as pool,
            httpx.stream("POST", url, json={**body, "stream": True}, timeout=30) as s,
        ):
            lines = s.iter_lines()  # kept: closing this generator would close the connection
            for line in lines:
                if line.startswith("data: "):
                    break  # it runs
            waiting = pool.submit(httpx.post, url, json={**body, "max_tokens": 1}, timeout=30)
            limit = time.monotonic() + 5
            while httpx.get(f"{base}/v1/persona/stats").json()["waiting"] < 1:
                assert time.monotonic() < limit
                time.sleep(0.02)
            full = httpx.post(url, json=body, timeout=30)
            assert full.status_code == 429
            assert_error_shape(full.json(), "queue_full")
            s.close()
            assert waiting.result().status_code in (200, 408)


# --- batching on a model whose cache cannot be merged ----------------------------------------
def test_cohort_batching_on_a_sliding_window_model() -> None:
    from persona_lens.core.models import LoadedModel
    from tests import zoo
    from tests.tiny import tiny_tokenizer

    model = zoo.build("mistral")
    loaded = LoadedModel(model, tiny_tokenizer(), "zoo:mistral", torch.device("cpu"), torch.float32)
    loaded.tokenizer.pad_token = "</s>"
    prompts = [
        HELLO,
        [{"role": "user", "content": "world"}],
        [{"role": "user", "content": "hello"}],
    ]
    with serve(loaded, max_tokens=8) as served:
        client = openai_client(served.url)

        def ask(messages: Any) -> Any:
            return client.chat.completions.create(
                model=served.model,
                messages=messages,
                temperature=0,
                max_tokens=6,
                logprobs=True,
                top_logprobs=2,
            )

        alone = [greedy_reply(ask(p)) for p in prompts]
        barrier = threading.Barrier(len(prompts))

        def together(messages: Any) -> Any:
            barrier.wait()
            return ask(messages)

        with ThreadPoolExecutor(len(prompts)) as pool:
            batched = [greedy_reply(r) for r in pool.map(together, prompts)]
        stats = served.engine.stats()
    assert stats["mode"] == "cohort" and stats["max_rows"] >= 2
    for one, other in zip(batched, alone, strict=True):
        compare_greedy(one, other, 1e-3)


# --- pieces ------------------------------------------------------------------------------------
class _Pieces:
    """A tokenizer whose tokens are given strings (token 9 is half of a two-byte character)."""

    table: ClassVar[dict[int, str]] = {
        1: "Hel",
        2: "lo",
        3: " wo",
        4: "rld",
        5: "!",
        9: "\xc3",
        10: "\xa9",
    }

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        raw = "".join(self.table[i] for i in ids).encode("latin-1")
        return raw.decode("utf-8", errors="replace")


def test_reply_text_holds_back_stop_strings_and_split_characters() -> None:
    text = ReplyText(_Pieces(), stop=["o wo"])
    assert text.push(1) == ("Hel", "")  # "Hel" could still begin "o wo"... in its last 3 chars
    assert text.push(2) == ("lo", "He")
    assert text.push(3) == (" wo", "ll")  # the stop string ends the content before it
    assert text.stopped and text.text == "Hell" and text.finish() == ""
    unstopped = ReplyText(_Pieces(), stop=["xyz"])
    assert [unstopped.push(t)[1] for t in (1, 2, 5)] == ["H", "el", "l"]
    assert unstopped.finish() == "o!"
    accented = ReplyText(_Pieces())
    assert accented.push(9) == ("", "")
    assert accented.push(10) == ("é", "é")
    assert accented.finish() == ""


def test_assistant_spans_follow_message_order() -> None:
    messages = [
        {"role": "user", "content": "say ok"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "ok?"},
        {"role": "assistant", "content": " ok "},
    ]
    text = "U: say ok\nA: ok\nU: ok?\nA: ok\n"
    offsets = [(i, i + 1) for i in range(len(text))]  # one token per character
    spans = assistant_spans(text, offsets, messages)
    assert [(s.message, text[s.start : s.end]) for s in spans] == [(1, "ok"), (3, "ok")]
    assert spans[0].start == text.index("A: ok") + 3


def test_vector_names_and_start_up_refusal(tmp_path: Path, tiny_dir: tuple[Path, Path]) -> None:
    for bad in ("../x", "/etc/passwd", "a/b", "~root", ""):
        with pytest.raises(InputError, match=r"path|not a vector name"):
            check_name(bad)
    check_name("humorous")
    check_name("sha256:0123456789abcdef")
    other = load_tiny(tmp_path / "other", seed=5, num_layers=4)
    folder = tmp_path / "foreign"
    folder.mkdir()
    random_trait_vector(other, "evil", seed=1, best_layer=2).save(folder / "evil.safetensors")
    mine = load_model(str(tiny_dir[0]))
    with pytest.raises(VectorMismatchError, match=r"evil\.safetensors"):
        VectorLibrary.load(folder, mine.layout, mine.fingerprint)


def test_min_tokens_masks_the_end_of_sequence(tmp_path: Path) -> None:
    loaded = load_tiny(tmp_path / "eager", seed=0)[0]  # this seed ends every reply at once
    with serve(loaded, max_tokens=8) as served:
        url = f"{served.url}/v1/chat/completions"
        body = {"model": served.model, "messages": HELLO, "temperature": 0, "max_tokens": 5}
        plain = httpx.post(url, json=body).json()
        held = httpx.post(url, json={**body, "min_tokens": 5}).json()
        bad = httpx.post(url, json={**body, "min_tokens": 6})
    assert (
        plain["usage"]["completion_tokens"] == 0 and plain["choices"][0]["finish_reason"] == "stop"
    )
    assert (
        held["usage"]["completion_tokens"] == 5 and held["choices"][0]["finish_reason"] == "length"
    )
    assert bad.status_code == 400
    assert_error_shape(bad.json(), "invalid_value", "min_tokens")


def test_the_page_ships_as_package_data() -> None:
    """A non-editable install carries the page: pyproject declares every file of static/."""
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parents[1]
    package = root / "src" / "persona_lens"
    config = tomllib.loads((root / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["persona_lens"]
    files = [p.relative_to(package).as_posix() for p in (package / "serving" / "static").iterdir()]
    assert {
        "serving/static/index.html",
        "serving/static/app.js",
        "serving/static/style.css",
    } <= set(files)
    for name in files:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name
    page = (package / "serving" / "static" / "index.html").read_text()
    assert "http://" not in page and "https://" not in page  # nothing from a CDN
