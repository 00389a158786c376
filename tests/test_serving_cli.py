"""``persona serve`` as a user runs it: the embedded model with no options (no vector folder),
and the one-line refusals (a vector for another model, a missing folder, a busy port)."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.cli_run import ENTRY, assert_one_line_error, persona
from tests.serving_support import openai_client
from tests.tiny import load_tiny, random_trait_vector

pytest.importorskip("fastapi")


def _free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.embedded
def test_persona_serve_with_no_options(tmp_path: Path) -> None:
    """No options at all where port 8000 is free (else only --port 0): embedded, no vectors."""
    args = [] if _free(8000) else ["--port", "0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", ENTRY, "serve", *args],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stderr], daemon=True)  # type: ignore[union-attr]
    reader.start()
    seen = []
    try:
        deadline = time.monotonic() + 240
        url = None
        while url is None:
            assert proc.poll() is None, "".join(seen)
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail("persona serve did not start: " + "".join(seen))
            seen.append(line)
            if line.startswith("serving "):
                url = line.split(" on ", 1)[1].split()[0]
        assert any("no vector folder vectors/" in ln for ln in seen), seen
        client = openai_client(url.replace("localhost", "127.0.0.1"))
        assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]
        reply = client.chat.completions.create(
            model="embedded",
            messages=[{"role": "user", "content": "Hi!"}],
            max_tokens=4,
            temperature=0,
        )
        assert reply.choices[0].message.content
        assert reply.model_extra["persona"]["projections"] == {}  # nothing to monitor
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    assert code == 0, "".join(seen)
    assert "Traceback" not in "".join(seen)


def test_serve_refuses_a_vector_for_another_model(tmp_path: Path) -> None:
    mine = load_tiny(tmp_path / "mine", seed=0)
    other = load_tiny(tmp_path / "other", seed=1)
    folder = tmp_path / "vectors"
    folder.mkdir()
    random_trait_vector(mine, "humorous", seed=1, best_layer=1).save(
        folder / "humorous.safetensors"
    )
    random_trait_vector(other, "evil", seed=2, best_layer=1).save(folder / "evil.safetensors")
    proc = persona("serve", "--model", str(mine[2]), "--vectors", str(folder), "--port", "0")
    assert_one_line_error(proc, "evil.safetensors")
    assert "fingerprint" in proc.stderr


def test_serve_refuses_a_missing_folder_and_a_busy_port(tmp_path: Path) -> None:
    mine = load_tiny(tmp_path / "mine", seed=0)
    proc = persona("serve", "--model", str(mine[2]), "--vectors", str(tmp_path / "nope"))
    assert_one_line_error(proc, "no such folder")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = persona("serve", "--model", str(mine[2]), "--port", str(port))
    assert_one_line_error(proc, f"cannot listen on 127.0.0.1:{port}")
