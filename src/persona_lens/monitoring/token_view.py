"""Per-token view: a self-contained HTML page colouring each generated token by its projection.

Blue is below the colour centre, white at it, red above; each trait has its own centre and
scale (the 98th percentile of the distance from the centre over the page, so one outlier token
does not wash out the rest). The centre (:data:`CENTRES`):

- ``zero``: 0, so the sign of a projection is its colour;
- ``reply``: each reply's own mean projection, so the tokens of a reply contrast with each
  other even when every value is large (with steering on, all projections may share a sign);
- ``auto`` (the default): ``reply`` for a trait whose values all share a sign, else ``zero``;
- a *baseline*: the mean token projection of an unsteered run (another generations file), so
  colour shows how far steering moved each token.

A selector switches the trait; hovering a token shows its value. Everything is inline (CSS,
JS, data): the page works offline and loads nothing.

Input records are the output of ``persona generate --token-projections``: ``tokens`` (decoded
token strings), ``token_projections`` ({trait: [one float per token]}), ``response`` and the
prompt fields (``prompt`` or ``messages``).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from persona_lens.core.errors import InputError
from persona_lens.core.files import atomic_write_text

CENTRES = ("auto", "zero", "reply")
NEGATIVE = (33, 102, 172)  # blue
POSITIVE = (178, 24, 43)  # red
MISSING = "#e8e8e8"


def colour(value: float | None, scale: float) -> str:
    """Diverging colour for ``value``: white at 0, full blue/red at -scale/+scale."""
    if value is None or not math.isfinite(value):
        return MISSING
    t = max(-1.0, min(1.0, value / scale)) if scale > 0 else 0.0
    end = POSITIVE if t > 0 else NEGATIVE
    a = abs(t)
    r, g, b = (round(255 + (c - 255) * a) for c in end)
    return f"#{r:02x}{g:02x}{b:02x}"


def text_colour(value: float | None, scale: float) -> str:
    """Dark text on light cells, white text on saturated ones."""
    if value is None or not math.isfinite(value) or scale <= 0:
        return "#111"
    return "#fff" if abs(value) / scale > 0.6 else "#111"


Sections = Sequence[Mapping[str, Sequence[float | None]]]


def _finite(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def trait_centres(
    sections: Sections, centre: str = "auto", baseline: Mapping[str, float] | None = None
) -> tuple[list[dict[str, float]], dict[str, str]]:
    """The colour centre of every trait in every section, and per trait what it is (for the
    legend). ``baseline`` (trait: value) wins for the traits it holds; see :data:`CENTRES`."""
    if centre not in CENTRES:
        raise InputError(f"unknown centre {centre!r}; choose one of {', '.join(CENTRES)}")
    traits: list[str] = []
    for projections in sections:
        traits += [t for t in projections if t not in traits]
    modes: dict[str, str] = {}
    for trait in traits:
        values = [v for p in sections for v in _finite(p.get(trait, []))]
        one_sign = bool(values) and (all(v > 0 for v in values) or all(v < 0 for v in values))
        if baseline is not None and trait in baseline:
            modes[trait] = "baseline"
        elif centre == "auto":
            modes[trait] = "reply" if one_sign else "zero"
        else:
            modes[trait] = centre
    centres = []
    for projections in sections:
        mine = {}
        for trait in traits:
            mode = modes[trait]
            if mode == "baseline" and baseline is not None:
                mine[trait] = float(baseline[trait])
            elif mode == "reply":
                mine[trait] = _mean(_finite(projections.get(trait, [])))
            else:
                mine[trait] = 0.0
        centres.append(mine)
    described = {
        t: {
            "zero": "0",
            "reply": "each reply's mean",
            "baseline": f"the baseline {baseline[t]:+.4g}" if baseline and t in baseline else "",
        }[modes[t]]
        for t in traits
    }
    return centres, described


def trait_scales(
    sections: Sections, centres: Sequence[Mapping[str, float]] | None = None
) -> dict[str, float]:
    """Per trait: the 98th percentile of |value - centre| over every section (default centre
    0; 1.0 when all values sit on it)."""
    values: dict[str, list[float]] = {}
    for index, projections in enumerate(sections):
        for trait, vals in projections.items():
            at = centres[index].get(trait, 0.0) if centres is not None else 0.0
            values.setdefault(trait, []).extend(abs(v - at) for v in _finite(vals))
    scales = {}
    for trait, vals in values.items():
        vals.sort()
        scale = vals[min(len(vals) - 1, int(0.98 * len(vals)))] if vals else 0.0
        scales[trait] = scale if scale > 0 else 1.0
    return scales


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:1.5rem auto;max-width:60rem;
 color:#111;background:#fafafa;padding:0 1rem}
header{position:sticky;top:0;background:#fafafa;padding:.5rem 0;border-bottom:1px solid #ddd;
 z-index:2}
h1{font-size:1.3rem;margin:.2rem 0}
.legend{display:flex;align-items:center;gap:.5rem;font-size:.85rem;margin-top:.4rem}
.bar{width:14rem;height:.8rem;border:1px solid #bbb;
 background:linear-gradient(90deg,#2166ac,#ffffff,#b2182b)}
section{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.8rem 1rem;margin:1rem 0}
h2{font-size:1rem;margin:0 0 .4rem}
.prompt{color:#555;font-size:.9rem;margin-bottom:.6rem;white-space:pre-wrap}
.means{color:#555;font-size:.8rem;margin-bottom:.4rem}
.tokens{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.92rem;
 line-height:1.9;white-space:pre-wrap;word-break:break-word}
.tok{border-radius:2px;padding:1px 0;cursor:default}
.tok:hover{outline:1.5px solid #000}
#tip{position:fixed;pointer-events:none;background:#222;color:#fff;font-size:.8rem;
 padding:.25rem .45rem;border-radius:4px;display:none;z-index:5;white-space:pre}
"""

