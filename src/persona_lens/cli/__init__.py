"""The ``persona`` command line. Every user mistake ends with one line on stderr and exit 2.

Each command lives in its own module and registers itself on the shared Typer ``app``.
"""

from __future__ import annotations

import sys

from persona_lens.cli import demo, info  # noqa: F401  (registers the commands)
from persona_lens.cli.app import app, console
from persona_lens.errors import PersonaLensError

__all__ = ["app", "main"]


def main() -> None:
    """Entry point: run the app, turning user errors into one line and exit code 2."""
    try:
        app()
    except PersonaLensError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
