"""Output paths: checked before any work, then written atomically or streamed into.

One place decides what writing to a path means, for every command and every output:

- a regular file, or a new path: written to a temp file in the same folder, then renamed over
  it, so a crash or an error never leaves a half-written file under the final name. A new file
  gets the mode the umask allows (0644 typically); a replaced file keeps its mode;
- a symlink: followed; its target is replaced that way and the link stays a link;
- ``-`` (standard output), a FIFO or a character device (``/dev/null``, a terminal): streamed
  into, never replaced. The bytes are produced in a private temp file first, so a failed
  writer sends nothing;
- a directory, another kind of special file, or a place that cannot be written: refused with
  :class:`~persona_lens.core.errors.InputError`.

:func:`check_output` applies these rules without writing anything, so commands call it before
they load a model. Replacing an existing file logs ``replaced PATH`` on the
``persona_lens.files`` logger (level INFO), which the command line prints on stderr.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from persona_lens.core.errors import InputError

STDOUT = "-"
"""The output path that means standard output."""

log = logging.getLogger("persona_lens.files")
_umask_lock = threading.Lock()


@dataclass(frozen=True)
class OutputTarget:
    """Where an output path sends its bytes. ``target`` is the file that is replaced (symlinks
    followed) or the stream that is written; ``replaces``: a regular file is there now."""

    path: Path
    target: Path
    stream: bool = False
    to_stdout: bool = False
    replaces: bool = False


def is_stdout(path: str | Path) -> bool:
    """Whether writing to ``path`` means writing to this process's standard output."""
    if str(path) == STDOUT:
        return True
    try:
        return _same_as_stdout(Path(path).stat())
    except OSError:
        return False


def check_output(path: str | Path, what: str = "output") -> OutputTarget:
    """Apply the rules of this module to ``path`` without writing; InputError when refused.

    ``what`` names the path in messages (an option such as ``--out``).
    """
    if str(path) == STDOUT:
        return OutputTarget(Path(STDOUT), Path(STDOUT), stream=True, to_stdout=True)
    given = Path(path)
    if not str(path).strip():
        raise InputError(f"{what} is empty; give a file path (or - for standard output)")
    try:
        info = given.stat()  # follows symlinks
    except (FileNotFoundError, NotADirectoryError):
        info = None
    except OSError as exc:
        raise InputError(f"{what} {given}: {exc.strerror or exc}") from None
    if info is None:
        # a new file, or a dangling symlink whose target is created
        target = Path(os.path.realpath(given)) if given.is_symlink() else given
        _check_folder(target.parent, what, given)
        return OutputTarget(given, target)
    mode = info.st_mode
    if stat.S_ISDIR(mode):
        raise InputError(f"{what} {given} is a directory; give a file path")
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
        if not os.access(given, os.W_OK):
            raise InputError(f"{what} {given} is not writable")
        return OutputTarget(given, given, stream=True, to_stdout=_same_as_stdout(info))
    if not stat.S_ISREG(mode):
        raise InputError(f"{what} {given} is neither a regular file, a FIFO nor a character device")
    if _same_as_stdout(info):  # e.g. -o /dev/stdout with stdout redirected to a file
        return OutputTarget(given, given, stream=True, to_stdout=True)
    target = Path(os.path.realpath(given))
    _check_folder(target.parent, what, given)
    return OutputTarget(given, target, replaces=True)


def check_output_folder(path: str | Path, what: str = "output folder") -> Path:
    """A folder outputs go into: an existing directory, or a new one that can be created;
    InputError otherwise (nothing is created here)."""
    folder = Path(path)
    if not str(path).strip() or str(path) == STDOUT:
        raise InputError(f"{what} must be a folder, not {str(path)!r}")
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{what} {folder} is a file; give a folder")
    _check_folder(folder, what, folder)
    return folder


def atomic_write(path: str | Path, write: Callable[[str], None], what: str = "output") -> Path:
    """Call ``write(temp_path)``, then move the temp file to ``path`` (or stream it there);
    returns ``path`` as given. InputError when the path is refused or cannot be written."""
    target = check_output(path, what)
    if target.stream:
        _stream(target, write)
        return target.path
    folder = target.target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.target.name}.", suffix=".tmp", dir=folder)
        os.close(fd)
    except OSError as exc:
        raise InputError(f"cannot write {target.path}: {exc.strerror or exc}") from None
    try:
        write(tmp)
        os.chmod(tmp, _mode_for(target.target))
        os.replace(tmp, target.target)
    except OSError as exc:
        raise InputError(f"cannot write {target.path}: {exc.strerror or exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if target.replaces:
        log.info("replaced %s", target.path)
    return target.path


def atomic_write_text(path: str | Path, text: str, what: str = "output") -> Path:
    def write(tmp: str) -> None:
        Path(tmp).write_text(text, encoding="utf-8")

    return atomic_write(path, write, what)


# --- helpers ----------------------------------------------------------------------------------
def _check_folder(folder: Path, what: str, given: Path) -> None:
    """The nearest existing ancestor of ``folder`` must be a directory we can create files in
    (probed with a temp file that is removed at once)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{what} {given}: {existing} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".persona-lens-probe-", dir=existing)
    except OSError as exc:
        raise InputError(f"{what} {given}: cannot write in {existing} ({exc.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def _same_as_stdout(info: os.stat_result) -> bool:
    try:
        return os.path.samestat(info, os.fstat(1))
    except OSError:
        return False


def _stream(target: OutputTarget, write: Callable[[str], None]) -> None:
    with tempfile.TemporaryDirectory(prefix="persona-lens-") as folder:
        tmp = os.path.join(folder, "output")
        write(tmp)
        try:
            with open(tmp, "rb") as source:
                if target.to_stdout:
                    _copy_to_stdout(source)
                else:
                    with open(target.target, "wb") as sink:
                        shutil.copyfileobj(source, sink)
        except BrokenPipeError:
            raise  # the reader went away: the command line exits quietly
        except OSError as exc:
            raise InputError(f"cannot write {target.path}: {exc.strerror or exc}") from exc


def _copy_to_stdout(source: object) -> None:
    sys.stdout.flush()
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is not None:
        shutil.copyfileobj(source, buffer)  # type: ignore[arg-type]
        buffer.flush()
    else:  # a text-only stdout (some test runners)
        sys.stdout.write(source.read().decode("utf-8", "replace"))  # type: ignore[attr-defined]
        sys.stdout.flush()


def _mode_for(target: Path) -> int:
    """A replaced file keeps its mode; a new one gets 0666 minus the umask."""
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _umask() -> int:
    try:  # Linux says it without changing it
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask
