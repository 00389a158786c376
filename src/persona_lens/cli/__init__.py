"""The ``persona`` command line. Every user mistake ends with one line on stderr and exit 2.

Each command lives in its own module and registers itself on the shared Typer ``app``.
"""

from __future__ import annotations

import sys

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
    serve,
    view,
)
from persona_lens.cli.app import app
from persona_lens.core.errors import PersonaLensError

__all__ = ["app", "main"]


def main() -> None:
    """Entry point: run the app, turning user errors into one line and exit code 2."""
    try:
        app()
    except PersonaLensError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the message held
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
