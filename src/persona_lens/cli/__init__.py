"""The ``persona`` command line. Every user mistake ends with one line on stderr and exit 2.

Each command lives in its own module and registers itself on the shared Typer ``app``.
:func:`main` runs it: usage errors (an unknown option, a missing value) and
:class:`~persona_lens.core.errors.PersonaLensError` become one ``error: ...`` line, Ctrl-C
ends with ``interrupted`` and exit code 130, and library notes (``replaced PATH``) go to stderr.
Help stays rich.
"""

from __future__ import annotations

import logging
import os
import sys

from typer import _click as click
from typer.exceptions import Abort

# importing a command module registers its command on the shared app
from persona_lens.cli import (  # noqa: F401
    chat,
    demo,
    eval,
    experiment,
    export,
    extract,
    generate,
    info,
    monitor,
    screen,
    serve,
    shift,
    train,
    view,
)
from persona_lens.cli.app import app
from persona_lens.cli.screen import with_optional_values
from persona_lens.core.errors import PersonaLensError

__all__ = ["app", "main"]

INTERRUPTED = 130


def main() -> None:
    """Entry point: run the app, turning user errors into one line and exit code 2."""
    _quiet_libraries()
    _notes_to_stderr()
    try:
        code = app(args=with_optional_values(sys.argv[1:]), standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        print(exc.format_message())  # `persona` alone: the help, and click's exit code
        sys.exit(2)
    except click.exceptions.ClickException as exc:
        _fail(_usage_message(exc))
    except Abort:
        _interrupted()
    except PersonaLensError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _interrupted()
    if code == INTERRUPTED:  # typer turns Ctrl-C into this exit code
        _interrupted()
    if isinstance(code, int) and code:
        sys.exit(code)


def one_line(message: str) -> str:
    """``message`` on one line, whatever it held."""
    return " ".join(str(message).split())


def _fail(message: str) -> None:
    print(f"error: {one_line(message)}", file=sys.stderr)
    sys.exit(2)


def _interrupted() -> None:
    print("interrupted", file=sys.stderr)
    sys.exit(INTERRUPTED)


def _usage_message(exc: click.exceptions.ClickException) -> str:
    message = exc.format_message()
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        message = message.rstrip(".") + f" (see: {ctx.command_path} --help)"
    return message


def _quiet_libraries() -> None:
    """No progress bars or warnings from transformers and the Hub on our stderr: our own
    status line shows loading, and warnings there would break the one-line error promise.
    A user's own settings win."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _notes_to_stderr() -> None:
    """Library notes at INFO and above (``replaced PATH``, warnings) as plain stderr lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_NoteFormatter())
    logger = logging.getLogger("persona_lens")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


class _NoteFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = one_line(record.getMessage())
        return f"warning: {text}" if record.levelno >= logging.WARNING else text
