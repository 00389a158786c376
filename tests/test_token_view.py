"""The per-token HTML view: every token shown (escaped), diverging colours, trait selector,
self-contained (no external URLs), bad input -> one line, exit 2."""

from __future__ import annotations

import json
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from persona_lens.core.errors import InputError
from persona_lens.monitoring.token_view import colour, render_token_html, write_token_views
from tests.cli_run import persona


class Page(HTMLParser):
    """Collects token spans (text + style), options, and every src/href."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens: list[dict[str, str]] = []
        self.options: list[str] = []
        self.links: list[str] = []
        self._in: str | None = None
        self._attrs: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.links += [a[k] for k in ("src", "href") if k in a]
        if tag == "span" and a.get("class") == "tok":
            self._in, self._attrs = "tok", a
            self.tokens.append({**a, "text": ""})
        elif tag == "option":
            self._in = "option"
            self.options.append("")

    def handle_endtag(self, tag: str) -> None:
        self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "tok":
            self.tokens[-1]["text"] += data
        elif self._in == "option":
            self.options[-1] += data


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    return page


def rgb(style: str) -> tuple[int, int, int]:
    match = re.search(r"background:#([0-9a-f]{6})", style)
    assert match, style
    h = match.group(1)
    return int(h[:2], 16), int(h[2:4], 16), int(h[4:], 16)


TOKENS = ["Hello", " there", ",", " <b>friend</b>", " &", "\n", " bye"]
PROJ = {
    "humorous": [2.0, -2.0, 0.0, 1.0, -0.5, 0.1, -1.0],
    "evil": [-1.0, 0.5, 0.0, 0.2, 3.0, -3.0, 0.0],
}


def test_every_token_shown_in_order_and_escaped() -> None:
    html = render_token_html(TOKENS, PROJ, title="demo", prompt="Tell me <a> joke")
    page = parse(html)
    assert [t["text"] for t in page.tokens] == TOKENS
    assert "<b>friend</b>" not in html  # escaped, not markup
    assert "Tell me &lt;a&gt; joke" in html
    assert page.options == ["humorous", "evil"]


def test_colours_diverge_around_zero() -> None:
    page = parse(render_token_html(TOKENS, PROJ, title="demo"))
    styles = [rgb(t["style"]) for t in page.tokens]
    positive, negative, zero = styles[0], styles[1], styles[2]
    assert positive[0] > positive[2]  # red
    assert negative[2] > negative[0]  # blue
    assert zero == (255, 255, 255)
    assert positive != negative
    # the scale is per trait: the other trait's colours ride along for the selector
    first = page.tokens[0]["data-c"].split("|")
    assert len(first) == 2 and first[0] != first[1]
    assert page.tokens[0]["data-v"].split("|") == ["+2.0000", "-1.0000"]
    assert colour(None, 1.0) == colour(float("nan"), 1.0) != colour(0.0, 1.0)
    assert colour(5.0, 1.0) == colour(1.0, 1.0)  # clamped at the scale


def test_self_contained_no_external_urls() -> None:
    html = render_token_html(TOKENS, PROJ, title="demo")
    page = parse(html)
    assert page.links == []
    assert "http://" not in html and "https://" not in html
    assert "<script src" not in html and "<link" not in html


def test_write_token_views_all_records(tmp_path: Path) -> None:
    records = [
        {
            "prompt": "first?",
            "response": "a b",
            "tokens": ["a", " b"],
            "token_projections": {"humorous": [1.0, -1.0]},
        },
        {
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "second?"},
            ],
            "response": "c",
            "tokens": ["c"],
            "token_projections": {"humorous": [0.5], "evil": [2.0]},
        },
    ]
    path = write_token_views(records, tmp_path / "page.html")
    html = path.read_text()
    page = parse(html)
    assert [t["text"] for t in page.tokens] == ["a", " b", "c"]
    assert page.options == ["humorous", "evil"]
    assert "first?" in html and "second?" in html
    # a trait missing from a record is grey, not coloured
    assert page.tokens[0]["data-c"].split("|")[1].startswith("#e8e8e8")
    for bad in ([{"response": "x"}], [{"tokens": ["a"], "token_projections": [1]}], []):
        with pytest.raises(InputError):
            write_token_views(bad, tmp_path / "bad.html")
    assert not (tmp_path / "bad.html").exists()


def test_mismatched_lengths_do_not_crash() -> None:
    page = parse(render_token_html(["a", "b", "c"], {"t": [1.0]}, title="x"))
    assert [t["text"] for t in page.tokens] == ["a", "b", "c"]
    assert page.tokens[2]["data-v"] == "n/a"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return persona("view", *args, timeout=120)


def test_cli_view(tmp_path: Path) -> None:
    gen = tmp_path / "gen.jsonl"
    rows = [
        {
            "prompt": "p",
            "response": "x y",
            "tokens": ["x", " y"],
            "token_projections": {"evil": [0.3, -0.2]},
        }
    ]
    gen.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "page.html"
    proc = _cli(str(gen), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    assert [t["text"] for t in parse(out.read_text()).tokens] == ["x", " y"]

    gen.write_text('{"prompt": "p", "response": "no tokens"}\n')
    bad = tmp_path / "bad.html"
    proc = _cli(str(gen), "--out", str(bad))
    assert proc.returncode == 2 and "--token-projections" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not bad.exists()
    proc = _cli(str(tmp_path / "missing.jsonl"), "--out", str(bad))
    assert proc.returncode == 2 and "no file" in proc.stderr


def test_all_positive_values_are_centred_on_the_reply_mean() -> None:
    """With steering on, every projection may share a sign: the default centre is then the
    reply's mean, so tokens above it are red, tokens below it blue (not all red)."""
    values = [47.0, 87.0, 60.0, 75.0, 50.0]
    mean = sum(values) / len(values)
    tokens = [f"t{i}" for i in range(len(values))]
    for centre in ("auto", "reply"):
        page = parse(render_token_html(tokens, {"evil": values}, centre=centre))
        for token, value in zip(page.tokens, values, strict=True):
            r, _, b = rgb(token["style"])
            assert (r > b) == (value > mean), (centre, value)
        assert "centre each reply" in render_token_html(tokens, {"evil": values}, centre=centre)
    zero = parse(render_token_html(tokens, {"evil": values}, centre="zero"))
    assert all(rgb(t["style"])[0] > rgb(t["style"])[2] for t in zero.tokens)  # all red at 0


def test_baseline_centre_and_mixed_signs_stay_at_zero() -> None:
    from persona_lens.monitoring.token_view import trait_centres

    sections = [{"a": [1.0, -1.0], "b": [5.0, 7.0]}, {"a": [2.0], "b": [9.0]}]
    centres, described = trait_centres(sections)
    assert [c["a"] for c in centres] == [0.0, 0.0] and described["a"] == "0"
    assert [c["b"] for c in centres] == [6.0, 9.0] and described["b"] == "each reply's mean"
    centres, described = trait_centres(sections, baseline={"b": 4.0})
    assert [c["b"] for c in centres] == [4.0, 4.0] and described["b"].startswith("the baseline")
    with pytest.raises(InputError, match="unknown centre"):
        trait_centres(sections, "middle")
