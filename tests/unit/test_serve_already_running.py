"""`peernet serve` run twice on one home: the second finds the first by its state file and
starts nothing (README: running `./dev up` twice is harmless)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peernet.config import PeerNetConfig, load_config
from serve.deployment import already_serving, run_forever, state_file


@pytest.fixture
def cfg(tmp_path: Path) -> PeerNetConfig:
    return load_config({"PEERNET_HOME": str(tmp_path)})


@pytest.fixture
def peernet_like() -> Iterator[subprocess.Popen[bytes]]:
    """A live process whose command line is `... peernet.cli serve`, as `peernet serve`'s is."""
    proc = started(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                                     "peernet.cli", "serve"]), b"peernet.cli", b"serve")
    yield proc
    proc.kill()
    proc.wait()


def started(proc: subprocess.Popen[bytes], *words: bytes) -> subprocess.Popen[bytes]:
    """`proc` once its command line shows `words` (the interpreter may be a shim that execs the
    real one a moment later)."""
    deadline = time.monotonic() + 10
    while not all(w in Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0") for w in words):
        assert time.monotonic() < deadline, "the child never showed its command line"
        time.sleep(0.02)
    return proc


def write_state(cfg: PeerNetConfig, pid: int) -> None:
    path = state_file(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "url": "http://127.0.0.1:8000"}))


def test_a_running_server_is_found_and_a_second_start_does_nothing(
        cfg: PeerNetConfig, peernet_like: subprocess.Popen[bytes],
        capsys: pytest.CaptureFixture[str]) -> None:
    write_state(cfg, peernet_like.pid)
    assert already_serving(cfg) == {"pid": peernet_like.pid, "url": "http://127.0.0.1:8000"}
    assert run_forever(cfg) == 0  # returns at once: no Ray is started
    assert "already serving on http://127.0.0.1:8000" in capsys.readouterr().out


def test_a_stale_or_foreign_state_file_is_ignored(cfg: PeerNetConfig) -> None:
    assert already_serving(cfg) is None  # no file
    dead = subprocess.Popen([sys.executable, "-c", "pass", "peernet.cli", "serve"])
    dead.wait()
    write_state(cfg, dead.pid)
    assert already_serving(cfg) is None  # the process is gone
    stranger = started(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]),
                       b"import time; time.sleep(60)")
    try:
        write_state(cfg, stranger.pid)  # alive, but not `peernet serve`
        assert already_serving(cfg) is None
    finally:
        stranger.kill()
        stranger.wait()
    write_state(cfg, os.getpid())  # this very process
    assert already_serving(cfg) is None
    state_file(cfg).write_text("{not json")
    assert already_serving(cfg) is None
