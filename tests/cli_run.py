"""Run the real ``persona`` command in a subprocess, as a user's shell would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ENTRY = "from persona_lens.cli import main; main()"


def persona(
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """``persona ARGS...`` with captured text output (never raises on a non-zero exit)."""
    return subprocess.run(
        [sys.executable, "-c", ENTRY, *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def assert_one_line_error(
    proc: subprocess.CompletedProcess[str], needle: str, out: Path | None = None
) -> None:
    """Exit code 2, one stderr line (``error: ...``, no traceback) containing ``needle``,
    nothing on stdout, and no output file."""
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == "", proc.stdout
    assert out is None or not out.exists()
