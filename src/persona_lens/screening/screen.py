"""``screen()``: the whole screening run behind ``persona screen``.

1. check the options, open the input and plan its shards (one streaming pass);
2. score the shards not yet done (in this process, or on Ray), each stored as it finishes in a
   work folder next to the output (``RANKED.jsonl.partial``), so a killed run resumes;
3. from the stored shards: dataset-level means, ranks, percentiles and flags (one number per
   row and trait in memory; the rows themselves stream from disk), then the ranked JSONL, the
   skipped-row log, the clean copy and the report, each written atomically;
4. remove the work folder.

Nothing is written under the output names before step 3, so bad input leaves no partial output.
"""

from __future__ import annotations

import array
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from persona_lens.core.capture import Monitor
from persona_lens.core.errors import InputError, LayerError, PersonaLensError
from persona_lens.core.files import atomic_write
from persona_lens.core.models import LoadedModel, load_model
from persona_lens.core.vectors import PersonaVector, check_layer
from persona_lens.interop.prompts_io import unique_names, write_jsonl
from persona_lens.screening.flagging import (
    FlagRule,
    flag,
    percentiles,
    ranks,
    reference_threshold,
)
from persona_lens.screening.ray_runner import LOCAL, run_on_ray
from persona_lens.screening.report import write_report
from persona_lens.screening.results import ScreenResult, ScreenSummary, TraitSummary
from persona_lens.screening.samples import Sample, to_sample
from persona_lens.screening.scoring import (
    Scorer,
    ScoreSettings,
    check_vectors,
    monitor_config,
    vector_config,
)
from persona_lens.screening.shards import score_shard
from persona_lens.screening.sources import (
    Shard,
    ShardReader,
    Source,
    clean_suffix_problem,
    open_source,
    plan_shards,
)
from persona_lens.screening.sources import write_clean as write_clean_copy
from persona_lens.screening.workdir import WorkDir

ORDERS = ("rank", "input")
Progress = Callable[[str, int, int], None]
VectorLike = PersonaVector | str | Path
VectorArg = VectorLike | tuple[VectorLike, int]


