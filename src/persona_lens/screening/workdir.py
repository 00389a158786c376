"""The work folder of a screening run: one finished file per shard, so a killed run resumes.

``manifest.json`` holds what the results depend on (input identity, model fingerprint,
vectors, settings, shard size). A rerun with the same manifest keeps the finished shards and
computes only the others; a different manifest starts over. Each shard's file is written
atomically once the whole shard is scored, so kill -9 loses at most the shard in progress, and
the final outputs, built only from these files, come out the same byte for byte.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from persona_lens.core.files import atomic_write, atomic_write_text

_SHARD_FILE = re.compile(r"^shard-(\d{6})\.jsonl$")


class WorkDir:
    """Finished shards of one run under ``path``."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest

    def open(self) -> set[int]:
        """Create the folder or resume it; returns the indices of the shards already done."""
        manifest_path = self.path / "manifest.json"
        text = json.dumps(self.manifest, sort_keys=True, indent=1)
        if manifest_path.is_file() and manifest_path.read_text(encoding="utf-8") == text:
            for stale in self.path.glob(".*.tmp"):  # a shard being written when killed
                stale.unlink(missing_ok=True)
            return self.done()
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        atomic_write_text(manifest_path, text)
        return set()

    def done(self) -> set[int]:
        found = (_SHARD_FILE.match(p.name) for p in self.path.iterdir())
        return {int(m.group(1)) for m in found if m}

    def shard_path(self, index: int) -> Path:
        return self.path / f"shard-{index:06d}.jsonl"

    def write_shard(self, index: int, lines: list[str]) -> None:
        """Store one finished shard (one JSON object a line), atomically."""

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as handle:
                handle.writelines(line + "\n" for line in lines)

        atomic_write(self.shard_path(index), write)

    def lines(self, shards: int) -> Iterator[str]:
        """Every stored line, shard by shard in order."""
        for index in range(shards):
            with self.shard_path(index).open(encoding="utf-8") as handle:
                yield from (line.rstrip("\n") for line in handle)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
