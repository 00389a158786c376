"""Fuzzing the server with schemathesis from its own OpenAPI schema (tiny model): valid and
invalid requests of every operation, bounded in count and time, must never get a 5xx (nor a
408: four tokens of a tiny model never take the 20 s timeout unless something hangs)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from tests.serving_support import serve
from tests.tiny import load_tiny, random_trait_vector

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

EXAMPLES = {"GET": 10, "POST": 40}  # per operation and generation mode
BUDGET_S = 60.0  # for the whole run, shared by the operations; examples past it return at once


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("fuzz")
    tiny = load_tiny(root / "model", seed=3, num_layers=2)
    folder = root / "vectors"
    folder.mkdir()
    random_trait_vector(tiny, "humorous", seed=1, best_layer=1).save(
        folder / "humorous.safetensors"
    )
    random_trait_vector(tiny, "evil", seed=2, best_layer=2).save(folder / "evil.safetensors")
    settings = dict(max_tokens=4, default_max_tokens=4, max_prompt_tokens=48, request_timeout=20)
    with serve(tiny[0], folder, **settings) as served:
        yield served


def test_the_openapi_schema_names_the_model_and_the_vectors(server: Any) -> None:
    import httpx

    schema = httpx.get(f"{server.url}/openapi.json").json()
    chat = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert chat["model"]["enum"] == [server.model, *chat["model"]["enum"][1:]]
    persona = schema["components"]["schemas"]["PersonaOptions"]["properties"]
    assert persona["steer"]["propertyNames"] == {"enum": ["evil", "humorous"]}


def test_fuzzing_finds_no_server_error(server: Any) -> None:
    from hypothesis import HealthCheck, Phase, given, settings

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    statuses: Counter[tuple[str, int]] = Counter()
    failures: list[str] = []
    stop_at = 0.0
    operations = [result.ok() for result in schema.get_all_operations()]
    total = sum(EXAMPLES.get(op.method.upper(), 10) for op in operations)
    for operation in operations:
        examples = EXAMPLES.get(operation.method.upper(), 10)
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def call(case: Any) -> None:
                if time.monotonic() > stop_at:  # noqa: B023 (call() runs right away)
                    return
                response = case.call(base_url=server.url, timeout=30)
                statuses[(operation.label, response.status_code)] += 1  # noqa: B023
                if response.status_code >= 500 or response.status_code == 408:  # 408: it hung
                    failures.append(
                        f"{response.status_code} {response.text[:300]}\n{case.as_curl_command()}"
                    )

            stop_at = time.monotonic() + BUDGET_S * examples / (2 * total)
            call()
    summary = ", ".join(f"{label} {status}: {n}" for (label, status), n in sorted(statuses.items()))
    print(f"fuzzing: {sum(statuses.values())} requests; {summary}")
    assert not failures, "\n\n".join(failures[:5])
    chat_ok = statuses[("POST /v1/chat/completions", 200)]
    assert chat_ok > 0, f"no valid chat request reached the model: {summary}"
