"""The work folder of a training run: ``.DIR.partial`` beside the output folder ``DIR``.

It holds the run's identity (``run.json``: model, data hash, settings, interventions, world
size), the Trainer's checkpoints and, at the end, the finished files, which :func:`publish`
renames to ``DIR`` in one step. A checkpoint counts only once it carries the completion
marker, written after the Trainer has saved all of it. Light imports only: the command line
checks the output folder before loading anything heavy.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from persona_lens.core.errors import InputError
from persona_lens.core.files import atomic_write_text

IDENTITY = "run.json"
COMPLETE = "persona-lens-complete"  # marker file of a fully written checkpoint


def partial_dir(out: Path) -> Path:
    """The work folder of a run writing ``out``."""
    return out.parent / f".{out.name}.partial"


def check_out(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse an existing ``out`` without ``overwrite``, and a killed run's work folder
    without ``resume`` or ``overwrite``."""
    work = partial_dir(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a folder for the adapter")
    if out.exists() and not overwrite:
        raise InputError(f"--out {out} already exists; pass --overwrite to replace it")
    if work.exists() and not (resume or overwrite):
        raise InputError(
            f"a killed run left {work}; pass --resume to continue it or --overwrite to start over"
        )


def last_complete_checkpoint(folder: Path) -> Path | None:
    """The highest-step checkpoint in ``folder`` that carries the completion marker."""
    if not folder.is_dir():
        return None
    found = []
    for path in folder.glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        if step.isdigit() and (path / COMPLETE).is_file():
            found.append((int(step), path))
    return max(found)[1] if found else None


def prepare_work(
    work: Path, identity: dict[str, Any], *, resume: bool, overwrite: bool
) -> Path | None:
    """Create (or, resuming, check) the work folder; returns the checkpoint to resume from."""
    stored = work / IDENTITY
    if resume and stored.is_file():
        previous = json.loads(stored.read_text(encoding="utf-8"))
        differs = [k for k in identity if previous.get(k) != identity[k]]
        if differs:
            raise InputError(
                f"--resume: {work} was started with a different {', '.join(differs)}; "
                "pass --overwrite to start over"
            )
        shutil.rmtree(work / "final", ignore_errors=True)
        return last_complete_checkpoint(work / "checkpoints")
    if work.exists() and (overwrite or resume):
        shutil.rmtree(work)
    work.mkdir(parents=True)
    atomic_write_text(stored, json.dumps(identity, indent=2) + "\n")
    return None


def publish(work: Path, out: Path) -> None:
    """Move the finished files (``work/final``) to ``out``, replacing an old ``out``, then
    drop the work folder."""
    final = work / "final"
    if out.exists():
        old = out.parent / f".{out.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(final, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(final, out)
    shutil.rmtree(work, ignore_errors=True)
