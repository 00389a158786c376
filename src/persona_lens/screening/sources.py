"""Dataset files read in shards, never whole: JSONL, CSV, Parquet, or a saved HF dataset.

:func:`open_source` names the format (and refuses unreadable or unknown inputs);
:func:`plan_shards` makes one streaming pass that records where each shard starts (a byte
offset, a row group and offset, or a record index), so any shard can be read on its own, by
this process or by a Ray worker; :class:`ShardReader` reads one shard's rows;
:func:`write_clean` copies the rows to keep in the input's own format.

Row numbers are 1-based: the line number for JSONL (blank lines are not rows), the record
number otherwise. Parquet shards never span row groups; a shard read out of order decodes its
row group from the start, so for files with very large row groups a local run (which reads
in order) reads less than Ray workers do.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from persona_lens.core.errors import InputError
from persona_lens.core.files import atomic_write
from persona_lens.screening.samples import SkippedRow

FORMATS = ("jsonl", "csv", "parquet", "hf")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv"}
_SUFFIXES |= {".parquet": "parquet", ".pq": "parquet"}
_CSV_FIELD_LIMIT = 1 << 26


@dataclass(frozen=True)
class Source:
    """A dataset on disk and its format (one of :data:`FORMATS`)."""

    path: Path
    format: str

    def identity(self) -> dict[str, Any]:
        """What a resumed run checks: path, format, sizes and modification times."""
        if self.path.is_dir():
            found = sorted(f for f in self.path.rglob("*") if f.is_file())
            files = [(str(f.relative_to(self.path)), f.stat()) for f in found]
        else:
            files = [("", self.path.stat())]
        return {
            "path": str(self.path.resolve()),
            "format": self.format,
            "files": [[name, st.st_size, st.st_mtime_ns] for name, st in files],
        }


@dataclass(frozen=True)
class Shard:
    """Rows ``first_row .. first_row + rows - 1`` (physical rows: JSONL lines, records)."""

    index: int
    first_row: int
    rows: int
    cursor: tuple[int, int]  # (byte offset, 0) | (row group, offset in it) | (record index, 0)


@dataclass(frozen=True)
class RawRow:
    """One row as read: its parsed record, or why it could not be parsed."""

    row: int
    record: dict[str, Any] | None
    skipped: SkippedRow | None = None


def format_of(path: Path) -> str:
    """The format a path names (InputError for an unknown one)."""
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            raise InputError(
                f"{path} is a saved DatasetDict; pass one split's folder (e.g. {path / 'train'})"
            )
        if (path / "state.json").is_file() or (path / "dataset_info.json").is_file():
            return "hf"
        raise InputError(f"{path} is a folder but not a dataset saved with save_to_disk")
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise InputError(
            f"{path}: unknown dataset format {path.suffix!r}; use .jsonl, .csv, .parquet "
            "or a folder saved with datasets' save_to_disk"
        )
    return fmt


def open_source(path: str | Path) -> Source:
    """The dataset at ``path``; InputError if it is missing, unreadable or of unknown format."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"no dataset at {path}")
    fmt = format_of(path)
    if fmt != "hf":
        try:
            with path.open("rb") as handle:
                handle.read(1)
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return Source(path, fmt)


# --- planning ---------------------------------------------------------------------------------
def plan_shards(source: Source, shard_size: int) -> list[Shard]:
    """One streaming pass over ``source``: where each shard of ``shard_size`` rows starts.

    InputError for an empty dataset, a table without usable columns, or a file the format's
    reader refuses.
    """
    if shard_size < 1:
        raise InputError("shard size must be at least 1")
    planner = {"jsonl": _plan_jsonl, "csv": _plan_csv, "parquet": _plan_parquet, "hf": _plan_hf}
    shards = planner[source.format](source, shard_size)
    if not shards:
        raise InputError(f"{source.path} holds no rows")
    return shards