_JS = """
(function(){
  var data = JSON.parse(document.getElementById('pl-data').textContent);
  var select = document.getElementById('trait');
  var tip = document.getElementById('tip');
  var toks = document.querySelectorAll('.tok');
  function show(i){
    var trait = data.traits[i];
    document.getElementById('scale').textContent = data.legends[i];
    for (var k = 0; k < toks.length; k++){
      var c = toks[k].getAttribute('data-c').split('|')[i].split(',');
      toks[k].style.background = c[0];
      toks[k].style.color = c[1];
    }
    document.querySelectorAll('.means').forEach(function(m){
      var v = m.getAttribute('data-m').split('|')[i];
      m.textContent = 'mean ' + trait + ' projection: ' + v;
    });
  }
  select.addEventListener('change', function(){
    show(select.selectedIndex);
    var name = data.traits[select.selectedIndex];
    history.replaceState(null, '', '#trait=' + encodeURIComponent(name));
  });
  var wanted = /^#trait=(.+)$/.exec(location.hash);
  if (wanted) {
    var at = data.traits.indexOf(decodeURIComponent(wanted[1]));
    if (at >= 0) { select.selectedIndex = at; }
  }
  document.addEventListener('mouseover', function(e){
    var t = e.target;
    if (!t.classList || !t.classList.contains('tok')) { tip.style.display = 'none'; return; }
    var i = select.selectedIndex;
    var v = t.getAttribute('data-v').split('|')[i];
    tip.textContent = data.traits[i] + ': ' + v + '\\ntoken: ' + JSON.stringify(t.textContent);
    tip.style.display = 'block';
  });
  document.addEventListener('mousemove', function(e){
    tip.style.left = (e.clientX + 12) + 'px';
    tip.style.top = (e.clientY + 14) + 'px';
  });
  show(select.selectedIndex);
})();
"""


def _value_text(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:+.4f}"


def _aligned(values: Sequence[Any] | None, n: int) -> list[float | None]:
    """Exactly ``n`` values (missing ones None; extra ones dropped)."""
    out: list[float | None] = []
    for v in list(values or [])[:n]:
        out.append(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None)
    return out + [None] * (n - len(out))


def _shifted(value: float | None, centre: float) -> float | None:
    return None if value is None else value - centre


def _hover_text(value: float | None, centre: float) -> str:
    if value is None or not math.isfinite(value) or centre == 0:
        return _value_text(value)
    return f"{_value_text(value)} ({value - centre:+.4f} from the colour centre)"


def _section(
    index: int,
    title: str,
    prompt: str | None,
    tokens: Sequence[str],
    projections: Mapping[str, Sequence[Any]],
    traits: Sequence[str],
    scales: Mapping[str, float],
    centres: Mapping[str, float],
) -> str:
    aligned = {t: _aligned(projections.get(t), len(tokens)) for t in traits}
    spans = []
    for position, token in enumerate(tokens):
        vals = [aligned[t][position] for t in traits]
        shifted = [_shifted(v, centres[t]) for v, t in zip(vals, traits, strict=True)]
        colours = "|".join(
            f"{colour(v, scales[t])},{text_colour(v, scales[t])}"
            for v, t in zip(shifted, traits, strict=True)
        )
        values = "|".join(_hover_text(v, centres[t]) for v, t in zip(vals, traits, strict=True))
        first, scale = shifted[0], scales[traits[0]]
        style = f"background:{colour(first, scale)};color:{text_colour(first, scale)}"
        spans.append(
            f'<span class="tok" style="{style}" data-c="{colours}" '
            f'data-v="{html.escape(values)}">{html.escape(token)}</span>'
        )
    means = []
    for t in traits:
        kept = [v for v in aligned[t] if v is not None]
        means.append(_value_text(sum(kept) / len(kept) if kept else None))
    parts = [f'<section id="r{index}">', f"<h2>{html.escape(title)}</h2>"]
    if prompt:
        parts.append(f'<div class="prompt">{html.escape(prompt)}</div>')
    parts.append(
        f'<div class="means" data-m="{"|".join(means)}">'
        f"mean {html.escape(traits[0])} projection: {means[0]}</div>"
    )
    parts.append(f'<div class="tokens">{"".join(spans)}</div></section>')
    return "\n".join(parts)