def screen(
    data: str | Path | Sequence[Mapping[str, Any]],
    vectors: VectorArg | Sequence[VectorArg],
    *,
    model: str | LoadedModel = "embedded",
    mode: str = "diff",
    layer: int | None = None,
    max_new_tokens: int = 64,
    threshold: float | Mapping[str, float] | None = None,
    filter_top: float | None = None,
    threshold_from: str | Path | None = None,
    percentile: float = 95.0,
    out: str | Path | None = None,
    write_clean: str | Path | None = None,
    report: str | Path | None = None,
    backend: str = "hf",
    ray: bool | str | None = None,
    workers: int | None = None,
    batch_size: int = 16,
    shard_size: int = 256,
    max_response_tokens: int = 1024,
    order: str = "rank",
    progress: Progress | None = None,
    command: str = "",
) -> ScreenResult:
    """Screen a dataset for samples that would induce each vector's trait (``persona screen``).

    ``data``: a JSONL (messages format), CSV (``prompt``/``response``), Parquet file, a folder
    saved with ``datasets``' ``save_to_disk``, or a list of records. ``vectors``: vector
    files or :class:`PersonaVector` objects, each optionally as ``(vector, layer)``; the layer
    is otherwise ``layer`` or the vector's read_layer (else its best_layer). ``mode``:
    ``diff`` (projection difference against the model's own greedy answer), ``response`` or
    ``prompt-last``.
    Flag with one of ``threshold``, ``filter_top`` (percent) or ``threshold_from`` (a reference
    dataset, at its ``percentile``-th percentile). ``ray``: True or ``"local"`` for a local Ray
    instance, or a cluster address.

    Writes ``out`` (ranked JSONL: every input field plus ``screening``), a skipped-row log next
    to it, ``write_clean`` (the unflagged rows, in the input's format) and ``report`` (a folder:
    Markdown and PNG). Without ``out`` the records are kept in memory only. Returns the ranked
    records and the summary.
    """
    started = time.perf_counter()
    settings = ScoreSettings(mode, max_new_tokens, batch_size, max_response_tokens, backend)
    rule = FlagRule(threshold, filter_top, threshold_from is not None, percentile)
    if order not in ORDERS:
        raise InputError(f"unknown order {order!r}; choose one of {', '.join(ORDERS)}")
    if write_clean is not None and not rule.active:
        raise InputError(
            "--write-clean needs a flagging rule: --threshold, --filter-top or --threshold-from"
        )
    out_path = Path(out) if out is not None else None
    if out_path is not None and out_path.is_dir():
        raise InputError(f"output path {out_path} is a directory")
    address = _ray_address(ray)
    if workers is not None and address is None:
        raise InputError("--workers sets the number of Ray workers; add --ray")
    # scratch space (the scored rows gathered once more) beside the output, not in /tmp
    near = out_path.parent if out_path is not None and out_path.parent.is_dir() else None
    with tempfile.TemporaryDirectory(prefix=".persona-screen-", dir=near) as scratch_dir:
        scratch = Path(scratch_dir)
        source = _open_data(data, scratch)
        label = str(data) if isinstance(data, str | Path) else f"{source.path.name} (records)"
        clean_path = Path(write_clean) if write_clean is not None else None
        if clean_path is not None:
            problem = clean_suffix_problem(source, clean_path)
            if problem:
                raise InputError(problem)
        shards = plan_shards(source, shard_size)
        reference = open_source(threshold_from) if threshold_from is not None else None
        reference_shards = plan_shards(reference, shard_size) if reference is not None else []
        named = _load_vectors(vectors)
        monitors = _monitors(named, layer)
        names = [m.name for m in monitors]
        for name in names:
            rule.threshold_for(name, names)  # a per-trait threshold must name every vector
        run = _Runner(model, named, monitors, settings, address, workers, progress)
        manifest = {
            "version": 1,
            "model": run.spec,
            "vectors": [_vector_key(v, m) for (_, v, _), m in zip(named, monitors, strict=True)],
            "settings": asdict(settings),
            "shard_size": shard_size,
        }
        work_path = _work_path(out_path, scratch)
        work = WorkDir(work_path, {**manifest, "source": source.identity()})
        resumed = run.shards(source, shards, work, "screening")
        collected = _collect(work, len(shards), names, scratch / "main")
        if collected.screened == 0:
            work.remove()
            raise InputError(f"no usable row in {label}: {collected.why_none()}")
        ref_summary: dict[str, Any] = {}
        thresholds: dict[str, float | None] = {n: rule.threshold_for(n, names) for n in names}
        if reference is not None:
            ref_work = WorkDir(
                work_path / "reference", {**manifest, "source": reference.identity()}
            )
            run.shards(reference, reference_shards, ref_work, "reference")
            ref = _collect(ref_work, len(reference_shards), names, scratch / "reference")
            if ref.screened == 0:
                raise InputError(f"no usable row in the reference {reference.path}")
            thresholds = {n: reference_threshold(ref.score_array(n), percentile) for n in names}
            ref_summary = {
                "data": str(reference.path),
                "screened": ref.screened,
                "skipped": ref.skipped,
                "percentile": percentile,
                "thresholds": thresholds,
            }
        table = _rank(collected, names, thresholds, rule.filter_top)
        final_out = out_path or scratch / "ranked.jsonl"
        _write_ranked(final_out, collected, table, names, settings.score_key, order)
        summary = ScreenSummary(
            data=label,
            format=source.format,
            model=run.spec,
            mode=mode,
            rows=collected.screened + collected.skipped,
            screened=collected.screened,
            skipped=collected.skipped,
            skipped_by_kind=dict(sorted(collected.skipped_by_kind.items())),
            multi_turn=collected.multi_turn,
            truncated=collected.truncated,
            base_fallbacks=collected.base_fallbacks,
            traits=[
                _trait_summary(m, collected.score_array(m.name), table, settings.score_key)
                for m in monitors
            ],
            flagged=int(table.any_flag.sum()),
            flag_rule=_rule_text(rule, reference),
            shards=len(shards),
            resumed_shards=resumed,
            seconds=0.0,
            workers=run.workers,
            out=str(out_path) if out_path else None,
            reference=ref_summary,
        )
        if out_path is not None:
            summary.skip_log = _write_skip_log(out_path, collected)
        if clean_path is not None:
            keep = np.zeros(collected.max_row + 2, dtype=bool)
            keep[collected.rows_array()[~table.any_flag]] = True
            summary.clean_rows = write_clean_copy(source, clean_path, lambda row: bool(keep[row]))
            summary.clean = str(clean_path)
        summary.seconds = round(time.perf_counter() - started, 2)
        if report is not None:
            top = _top_samples(collected, table, names)
            scores = {n: collected.score_array(n) for n in names}
            summary.report = str(write_report(Path(report), summary, scores, top, command))
        work.remove()
        records = None if out_path else list(ScreenResult(summary, final_out).iter_records())
        return ScreenResult(summary, out_path, records)