def _plan_jsonl(source: Source, size: int) -> list[Shard]:
    shards: list[Shard] = []
    line = 0
    start = (0, 1)  # (offset, first line) of the shard being filled
    nonblank = False
    with source.path.open("rb") as handle:
        while True:
            offset = handle.tell()
            text = handle.readline()
            if not text:
                break
            line += 1
            nonblank = nonblank or bool(text.strip())
            if (line - 1) % size == 0:
                start = (offset, line)
            if line % size == 0:
                shards.append(Shard(len(shards), start[1], size, (start[0], 0)))
    if line % size:
        shards.append(Shard(len(shards), start[1], line - start[1] + 1, (start[0], 0)))
    return shards if nonblank else []


def _plan_csv(source: Source, size: int) -> list[Shard]:
    shards: list[Shard] = []
    with source.path.open("rb") as handle:
        header = _csv_header(handle, source.path)
        missing = {"prompt", "response"} - set(header)
        if missing:
            raise InputError(
                f"{source.path}: a CSV dataset needs 'prompt' and 'response' columns "
                f"(missing {', '.join(sorted(missing))})"
            )
        count = 0
        for offset, _, _, _ in _csv_records(handle):
            if count % size == 0:
                shards.append(Shard(len(shards), count + 1, 0, (offset, 0)))
            count += 1
    return [
        Shard(s.index, s.first_row, min(size, count - s.first_row + 1), s.cursor) for s in shards
    ]


def _plan_parquet(source: Source, size: int) -> list[Shard]:
    handle = _parquet_file(source.path)
    _check_columns(handle.schema_arrow.names, source.path)
    shards: list[Shard] = []
    first = 1
    for group in range(handle.num_row_groups):
        rows = handle.metadata.row_group(group).num_rows
        for offset in range(0, rows, size):
            count = min(size, rows - offset)
            shards.append(Shard(len(shards), first + offset, count, (group, offset)))
        first += rows
    return shards


def _plan_hf(source: Source, size: int) -> list[Shard]:
    dataset = _load_hf(source.path)
    _check_columns(dataset.column_names, source.path)
    total = dataset.num_rows
    return [
        Shard(i, start + 1, min(size, total - start), (start, 0))
        for i, start in enumerate(range(0, total, size))
    ]


def _check_columns(names: list[str], path: Path) -> None:
    if "messages" not in names and not {"prompt", "response"} <= set(names):
        raise InputError(
            f"{path}: needs a 'messages' column or 'prompt' and 'response' columns "
            f"(has {', '.join(names) or 'none'})"
        )


def _import_pyarrow() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise InputError(
            "reading Parquet needs pyarrow: pip install 'persona-lens[screen]'"
        ) from exc
    return pq


def _parquet_file(path: Path) -> Any:
    pq = _import_pyarrow()
    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise InputError(f"{path} is not a readable Parquet file ({exc})") from exc


def _load_hf(path: Path) -> Any:
    try:
        import datasets
    except ImportError as exc:
        raise InputError(
            "reading a saved Hugging Face dataset needs the datasets package: "
            "pip install 'persona-lens[screen]'"
        ) from exc
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # FileNotFoundError, ValueError, arrow errors
        raise InputError(f"{path} is not a readable saved dataset ({exc})") from exc
    if not isinstance(loaded, datasets.Dataset):
        raise InputError(f"{path} is a DatasetDict; pass one split's folder")
    return loaded


# --- JSONL and CSV at the byte level ----------------------------------------------------------
def _jsonl_row(line: int, text: bytes) -> RawRow | None:
    """A JSONL line as a row; None for a blank line (not a row)."""
    if not text.strip():
        return None
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RawRow(line, None, SkippedRow(line, "not UTF-8", exc.reason))
    try:
        record = json.loads(decoded)
    except json.JSONDecodeError as exc:
        return RawRow(
            line, None, SkippedRow(line, "invalid JSON", f"{exc.msg}, column {exc.colno}")
        )
    if not isinstance(record, dict):
        return RawRow(line, None, SkippedRow(line, "not an object", type(record).__name__))
    return RawRow(line, record)


