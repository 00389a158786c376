"""Output paths (core/files.py): what writing to each kind of path means, checked in-process.
The command-line side (exit codes, one-line errors, ``-``) is in test_cli_inputs.py."""

from __future__ import annotations

import logging
import os
import stat
import threading
from pathlib import Path

import pytest

from persona_lens.core.errors import InputError
from persona_lens.core.files import atomic_write_text, check_output, check_output_folder


@pytest.fixture
def umask_027() -> object:
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_new_file_gets_the_umask_mode_and_nested_folders(tmp_path: Path, umask_027: object) -> None:
    path = atomic_write_text(tmp_path / "a" / "b" / "out.txt", "hi\n")
    assert path.read_text() == "hi\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.txt"]  # no temp file left


def test_replacing_keeps_the_mode_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "out.txt"
    path.write_text("old\n")
    os.chmod(path, 0o600)
    with caplog.at_level(logging.INFO, logger="persona_lens.files"):
        atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [r.getMessage() for r in caplog.records] == [f"replaced {path}"]


def test_new_file_is_not_announced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="persona_lens.files"):
        atomic_write_text(tmp_path / "new.txt", "x")
    assert caplog.records == []


def test_symlink_target_is_replaced_and_the_link_kept(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "data.txt"
    target.write_text("old\n")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    assert check_output(link).target == target.resolve()
    atomic_write_text(link, "new\n")
    assert link.is_symlink() and target.read_text() == "new\n"
    dangling = tmp_path / "dangling.txt"
    dangling.symlink_to(tmp_path / "real" / "later.txt")
    atomic_write_text(dangling, "made\n")  # a dangling link: its target is created
    assert dangling.is_symlink() and (tmp_path / "real" / "later.txt").read_text() == "made\n"


def test_fifo_is_streamed_into(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    target = check_output(fifo)
    assert target.stream and not target.replaces
    atomic_write_text(fifo, "streamed\n")
    reader.join(timeout=10)
    assert received == [b"streamed\n"] and stat.S_ISFIFO(fifo.stat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_character_device_is_streamed_not_replaced() -> None:
    if not Path("/dev/null").exists():
        pytest.skip("no /dev/null")
    target = check_output("/dev/null")
    assert target.stream and not target.to_stdout
    atomic_write_text("/dev/null", "gone\n")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_refused_paths_leave_nothing(tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    before = sorted(p.name for p in tmp_path.iterdir())
    for path, needle in (
        (tmp_path / "folder", "is a directory"),
        (tmp_path / "file" / "below.txt", "is not a folder"),
        ("", "is empty"),
    ):
        with pytest.raises(InputError, match=needle):
            check_output(path, "--out")
        with pytest.raises(InputError, match=needle):
            atomic_write_text(path, "x")
    with pytest.raises(InputError, match="is a file; give a folder"):
        check_output_folder(tmp_path / "file")
    check_output(tmp_path / "new" / "deep" / "out.txt")  # a check creates nothing
    check_output_folder(tmp_path / "new-folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_failing_writer_leaves_the_old_file(tmp_path: Path) -> None:
    from persona_lens.core.files import atomic_write

    path = tmp_path / "out.txt"
    path.write_text("old\n")

    def broken(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(InputError, match=r"cannot write .*disk full"):
        atomic_write(path, broken)
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