# --- options ----------------------------------------------------------------------------------
def _ray_address(ray: bool | str | None) -> str | None:
    if ray is None or ray is False:
        return None
    if ray is True or ray == "" or ray == LOCAL:
        return LOCAL
    return str(ray)


def _open_data(data: str | Path | Sequence[Mapping[str, Any]], scratch: Path) -> Source:
    if isinstance(data, str | Path):
        return open_source(data)
    records = list(data)
    if not records:
        raise InputError("no records to screen")
    return open_source(write_jsonl(scratch / "records.jsonl", [dict(r) for r in records]))


def _load_vectors(
    vectors: VectorArg | Sequence[VectorArg],
) -> list[tuple[str, PersonaVector, int | None]]:
    single = isinstance(vectors, PersonaVector | str | Path | tuple)
    items: list[VectorArg] = [vectors] if single else list(vectors)  # type: ignore[list-item,arg-type]
    if not items:
        raise InputError("give at least one vector to screen with")
    loaded: list[tuple[str, PersonaVector, int | None]] = []
    cache: dict[Path, PersonaVector] = {}
    for item in items:
        vector, at = item if isinstance(item, tuple) else (item, None)
        if isinstance(vector, PersonaVector):
            loaded.append((f"vector {vector.trait!r}", vector, at))
            continue
        path = Path(vector)
        if path not in cache:
            cache[path] = PersonaVector.load(path)
        loaded.append((str(path), cache[path], at))
    return loaded


def _monitors(
    named: Sequence[tuple[str, PersonaVector, int | None]], layer: int | None
) -> list[Monitor]:
    chosen = []
    for where, vector, at in named:
        sel = at if at is not None else layer if layer is not None else vector.read_layer
        if sel is None:
            raise LayerError(
                f"{where}: vector {vector.trait!r} has no read_layer or best_layer; give --layer"
            )
        try:
            chosen.append(check_layer(sel, vector.num_layers, allow_zero=True))
        except LayerError as exc:
            raise LayerError(f"{where}: {exc}") from exc
    keys = unique_names([v.trait for _, v, _ in named], chosen)
    return [Monitor(k, v.at(at), at) for k, (_, v, _), at in zip(keys, named, chosen, strict=True)]


def _vector_key(vector: PersonaVector, monitor: Monitor) -> dict[str, Any]:
    digest = hashlib.sha256(vector.vectors.numpy().tobytes()).hexdigest()[:16]
    return {"name": monitor.name, "layer": monitor.layer, "sha256": digest}


def _work_path(out: Path | None, scratch: Path) -> Path:
    return out.with_name(out.name + ".partial") if out is not None else scratch / "work"


def _rule_text(rule: FlagRule, reference: Source | None) -> str:
    if rule.filter_top is not None:
        return f"top {rule.filter_top:g}% by rank (--filter-top)"
    if reference is not None:
        return (
            f"above the {rule.percentile:g}th percentile of `{reference.path}` (--threshold-from)"
        )
    if isinstance(rule.threshold, Mapping):
        return (
            "above " + ", ".join(f"{k} {v:g}" for k, v in rule.threshold.items()) + " (--threshold)"
        )
    if rule.threshold is not None:
        return f"above {rule.threshold:g} (--threshold)"
    return "none (no --threshold, --filter-top or --threshold-from)"


