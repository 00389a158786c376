"""Judge spec strings (``--judge``) and the loader that builds a backend from one.

``none`` | ``openai:MODEL`` (any OpenAI-compatible server at ``OPENAI_BASE_URL`` with
``OPENAI_API_KEY``: OpenAI, vLLM, llama.cpp, ollama) | ``anthropic:MODEL``
(``ANTHROPIC_API_KEY``) | ``hf:MODEL_SPEC`` (a local model, see
:func:`persona_lens.core.models.load_model`) | ``offline`` or ``offline:minilm|embedded`` (no
network, no key; see :mod:`persona_lens.judges.offline`). Backends import only
:mod:`.base`, never this module, so there is no import cycle.
"""

from __future__ import annotations

from persona_lens.core.errors import InputError
from persona_lens.interop.llm_http import AnthropicClient, OpenAIClient
from persona_lens.judges.api import APIJudge
from persona_lens.judges.base import Judge, JudgeUnavailableError, NoJudge

JUDGE_KINDS = ("none", "openai", "anthropic", "hf", "offline")


def parse_judge_spec(spec: str, *, allow_none: bool = True) -> tuple[str, str]:
    """``(kind, argument)`` of a judge spec; InputError when malformed. ``allow_none=False``:
    for work that needs scores, where ``none`` is refused and not offered."""
    text = (spec or "").strip()
    kind, _, arg = text.partition(":")
    kind = kind.lower()
    choices = "offline, openai:MODEL, anthropic:MODEL or hf:MODEL_SPEC"
    if kind not in JUDGE_KINDS:
        raise InputError(f"unknown judge {spec!r}; use {'none, ' if allow_none else ''}{choices}")
    if kind == "none" and not allow_none:
        raise InputError(f"this command needs a judge (not 'none'): use {choices}")
    arg = arg.strip()
    if kind == "none" and arg:
        raise InputError(f"judge 'none' takes no argument (got {spec!r})")
    if kind in ("openai", "anthropic", "hf") and not arg:
        raise InputError(f"judge {kind!r} needs a model: {kind}:MODEL")
    if kind == "offline" and arg not in ("", "auto", "minilm", "embedded"):
        raise InputError(
            f"unknown offline embedder {arg!r}; use offline, offline:minilm or offline:embedded"
        )
    return kind, arg


def load_judge(spec: str, *, check: bool = False, allow_none: bool = True) -> Judge:
    """A judge for a spec. ``check=True`` also contacts the backend (or loads the offline
    embedder) now, so a misconfiguration fails before any long run starts."""
    kind, arg = parse_judge_spec(spec, allow_none=allow_none)
    judge: Judge
    if kind == "none":
        judge = NoJudge()
    elif kind == "openai":
        judge = APIJudge(spec, OpenAIClient(arg, error=JudgeUnavailableError))
    elif kind == "anthropic":
        judge = APIJudge(spec, AnthropicClient(arg, error=JudgeUnavailableError))
    elif kind == "hf":
        from persona_lens.judges.hf import HFJudge

        judge = HFJudge.from_spec(spec, arg)
    else:
        from persona_lens.judges.offline import OfflineJudgeAdapter

        judge = OfflineJudgeAdapter(spec, arg or "auto")
    if check:
        judge.check()
    return judge