class _LineFeed:
    """Lines of a binary file for ``csv.reader``, keeping the raw bytes of the current record
    (the reader pulls exactly the lines of one record per ``next``)."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.raw: list[bytes] = []
        self.bad = False

    def __iter__(self) -> _LineFeed:
        return self

    def __next__(self) -> str:
        line = self.handle.readline()
        if not line:
            raise StopIteration
        self.raw.append(line)
        try:
            return line.decode("utf-8")
        except UnicodeDecodeError:
            self.bad = True
            return line.decode("utf-8", "replace")


def _csv_records(handle: BinaryIO) -> Iterator[tuple[int, bytes, list[str] | None, str | None]]:
    """(start offset, raw bytes, fields or None, problem or None) per non-blank CSV record."""
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    feed = _LineFeed(handle)
    reader = csv.reader(feed)
    while True:
        offset = handle.tell()
        feed.raw, feed.bad = [], False
        try:
            fields: list[str] | None = next(reader)
            problem = "not UTF-8" if feed.bad else None
        except StopIteration:
            return
        except csv.Error as exc:
            fields, problem = None, f"bad CSV ({exc})"
        if fields == []:
            continue  # a blank line
        yield offset, b"".join(feed.raw), fields, problem


def _csv_header(handle: BinaryIO, path: Path) -> list[str]:
    for _, _, fields, problem in _csv_records(handle):
        if fields is None or problem:
            raise InputError(f"{path}: unreadable CSV header ({problem})")
        return fields
    raise InputError(f"{path} holds no rows")


def _csv_row(
    number: int, header: list[str], fields: list[str] | None, problem: str | None
) -> RawRow:
    if fields is None or problem:
        return RawRow(number, None, SkippedRow(number, problem or "bad CSV row"))
    if len(fields) != len(header):
        detail = f"{len(fields)} fields, the header has {len(header)}"
        return RawRow(number, None, SkippedRow(number, "bad CSV row", detail))
    return RawRow(number, dict(zip(header, fields, strict=True)))


# --- reading shards ---------------------------------------------------------------------------
class ShardReader:
    """Reads any shard of one source; keeps its file (and a Parquet batch stream) open, so
    shards read in order cost one pass over the file."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self._handle: BinaryIO | None = None
        self._header: list[str] | None = None
        self._table: Any = None
        self._stream: tuple[int, int, Iterator[dict[str, Any]]] | None = None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, shard: Shard) -> list[RawRow]:
        """The shard's rows (blank JSONL lines left out), in order."""
        reader = {
            "jsonl": self._read_jsonl,
            "csv": self._read_csv,
            "parquet": self._read_parquet,
            "hf": self._read_hf,
        }[self.source.format]
        return reader(shard)

    def _binary(self) -> BinaryIO:
        if self._handle is None:
            self._handle = self.source.path.open("rb")
        return self._handle

    def _read_jsonl(self, shard: Shard) -> list[RawRow]:
        handle = self._binary()
        handle.seek(shard.cursor[0])
        rows = []
        for line in range(shard.first_row, shard.first_row + shard.rows):
            row = _jsonl_row(line, handle.readline())
            if row is not None:
                rows.append(row)
        return rows

    def _read_csv(self, shard: Shard) -> list[RawRow]:
        handle = self._binary()
        if self._header is None:
            handle.seek(0)
            self._header = _csv_header(handle, self.source.path)
        handle.seek(shard.cursor[0])
        rows = []
        for number, (_, _, fields, problem) in enumerate(_csv_records(handle), shard.first_row):
            rows.append(_csv_row(number, self._header, fields, problem))
            if len(rows) == shard.rows:
                break
        return rows

    def _read_parquet(self, shard: Shard) -> list[RawRow]:
        group, offset = shard.cursor
        if self._stream is None or self._stream[0] != group or self._stream[1] > offset:
            if self._table is None:
                self._table = _parquet_file(self.source.path)
            batches = self._table.iter_batches(batch_size=max(shard.rows, 1024), row_groups=[group])
            self._stream = (group, 0, (r for b in batches for r in b.to_pylist()))
        _, position, stream = self._stream
        for _ in range(offset - position):
            next(stream)
        records = [next(stream) for _ in range(shard.rows)]
        self._stream = (group, offset + shard.rows, stream)
        return [RawRow(shard.first_row + i, r) for i, r in enumerate(records)]

    def _read_hf(self, shard: Shard) -> list[RawRow]:
        if self._table is None:
            self._table = _load_hf(self.source.path)
        start = shard.cursor[0]
        columns = self._table[start : start + shard.rows]
        names = list(columns)
        records = [
            dict(zip(names, values, strict=True)) for values in zip(*columns.values(), strict=True)
        ]
        return [RawRow(shard.first_row + i, r) for i, r in enumerate(records)]