# --- scoring the shards -----------------------------------------------------------------------
class _Runner:
    """Scores pending shards into a work folder: here with one model, or on Ray."""

    def __init__(
        self,
        model: str | LoadedModel,
        named: Sequence[tuple[str, PersonaVector, int | None]],
        monitors: Sequence[Monitor],
        settings: ScoreSettings,
        address: str | None,
        workers: int | None,
        progress: Progress | None,
    ) -> None:
        self.model = model
        self.spec = model.spec if isinstance(model, LoadedModel) else model
        self.checks = [(where, vector) for where, vector, _ in named]
        self.monitors = monitors
        self.settings = settings
        self.address = address
        self.requested_workers = workers
        self.workers = 1
        self.progress = progress
        self._scorer: Scorer | None = None
        if address is None:
            self.scorer()  # load and check the model before any shard is scored
        else:
            from persona_lens.screening.ray_runner import import_ray

            import_ray()  # fail now (one line) if Ray is missing

    def scorer(self) -> Scorer:
        if self._scorer is None:
            loaded = self.model if isinstance(self.model, LoadedModel) else load_model(self.model)
            check_vectors(self.checks, loaded)
            self._scorer = Scorer(loaded, self.monitors, self.settings)
        return self._scorer

    def shards(self, source: Source, shards: Sequence[Shard], work: WorkDir, stage: str) -> int:
        """Score the shards ``work`` does not hold yet; returns how many it already held."""
        done = work.open()
        pending = [s for s in shards if s.index not in done]
        total = sum(s.rows for s in shards)
        finished = total - sum(s.rows for s in pending)
        rows = {s.index: s.rows for s in shards}
        if self.progress is not None:
            self.progress(stage, finished, total)

        def store(index: int, lines: list[str]) -> None:
            nonlocal finished
            work.write_shard(index, lines)
            finished += rows[index]
            if self.progress is not None:
                self.progress(stage, finished, total)

        if pending and self.address is None:
            with ShardReader(source) as reader:
                for shard in pending:
                    store(shard.index, score_shard(reader, shard, self.scorer()))
        elif pending:
            self._on_ray(source, pending, work, store)
        return len(shards) - len(pending)

    def _on_ray(
        self,
        source: Source,
        pending: Sequence[Shard],
        work: WorkDir,
        store: Callable[[int, list[str]], None],
    ) -> None:
        assert self.address is not None
        config = {
            "model": self.spec,
            "device": None,
            "dtype": None,
            "vectors": vector_config(self.checks),
            "monitors": monitor_config(self.monitors),
            "settings": asdict(self.settings),
            "path": str(source.path.resolve()),
            "format": source.format,
        }
        try:
            self.workers = run_on_ray(
                self.address, pending, config, store, workers=self.requested_workers
            )
        except PersonaLensError:
            if not work.done():  # a setup error on the workers: leave nothing behind
                work.remove()
            raise


# --- collecting and ranking -------------------------------------------------------------------
@dataclass
class _Collected:
    """Scored rows gathered from the work folder: their lines in one file (``offsets`` into
    it) and one number per row and trait; skipped rows counted, logged in another file."""

    folder: Path
    names: list[str]
    offsets: array.array = field(default_factory=lambda: array.array("q"))
    rows: array.array = field(default_factory=lambda: array.array("q"))
    scores: dict[str, array.array] = field(default_factory=dict)
    skipped_by_kind: dict[str, int] = field(default_factory=dict)
    skip_examples: list[str] = field(default_factory=list)
    multi_turn: int = 0
    truncated: int = 0
    base_fallbacks: int = 0
    max_row: int = 0

    @property
    def path(self) -> Path:
        return self.folder / "rows.jsonl"

    @property
    def skip_path(self) -> Path:
        return self.folder / "skipped.log"

    @property
    def screened(self) -> int:
        return len(self.rows)

    @property
    def skipped(self) -> int:
        return sum(self.skipped_by_kind.values())

    def score_array(self, name: str) -> np.ndarray:
        return np.frombuffer(self.scores[name], dtype=np.float64)

    def rows_array(self) -> np.ndarray:
        return np.frombuffer(self.rows, dtype=np.int64)

    def why_none(self) -> str:
        if not self.skipped:
            return "nothing to screen"
        more = f"; and {self.skipped - 3} more" if self.skipped > 3 else ""
        return f"{self.skipped} rows skipped ({'; '.join(self.skip_examples)}{more})"


def _collect(work: WorkDir, shards: int, names: list[str], folder: Path) -> _Collected:
    collected = _Collected(folder, names, scores={n: array.array("d") for n in names})
    folder.mkdir(parents=True, exist_ok=True)
    with (
        collected.path.open("w", encoding="utf-8") as rows_file,
        collected.skip_path.open("w", encoding="utf-8") as skip_file,
    ):
        for line in work.lines(shards):
            entry = json.loads(line)
            row = int(entry["row"])
            collected.max_row = max(collected.max_row, row)
            if "skipped" in entry:
                kind = entry["skipped"]
                collected.skipped_by_kind[kind] = collected.skipped_by_kind.get(kind, 0) + 1
                detail = f" ({entry['detail']})" if entry.get("detail") else ""
                text = f"row {row}: {kind}{detail}"
                skip_file.write(text + "\n")
                if len(collected.skip_examples) < 3:
                    collected.skip_examples.append(text)
                continue
            collected.offsets.append(rows_file.tell())
            rows_file.write(line + "\n")
            collected.rows.append(row)
            for name in names:
                collected.scores[name].append(float(entry["scores"][name]))
            collected.multi_turn += bool(entry["multi_turn"])
            collected.truncated += bool(entry["truncated"])
            collected.base_fallbacks += bool(entry.get("base_fallback"))
    return collected


@dataclass
class _Table:
    """Per trait: rank, percentile, flags, threshold; and whether any trait flags a row."""

    rank: dict[str, np.ndarray]
    percentile: dict[str, np.ndarray]
    flags: dict[str, np.ndarray]
    thresholds: dict[str, float | None]
    any_flag: np.ndarray


