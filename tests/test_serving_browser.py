"""The web page in a real browser: Playwright driving Debian's Chromium headless against a
server on the embedded model. It sends a message, moves a slider with the keyboard, and checks
that the steered reply changes (and the unsteered one beside it does not), that meters and
coloured tokens appear, that a guard alert shows, and that the reproduce panel holds the request.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.serving_support import embedded_with_vectors, serve

sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.embedded

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
PROMPT = "Tell me about the moon."


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    folder = tmp_path_factory.mktemp("browser-vectors")
    with serve(embedded_with_vectors(folder), folder, default_max_tokens=24) as served:
        yield served


def _chromium() -> Path:
    if CHROMIUM.exists():
        return CHROMIUM
    if os.environ.get("PERSONA_LENS_REQUIRE_BROWSER"):
        pytest.fail(f"{CHROMIUM} is missing (apt-get install -y --no-install-recommends chromium)")
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")


def test_the_page_steers_monitors_and_reproduces(
    server: Any, tmp_path: Path, save_artifact: Callable[[str], Path]
) -> None:
    chromium = _chromium()
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh user data dir
            executable_path=str(chromium),
            args=FLAGS,
            headless=True,
            viewport={"width": 1400, "height": 900},
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            _drive(page, server, save_artifact)
        finally:
            context.close()


def _send(page: Any, count: int) -> None:
    page.get_by_test_id("message").fill(PROMPT)
    page.get_by_test_id("send").click()
    page.wait_for_function(
        f"document.querySelectorAll('.reply[data-done=true]').length >= {count}", timeout=180_000
    )


def _drive(page: Any, server: Any, save_artifact: Callable[[str], Path]) -> None:
    page.goto(server.url)
    page.wait_for_selector("body[data-ready=true]", timeout=30_000)
    assert page.locator("#sliders input[type=range]").count() == len(server.library)
    page.locator("#max-tokens").fill("16")

    _send(page, 1)  # unsteered
    first = page.get_by_test_id("reply-steered").inner_text().split("\n")[1]
    assert first.strip()
    assert page.locator(".reply .token").count() > 0
    meters = page.locator(".reply [data-testid^=meter-]")
    assert meters.count() == len(server.library)

    slider = page.get_by_test_id("slider-humorous")
    slider.focus()
    for _ in range(20):  # 0.0 -> 2.0 in steps of 0.1
        slider.press("ArrowRight")
    assert float(slider.input_value()) == pytest.approx(2.0)
    page.get_by_test_id("compare").check()
    page.locator("#guard-on").check()
    page.locator("#guard-trait").select_option("humorous")
    page.locator("#guard-threshold").fill("-1000")  # fires on the first reply token
    page.locator("#new-chat").click()
    _send(page, 2)

    steered = page.get_by_test_id("reply-steered").locator(".text").inner_text()
    unsteered = page.get_by_test_id("reply-unsteered").locator(".text").inner_text()
    assert steered != first, "moving the slider did not change the reply"
    assert unsteered == first, "the unsteered reply should repeat the first (greedy) one"
    assert page.get_by_test_id("guard-alert").first.is_visible()
    coloured = page.locator(".reply .token").evaluate_all(
        "spans => spans.filter(s => s.style.backgroundColor && "
        "s.style.backgroundColor !== 'transparent').length"
    )
    assert coloured > 0, "no token is coloured by its projection"
    page.get_by_test_id("colour-trait").select_option("evil")  # recolour by another trait
    assert page.locator("[data-testid=meter-humorous]").count() == 2
    curl = page.get_by_test_id("code-curl").inner_text()
    assert '"humorous": 2' in curl and "/v1/chat/completions" in curl
    page.locator(".tab[data-tab=python]").click()
    python = page.get_by_test_id("code-python").inner_text()
    assert "from openai import OpenAI" in python and 'extra_body={"persona"' in python
    page.locator(".tab[data-tab=curl]").click()
    shot = save_artifact("serving-page.png")
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