# --- clean copies -----------------------------------------------------------------------------
def clean_suffix_problem(source: Source, path: Path) -> str | None:
    """Why ``path`` cannot hold a clean copy of ``source`` in its own format, or None."""
    wanted = source.format
    given = _SUFFIXES.get(path.suffix.lower(), "hf" if not path.suffix else None)
    if given == wanted:
        return None
    name = {"jsonl": "JSONL", "csv": "CSV", "parquet": "Parquet", "hf": "a saved HF dataset"}
    hint = {"jsonl": ".jsonl", "csv": ".csv", "parquet": ".parquet", "hf": "a folder name"}
    return (
        f"--write-clean {path}: the input is {name[wanted]}, and the clean copy keeps the "
        f"input's format; give it {hint[wanted]}"
    )


def write_clean(source: Source, path: Path, keep: Callable[[int], bool]) -> int:
    """Copy the rows whose number ``keep`` accepts to ``path``, in the input's format
    (atomically); returns how many were written."""
    writer = {"jsonl": _clean_jsonl, "csv": _clean_csv, "parquet": _clean_parquet, "hf": _clean_hf}
    return writer[source.format](source, path, keep)


def _clean_jsonl(source: Source, path: Path, keep: Callable[[int], bool]) -> int:
    kept = 0

    def write(tmp: str) -> None:
        nonlocal kept
        with source.path.open("rb") as src, open(tmp, "wb") as dst:
            for line, text in enumerate(src, 1):
                if text.strip() and keep(line):
                    dst.write(text if text.endswith(b"\n") else text + b"\n")
                    kept += 1

    atomic_write(path, write)
    return kept


def _clean_csv(source: Source, path: Path, keep: Callable[[int], bool]) -> int:
    kept = 0

    def write(tmp: str) -> None:
        nonlocal kept
        with source.path.open("rb") as src, open(tmp, "wb") as dst:
            records = _csv_records(src)
            _, header, _, _ = next(records)
            dst.write(header)
            for number, (_, raw, _, _) in enumerate(records, 1):
                if keep(number):
                    dst.write(raw if raw.endswith(b"\n") else raw + b"\n")
                    kept += 1

    atomic_write(path, write)
    return kept


def _clean_parquet(source: Source, path: Path, keep: Callable[[int], bool]) -> int:
    import pyarrow as pa

    pq = _import_pyarrow()
    table = _parquet_file(source.path)
    kept = 0

    def write(tmp: str) -> None:
        nonlocal kept
        row = 1
        with pq.ParquetWriter(tmp, table.schema_arrow) as writer:
            for batch in table.iter_batches(batch_size=4096):
                mask = pa.array([keep(row + i) for i in range(batch.num_rows)], pa.bool_())
                row += batch.num_rows
                chosen = batch.filter(mask)
                kept += chosen.num_rows
                if chosen.num_rows:
                    writer.write_batch(chosen)

    atomic_write(path, write)
    return kept


def _clean_hf(source: Source, path: Path, keep: Callable[[int], bool]) -> int:
    dataset = _load_hf(source.path)
    indices = [i for i in range(dataset.num_rows) if keep(i + 1)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        dataset.select(indices).save_to_disk(str(tmp / "data"))
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp / "data", path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp / "data", path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return len(indices)