def _page(
    title: str,
    sections: Sequence[tuple[str, str | None, Sequence[str], Mapping[str, Sequence[Any]]]],
    centre: str = "auto",
    baseline: Mapping[str, float] | None = None,
) -> str:
    traits: list[str] = []
    for _, _, _, projections in sections:
        traits += [t for t in projections if t not in traits]
    if not traits:
        raise InputError("no token projections to show")
    values = [{t: _aligned(p.get(t), len(tok)) for t in p} for _, _, tok, p in sections]
    centres, described = trait_centres(values, centre, baseline)
    scales = trait_scales(values, centres)
    for t in traits:
        scales.setdefault(t, 1.0)
    body = [
        _section(i, name, prompt, tokens, projections, traits, scales, centres[i])
        for i, (name, prompt, tokens, projections) in enumerate(sections)
    ]
    options = "".join(f"<option>{html.escape(t)}</option>" for t in traits)
    legends = [f"centre {described[t]}; full colour at \u00b1{scales[t]:.3g}" for t in traits]
    data = json.dumps({"traits": traits, "scales": [scales[t] for t in traits], "legends": legends})
    data = data.replace("</", "<\\/")
    first_scale = html.escape(legends[0])
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{html.escape(title)}</title>",
            f"<style>{_CSS}</style></head><body>",
            f"<header><h1>{html.escape(title)}</h1>",
            '<label>trait <select id="trait">' + options + "</select></label>",
            '<div class="legend"><span>below</span><span class="bar"></span><span>above'
            f'</span><span id="scale">{first_scale}</span></div></header>',
            *body,
            '<div id="tip"></div>',
            f'<script type="application/json" id="pl-data">{data}</script>',
            f"<script>{_JS}</script>",
            "</body></html>",
            "",
        ]
    )


def render_token_html(
    tokens: list[str],
    projections: dict[str, list[float]],
    title: str = "persona-lens token view",
    prompt: str | None = None,
    centre: str = "auto",
    baseline: Mapping[str, float] | None = None,
) -> str:
    """One response's tokens coloured by projection, one selectable trait at a time."""
    return _page(title, [(title, prompt, tokens, projections)], centre, baseline)


def prompt_text(record: Mapping[str, Any]) -> str | None:
    """The prompt of a generation record, for display: ``prompt``, or the last user message
    (after the system message, if there is one)."""
    messages = record.get("messages")
    if isinstance(messages, list):
        last: dict[str, str] = {}
        for m in messages:
            if isinstance(m, dict) and isinstance(m.get("content"), str):
                last[str(m.get("role"))] = m["content"]
        if "user" in last:
            if "system" in last:
                return f"system: {last['system']}\nuser: {last['user']}"
            return last["user"]
    prompt = record.get("prompt")
    return prompt if isinstance(prompt, str) else None


def _check_record(record: Any, number: int) -> tuple[list[str], dict[str, list[Any]]]:
    hint = "run `persona generate --token-projections` to make them"
    if not isinstance(record, Mapping):
        raise InputError(f"record {number}: expected a JSON object")
    tokens = record.get("tokens")
    projections = record.get("token_projections")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise InputError(f"record {number} has no 'tokens' list of strings; {hint}")
    if not isinstance(projections, Mapping) or not all(
        isinstance(v, list) for v in projections.values()
    ):
        raise InputError(
            f"record {number} has no 'token_projections' object (trait: list of values); {hint}"
        )
    return tokens, {str(k): v for k, v in projections.items()}


def write_token_views(
    records: Sequence[Mapping[str, Any]],
    path: str | Path,
    title: str = "persona-lens token view",
    centre: str = "auto",
    baseline: Mapping[str, float] | None = None,
) -> Path:
    """One HTML page showing every record's tokens (atomic write); returns the path.
    ``centre`` and ``baseline`` place each trait's colour centre (module docstring)."""
    if not records:
        raise InputError("no records to show")
    sections = []
    for number, record in enumerate(records, start=1):
        tokens, projections = _check_record(record, number)
        sections.append((f"#{number}", prompt_text(record), tokens, projections))
    return atomic_write_text(path, _page(title, sections, centre, baseline), "--out")


def baseline_means(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Per trait, the mean token projection over every record (an unsteered run's records
    give the ``baseline`` colour centre)."""
    values: dict[str, list[float]] = {}
    for number, record in enumerate(records, start=1):
        _, projections = _check_record(record, number)
        for trait, vals in projections.items():
            values.setdefault(trait, []).extend(_finite(_aligned(vals, len(vals))))
    means = {t: _mean(v) for t, v in values.items() if v}
    if not means:
        raise InputError("the baseline holds no token projections")
    return means


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a generations JSONL file (one JSON object a line; blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no file at {path}")
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text ({exc.reason})") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise InputError(f"{path}:{number}: expected a JSON object")
        records.append(record)
    if not records:
        raise InputError(f"{path} holds no records")
    return records