def _rank(
    collected: _Collected,
    names: Sequence[str],
    thresholds: Mapping[str, float | None],
    filter_top: float | None,
) -> _Table:
    rows = collected.rows_array()
    table = _Table({}, {}, {}, {}, np.zeros(len(rows), dtype=bool))
    for name in names:
        scores = collected.score_array(name)
        table.rank[name] = ranks(scores, rows)
        table.percentile[name] = percentiles(scores)
        table.flags[name], table.thresholds[name] = flag(
            scores, table.rank[name], thresholds[name], filter_top
        )
        table.any_flag |= table.flags[name]
    return table


def _read_entry(handle: Any, offset: int) -> dict[str, Any]:
    handle.seek(offset)
    return dict(json.loads(handle.readline()))


def _output_record(
    entry: dict[str, Any], index: int, table: _Table, names: Sequence[str], key: str
) -> dict[str, Any]:
    traits = {}
    for name in names:
        trait = {
            key: entry["scores"][name],
            "percentile": round(float(table.percentile[name][index]), 4),
            "rank": int(table.rank[name][index]),
            "flagged": bool(table.flags[name][index]),
            "response_projection": entry["response_projection"][name],
        }
        if "base_projection" in entry:
            trait["base_projection"] = entry["base_projection"][name]
        traits[name] = trait
    screening: dict[str, Any] = {
        "row": entry["row"],
        "flagged": bool(table.any_flag[index]),
        "multi_turn": entry["multi_turn"],
        "traits": traits,
    }
    if "base_response" in entry:
        screening["base_response"] = entry["base_response"]
    return {**entry["record"], "screening": screening}


def _write_ranked(
    path: Path, collected: _Collected, table: _Table, names: Sequence[str], key: str, order: str
) -> None:
    if order == "rank":
        sequence = np.argsort(table.rank[names[0]], kind="stable")
    else:
        sequence = np.arange(collected.screened)
    offsets = np.frombuffer(collected.offsets, dtype=np.int64)

    def write(tmp: str) -> None:
        with (
            collected.path.open("r", encoding="utf-8") as rows,
            open(tmp, "w", encoding="utf-8") as dst,
        ):
            for index in sequence:
                record = _output_record(
                    _read_entry(rows, int(offsets[index])), int(index), table, names, key
                )
                dst.write(json.dumps(record, ensure_ascii=False, allow_nan=False, default=str))
                dst.write("\n")

    atomic_write(path, write)


def _write_skip_log(out: Path, collected: _Collected) -> str | None:
    path = out.with_name(f"{out.stem}.skipped.log")
    if not collected.skipped:
        path.unlink(missing_ok=True)  # left by an earlier run
        return None
    header = f"# {collected.skipped} of {collected.screened + collected.skipped} rows skipped\n"

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle, collected.skip_path.open() as lines:
            handle.write(header)
            shutil.copyfileobj(lines, handle)

    atomic_write(path, write)
    return str(path)


def _trait_summary(monitor: Monitor, scores: np.ndarray, table: _Table, key: str) -> TraitSummary:
    return TraitSummary(
        name=monitor.name,
        layer=monitor.layer,
        score_key=key,
        mean=float(scores.mean()),
        std=float(scores.std()),
        median=float(np.median(scores)),
        threshold=table.thresholds[monitor.name],
        flagged=int(table.flags[monitor.name].sum()),
    )


def _top_samples(
    collected: _Collected, table: _Table, names: Sequence[str], count: int = 10
) -> dict[str, list[dict[str, Any]]]:
    """The ``count`` best-ranked samples per trait (flagged ones when any are flagged)."""
    offsets = np.frombuffer(collected.offsets, dtype=np.int64)
    top: dict[str, list[dict[str, Any]]] = {}
    with collected.path.open("r", encoding="utf-8") as rows:
        for name in names:
            order = np.argsort(table.rank[name], kind="stable")
            if table.flags[name].any():
                order = order[table.flags[name][order]]
            items = []
            for index in order[:count]:
                entry = _read_entry(rows, int(offsets[index]))
                sample = to_sample(entry["record"], int(entry["row"]))
                assert isinstance(sample, Sample)
                items.append(
                    {
                        "rank": int(table.rank[name][index]),
                        "row": int(entry["row"]),
                        "score": float(entry["scores"][name]),
                        "percentile": float(table.percentile[name][index]),
                        "prompt": sample.prompt[-1]["content"],
                        "response": sample.response,
                    }
                )
            top[name] = items
    return top
