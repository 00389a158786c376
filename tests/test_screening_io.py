"""Screening input and bookkeeping without a model: records to samples, every input format
read in shards (row numbers, bad rows), clean copies in the input's format, ranks, percentiles,
flags, and the shipped synthetic datasets."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from persona_lens.core.errors import InputError
from persona_lens.screening.flagging import (
    FlagRule,
    flag,
    parse_thresholds,
    percentiles,
    ranks,
    reference_threshold,
)
from persona_lens.screening.samples import Sample, SkippedRow, to_sample
from persona_lens.screening.sources import (
    ShardReader,
    clean_suffix_problem,
    open_source,
    plan_shards,
    write_clean,
)
from persona_lens.screening.synthetic import (
    SYNTHETIC_TRAITS,
    SYNTHETIC_VERSIONS,
    synthetic_dataset,
)

ROOT = Path(__file__).resolve().parents[1]


def _chat(user: str, answer: str) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    }


# --- records -> samples -----------------------------------------------------------------------
def test_records_become_samples_on_their_last_assistant_turn() -> None:
    turns = [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and now?"},
        {"role": "assistant", "content": "the screened answer"},
        {"role": "user", "content": "a trailing turn is not part of the prompt"},
    ]
    sample = to_sample({"messages": turns}, 7)
    assert isinstance(sample, Sample)
    assert sample.response == "the screened answer" and sample.multi_turn and sample.row == 7
    assert [m["content"] for m in sample.prompt] == ["be nice", "hi", "hello", "and now?"]
    single = to_sample(_chat("q", "a"), 1)
    assert isinstance(single, Sample) and not single.multi_turn
    flat = to_sample({"prompt": "q", "response": "a", "id": 3}, 2)
    assert isinstance(flat, Sample) and flat.prompt == ({"role": "user", "content": "q"},)


@pytest.mark.parametrize(
    ("record", "kind"),
    [
        ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn"),
        (_chat("q", "   "), "empty assistant turn"),
        ({"messages": [{"role": "assistant", "content": "no prompt"}]}, "no prompt"),
        ({"messages": "not a list"}, "bad messages"),
        ({"messages": [{"role": "user"}]}, "bad messages"),
        ({"prompt": "q"}, "no messages"),
        ({"text": "neither"}, "no messages"),
        (["a list"], "not an object"),
    ],
)
def test_records_that_cannot_be_screened_are_skipped_with_a_reason(record: Any, kind: str) -> None:
    skipped = to_sample(record, 4)
    assert isinstance(skipped, SkippedRow) and skipped.row == 4
    assert skipped.kind.startswith(kind), skipped


# --- formats and shards -----------------------------------------------------------------------
def _read_all(path: Path, shard_size: int) -> list[Any]:
    source = open_source(path)
    shards = plan_shards(source, shard_size)
    with ShardReader(source) as reader:
        # out of order on purpose: every shard can be read on its own
        rows = {s.index: reader.read(s) for s in reversed(shards)}
    return [row for index in sorted(rows) for row in rows[index]]


def test_jsonl_shards_keep_line_numbers_and_skip_bad_lines(tmp_path: Path) -> None:
    lines = [json.dumps(_chat(f"q{i}", f"a{i}")) for i in range(10)]
    lines[3] = '{"messages": oops'
    lines[6] = ""
    lines[8] = "[1, 2]"
    path = tmp_path / "d.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe\n")
    rows = _read_all(path, shard_size=3)
    assert [r.row for r in rows] == [1, 2, 3, 4, 5, 6, 8, 9, 10, 11]  # line 7 is blank
    bad = {r.row: r.skipped.kind for r in rows if r.skipped}
    assert bad == {4: "invalid JSON", 9: "not an object", 11: "not UTF-8"}
    assert rows[0].record == _chat("q0", "a0")


def test_csv_with_quoted_newlines_reads_by_record(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "prompt", "response"])
        for i in range(7):
            writer.writerow([i, f"question {i}", f"line one\nline two of {i}"])
        handle.write('7,"short row"\n')
    rows = _read_all(path, shard_size=2)
    assert [r.row for r in rows] == list(range(1, 9))
    assert rows[5].record == {
        "id": "5",
        "prompt": "question 5",
        "response": "line one\nline two of 5",
    }
    assert rows[7].skipped is not None and rows[7].skipped.kind == "bad CSV row"
    (tmp_path / "nocols.csv").write_text("question,answer\nq,a\n")
    with pytest.raises(InputError, match="'prompt' and 'response' columns"):
        plan_shards(open_source(tmp_path / "nocols.csv"), 4)


def test_parquet_and_saved_dataset_read_in_shards_across_row_groups(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    records = [{"id": i, **_chat(f"q{i}", f"a{i}")} for i in range(23)]
    table = pa.Table.from_pylist(records)
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=10)
    source = open_source(tmp_path / "d.parquet")
    shards = plan_shards(source, 4)
    assert [s.cursor for s in shards][:4] == [(0, 0), (0, 4), (0, 8), (1, 0)]  # never across groups
    rows = _read_all(tmp_path / "d.parquet", 4)
    assert [r.row for r in rows] == list(range(1, 24))
    assert [r.record["id"] for r in rows] == list(range(23))
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    rows = _read_all(tmp_path / "saved", 5)
    assert [r.record["id"] for r in rows] == list(range(23))
    assert rows[4].record["messages"][1]["content"] == "a4"


def test_bad_inputs_are_refused_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    (tmp_path / "d.txt").write_text("x")
    (tmp_path / "folder").mkdir()
    cases = [
        (tmp_path / "missing.jsonl", "no dataset at"),
        (tmp_path / "empty.jsonl", "holds no rows"),
        (tmp_path / "broken.parquet", "not a readable Parquet file"),
        (tmp_path / "d.txt", "unknown dataset format"),
        (tmp_path / "folder", "not a dataset saved with save_to_disk"),
    ]
    for path, needle in cases:
        with pytest.raises(InputError, match=needle):
            plan_shards(open_source(path), 8)


def test_clean_copies_keep_the_input_format(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    records = [{"id": i, **_chat(f"q{i}", f"a{i}")} for i in range(9)]
    keep = {2, 3, 7}
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert write_clean(open_source(jsonl), tmp_path / "c.jsonl", keep.__contains__) == 3
    kept_lines = (tmp_path / "c.jsonl").read_text().splitlines()
    assert kept_lines == [jsonl.read_text().splitlines()[i - 1] for i in sorted(keep)]  # verbatim
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('prompt,response\nq1,"a\n1"\nq2,a2\nq3,a3\n')
    write_clean(open_source(csv_path), tmp_path / "c.csv", {1, 3}.__contains__)
    assert (tmp_path / "c.csv").read_text() == 'prompt,response\nq1,"a\n1"\nq3,a3\n'
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet", row_group_size=4)
    write_clean(open_source(tmp_path / "d.parquet"), tmp_path / "c.parquet", keep.__contains__)
    cleaned = pq.read_table(tmp_path / "c.parquet")
    assert cleaned.schema == pq.read_schema(tmp_path / "d.parquet")
    assert cleaned.column("id").to_pylist() == [1, 2, 6]  # rows are 1-based
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    write_clean(open_source(tmp_path / "saved"), tmp_path / "clean-saved", keep.__contains__)
    assert datasets.load_from_disk(str(tmp_path / "clean-saved"))["id"] == [1, 2, 6]
    problem = clean_suffix_problem(open_source(jsonl), tmp_path / "c.parquet")
    assert problem is not None and "give it .jsonl" in problem


# --- ranks, percentiles, flags ----------------------------------------------------------------
def test_ranks_percentiles_and_flags() -> None:
    scores = np.array([0.5, 2.0, 2.0, -1.0, 1.0])
    rows = np.array([10, 11, 12, 13, 14])
    rank = ranks(scores, rows)
    assert rank.tolist() == [4, 1, 2, 5, 3]  # the tie goes to the earlier row
    assert percentiles(scores).tolist() == [40.0, 100.0, 100.0, 20.0, 60.0]
    flags, threshold = flag(scores, rank, None, 40.0)
    assert flags.tolist() == [False, True, True, False, False] and threshold == 2.0
    flags, threshold = flag(scores, rank, 0.9, None)
    assert flags.tolist() == [False, True, True, False, True] and threshold == 0.9
    assert not flag(scores, rank, None, None)[0].any()
    assert reference_threshold(np.arange(101.0), 95) == pytest.approx(95.0)


def test_flag_rules_refuse_bad_values() -> None:
    assert parse_thresholds(["0.5"]) == 0.5
    assert parse_thresholds(["evil=1", "kind=-2"]) == {"evil": 1.0, "kind": -2.0}
    for values, needle in [
        (["abc"], "not a number"),
        (["evil=x"], "not a number"),
        (["nan"], "finite"),
    ]:
        with pytest.raises(InputError, match=needle):
            parse_thresholds(values)
    for top in (0.0, 100.0, 150.0, -3.0):
        with pytest.raises(InputError, match="outside"):
            FlagRule(filter_top=top)
    with pytest.raises(InputError, match="one of"):
        FlagRule(threshold=1.0, filter_top=5.0)
    rule = FlagRule(threshold={"evil": 1.0})
    with pytest.raises(InputError, match="no value for 'kind'"):
        rule.threshold_for("kind", ["evil", "kind"])


# --- the shipped datasets ---------------------------------------------------------------------
def test_synthetic_datasets_are_the_generator_output_and_twins() -> None:
    check = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_synthetic_datasets.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    total = 0
    for trait in SYNTHETIC_TRAITS:
        versions = {}
        for version in SYNTHETIC_VERSIONS:
            path = synthetic_dataset(trait, version)
            total += path.stat().st_size
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            assert len(rows) >= 150
            assert all(isinstance(to_sample(r, 1), Sample) for r in rows)
            versions[version] = rows
        questions = {v: [r["messages"][:-1] for r in rows] for v, rows in versions.items()}
        assert questions["normal"] == questions["i"] == questions["ii"]  # the same questions
        assert len({json.dumps(q) for q in questions["normal"]}) == len(questions["normal"])
        answers = {v: {r["messages"][-1]["content"] for r in rows} for v, rows in versions.items()}
        assert not answers["normal"] & answers["ii"] and not answers["normal"] & answers["i"]
    assert total < 2_000_000
    with pytest.raises(InputError, match="no synthetic dataset"):
        synthetic_dataset("humorous", "ii")
