"""``persona chat``: an interactive chat with live trait meters, steering and guards.

The logic lives in :class:`persona_lens.monitoring.chat.ChatSession`; this module is the
terminal loop: read a line, run it as a ``/command`` or send it, print the reply and one meter
per monitored trait. A bad command prints one line and the chat goes on.

Ctrl-C while a reply is being written stops that reply (it is not added to the conversation)
and returns to the prompt; a second Ctrl-C, or Ctrl-D, leaves, after a hint that ``/save``
keeps the conversation. Meters and guard thresholds share one unit (gaps, shown).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from persona_lens.cli.app import ModelOption, app, console
from persona_lens.cli.generate import check_vector_args, load_vector_files
from persona_lens.core.errors import InputError, LayerError, PersonaLensError
from persona_lens.interop.prompts_io import (
    SteerArg,
    VectorRef,
    parse_number,
    parse_steer,
    parse_vector_ref,
)

if TYPE_CHECKING:
    from persona_lens.monitoring.chat import ChatSession, Turn

METER_WIDTH = 10  # cells on each side of the neutral mark


def meter_bar(level: float, width: int = METER_WIDTH) -> Text:
    """A centred bar: neutral in the middle, one full pos-neg gap at either end."""
    if not math.isfinite(level):
        return Text("·" * width + "│" + "·" * width, style="dim")
    cells = min(width, round(abs(level) * width))
    left = "░" * (width - cells if level < 0 else width)
    left_fill = "█" * cells if level < 0 else ""
    right_fill = "█" * cells if level > 0 else ""
    right = "░" * (width - cells if level > 0 else width)
    bar = Text()
    bar.append(left, style="dim")
    bar.append(left_fill, style="blue")
    bar.append("│")
    bar.append(right_fill, style="red")
    bar.append(right, style="dim")
    return bar


def render_turn(out: Console, session: ChatSession, turn: Turn) -> None:
    """The reply, one meter per monitored trait, and any guard events (all in gaps)."""
    from persona_lens.monitoring.chat import UNIT

    out.print(Text("assistant> ", style="bold green") + Text(turn.reply or "(empty reply)"))

    width = max((len(name) for name in turn.projections), default=0)
    for name, value in turn.projections.items():
        level = turn.levels.get(name, math.nan)
        last = f"last prompt token {turn.prompt_levels.get(name, math.nan):+.2f} {UNIT}"
        line = Text(f"  {name:<{width}} ")
        line += meter_bar(level)
        if math.isfinite(value):
            line += Text(f" response {level:+.2f} {UNIT}  {last}")
        else:
            line += Text(f"  no reply tokens  {last}")
        out.print(line, soft_wrap=True)
    levels = turn.guard_event_levels or [math.nan] * len(turn.guard_events)
    for event, level in zip(turn.guard_events, levels, strict=True):
        spec = session.guards.get(event.guard)
        action = f"steered {spec.coefficient:+g}" if spec is not None else "steered"
        threshold = session.guard_levels.get(event.guard, math.nan)
        attempt = " (regenerated reply)" if event.attempt else ""
        out.print(
            Text(
                f"  guard {event.guard}: token {event.token_index} reached {level:+.2f} {UNIT} "
                f"(threshold {threshold:+g}); {action} for the rest of the reply{attempt}",
                style="yellow",
            ),
            soft_wrap=True,
        )


def _parse_guard(text: str) -> tuple[str, float]:
    """``VEC:THRESHOLD`` (the threshold may be negative)."""
    path, sep, value = text.strip().rpartition(":")
    if not sep or not path:
        raise InputError(f"--guard {text!r}: expected VEC:THRESHOLD, e.g. evil.safetensors:3.5")
    return path, parse_number(value, f"--guard {text!r}: threshold")


@app.command()
def chat(
    model: ModelOption = "embedded",
    steer: Annotated[
        list[str] | None,
        typer.Option("--steer", "-s", help="VEC:COEF\\[@LAYER] to steer with; repeatable."),
    ] = None,
    monitor: Annotated[
        list[str] | None,
        typer.Option("--monitor", help="VEC\\[@LAYER] to show a meter for; repeatable."),
    ] = None,
    guard: Annotated[
        list[str] | None,
        typer.Option(
            "--guard",
            help="VEC:THRESHOLD: once a reply token is THRESHOLD gaps above a neutral reply "
            "(the meters' unit), steer away (--guard-coefficient) for the rest of that "
            "reply; repeatable.",
        ),
    ] = None,
    guard_coefficient: Annotated[
        float, typer.Option(help="Steering coefficient a guard applies once it fires.")
    ] = -2.0,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens per reply.")] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="0: greedy; > 0: sampling.")] = 0.0,
    seed: Annotated[int | None, typer.Option(help="Random seed for sampling.")] = None,
    vector_dir: Annotated[
        Path, typer.Option(help="Where /steer NAME looks for NAME.safetensors.")
    ] = Path("vectors"),
) -> None:
    """Chat with a model in the terminal, with a live trait meter after every reply.

    Commands in the chat:\n
      /steer TRAIT COEF, /steer TRAIT off, /steer off\n
      /monitor TRAIT, /monitor off\n
      /guard TRAIT THRESHOLD \\[COEF], /guard off\n
      /reset, /save FILE, /help, /quit\n
    TRAIT is the trait name of a loaded vector, a vector file, or NAME for
    VECTOR_DIR/NAME.safetensors. Meters and guard thresholds share one unit, the gap: 0 is a
    neutral reply, 1 the vector's whole pos-neg gap towards the trait (one bar end). The
    meter shows the response average and the last prompt token.

    Ctrl-C stops a reply and returns to the prompt; Ctrl-C again, or Ctrl-D, leaves.

    Examples:\n
      persona chat --monitor vectors/evil.safetensors\n
      persona chat --steer vectors/humorous.safetensors:1.5 --monitor vectors/humorous.safetensors\n
      persona chat --monitor vectors/evil.safetensors --guard vectors/evil.safetensors:3
    """
    from persona_lens.core.models import load_model
    from persona_lens.monitoring.chat import UNIT_HELP, ChatSession

    steer_args = [_in_dir(parse_steer(s), vector_dir) for s in steer or ()]
    monitor_refs = [_in_dir(parse_vector_ref(m, "--monitor"), vector_dir) for m in monitor or ()]
    guard_args = [
        (_in_dir(VectorRef(Path(p)), vector_dir).path, t) for p, t in map(_parse_guard, guard or ())
    ]
    _check_before_loading(steer_args, monitor_refs, [path for path, _ in guard_args])
    with console.status(f"loading {model} ..."):
        loaded = load_model(model)
    session = ChatSession.from_loaded(
        loaded,
        system=system,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        vector_dir=vector_dir,
    )
    out = Console(highlight=False)
    for arg in steer_args:
        out.print(
            session.steer(str(arg.path), arg.coefficient, arg.layers), markup=False, soft_wrap=True
        )
    for ref in monitor_refs:
        layer = ref.layers if isinstance(ref.layers, int) else None
        out.print(session.monitor(str(ref.path), layer), markup=False, soft_wrap=True)
    for path, threshold in guard_args:
        out.print(
            session.guard(str(path), threshold, guard_coefficient), markup=False, soft_wrap=True
        )
    if monitor_refs or guard_args:
        out.print(UNIT_HELP, markup=False, soft_wrap=True)
    out.print(
        f"chatting with {loaded.name}; /help for commands, /quit or Ctrl-D to leave",
        markup=False,
        soft_wrap=True,
    )
    _loop(session, out)


def _in_dir(ref: Any, vector_dir: Path) -> Any:
    """``NAME`` means VECTOR_DIR/NAME.safetensors where no file NAME exists (as in /steer)."""
    stored = vector_dir / f"{ref.path}.safetensors"
    if not ref.path.is_file() and stored.is_file():
        return replace(ref, path=stored)
    return ref


def _check_before_loading(
    steer_args: list[SteerArg], monitor_refs: list[VectorRef], guard_paths: list[Path]
) -> None:
    """Vector files and their layers, before the model loads."""
    for ref in monitor_refs:
        if ref.layers is not None and not isinstance(ref.layers, int):
            raise InputError(f"--monitor {ref.path}: a meter needs one layer")
    vectors = load_vector_files(
        [a.path for a in steer_args] + [r.path for r in monitor_refs] + guard_paths
    )
    check_vector_args(steer_args, monitor_refs, vectors)
    for path in guard_paths:
        best = vectors[path].best_layer
        if best is None or not 1 <= best <= vectors[path].num_layers:
            raise LayerError(f"--guard {path}: vector has no usable best_layer to guard at")


def _leave_hint(session: ChatSession) -> str:
    hint = "Ctrl-C again or Ctrl-D leaves the chat"
    if session.unsaved_turns:
        hint += f"; /save FILE keeps the conversation ({session.unsaved_turns} unsaved turns)"
    return hint


def _loop(session: ChatSession, out: Console) -> None:
    """Read lines until /quit, Ctrl-D or a second Ctrl-C; a bad line prints one error line.

    Ctrl-C during a reply stops it and returns to the prompt. At the prompt, Ctrl-C or
    Ctrl-D with a hint already shown leaves; otherwise it shows the hint (Ctrl-D leaves at
    once when nothing is unsaved).
    """
    from persona_lens.monitoring.chat import is_command

    armed = False  # the hint is on screen: the next Ctrl-C or Ctrl-D leaves
    while not session.closed:
        try:
            line = out.input(Text("you> ", style="bold cyan"))
        except (KeyboardInterrupt, EOFError) as exc:
            out.print()
            if armed or (isinstance(exc, EOFError) and not session.unsaved_turns):
                out.print("bye", markup=False)
                break
            out.print(_leave_hint(session), markup=False, soft_wrap=True)
            armed = True
            continue
        armed = False
        if not line.strip():
            continue
        try:
            if is_command(line):
                out.print(session.command(line), markup=False, soft_wrap=True)
                continue
            with console.status("thinking ..."):
                turn = session.send(line)
        except KeyboardInterrupt:
            out.print(f"(reply stopped) {_leave_hint(session)}", markup=False, soft_wrap=True)
            armed = True
            continue
        except PersonaLensError as exc:
            error = Text("error: ", style="red") + Text(" ".join(str(exc).split()))
            out.print(error, soft_wrap=True)
            continue
        render_turn(out, session, turn)
