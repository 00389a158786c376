"""``persona chat``: an interactive chat with live trait meters, steering and guards.

The logic lives in :class:`persona_lens.monitoring.chat.ChatSession`; this module is the
terminal loop: read a line, run it as a ``/command`` or send it, print the reply and one meter
per monitored trait. A bad command prints one line and the chat goes on.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.text import Text

from persona_lens.cli.app import ModelOption, app, console
from persona_lens.core.errors import InputError, PersonaLensError
from persona_lens.interop.prompts_io import parse_number, parse_steer, parse_vector_ref

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
    """The reply, one meter per monitored trait, and any guard events."""
    out.print(Text("assistant> ", style="bold green") + Text(turn.reply or "(empty reply)"))

    width = max((len(name) for name in turn.projections), default=0)
    for name, value in turn.projections.items():
        level = turn.levels.get(name, math.nan)
        last = f"last prompt token {turn.prompt_projections.get(name, math.nan):+.3f}"
        line = Text(f"  {name:<{width}} ")
        line += meter_bar(level)
        if math.isfinite(value):
            line += Text(f" {level:+.2f}  response {value:+.3f}  {last}")
        else:
            line += Text(f"  no reply tokens  {last}")
        out.print(line, soft_wrap=True)
    for event in turn.guard_events:
        spec = session.guards.get(event.guard)
        action = f"steered {spec.coefficient:+g}" if spec is not None else "steered"
        attempt = " (regenerated reply)" if event.attempt else ""
        out.print(
            Text(
                f"  guard {event.guard}: token {event.token_index} projected "
                f"{event.projection:+.3f}; {action} for the rest of the reply{attempt}",
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
            help="VEC:THRESHOLD: when a reply token's projection exceeds THRESHOLD, steer "
            "away (--guard-coefficient) for the rest of that reply; repeatable.",
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
    VECTOR_DIR/NAME.safetensors. The meter shows each monitored trait's response-average
    projection relative to a neutral reply (one bar end = the vector's pos-neg gap), and the
    projection of the last prompt token.

    Examples:\n
      persona chat --monitor vectors/evil.safetensors\n
      persona chat --steer vectors/humorous.safetensors:1.5 --monitor vectors/humorous.safetensors\n
      persona chat --monitor vectors/evil.safetensors --guard vectors/evil.safetensors:3
    """
    from persona_lens.core.models import load_model
    from persona_lens.monitoring.chat import ChatSession

    steer_args = [parse_steer(s) for s in steer or ()]
    monitor_refs = [parse_vector_ref(m, "--monitor") for m in monitor or ()]
    guard_args = [_parse_guard(g) for g in guard or ()]
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
        if ref.layers is not None and not isinstance(ref.layers, int):
            raise InputError(f"--monitor {ref.path}: a meter needs one layer")
        out.print(session.monitor(str(ref.path), ref.layers), markup=False, soft_wrap=True)
    for path, threshold in guard_args:
        out.print(session.guard(path, threshold, guard_coefficient), markup=False, soft_wrap=True)
    out.print(
        f"chatting with {loaded.name}; /help for commands, /quit to leave",
        markup=False,
        soft_wrap=True,
    )
    _loop(session, out)


def _loop(session: ChatSession, out: Console) -> None:
    """Read lines until /quit or end of input; a bad line prints one error line."""
    from persona_lens.monitoring.chat import is_command

    while not session.closed:
        try:
            line = out.input(Text("you> ", style="bold cyan"))
        except EOFError:
            break
        if not line.strip():
            continue
        try:
            if is_command(line):
                out.print(session.command(line), markup=False, soft_wrap=True)
                continue
            with console.status("thinking ..."):
                turn = session.send(line)
        except PersonaLensError as exc:
            error = Text("error: ", style="red") + Text(str(exc).splitlines()[0])
            out.print(error, soft_wrap=True)
            continue
        render_turn(out, session, turn)
