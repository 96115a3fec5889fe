"""`peernet upgrade`'s side of the handshake: SIGHUP to the serve process, then its `upgrade`
record in the state file followed to the end (the restarts themselves run in
tests/bench/test_chaos.py against the real server)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from serve.upgrade import UpgradeRecord, read_record, request_upgrade, save_record

# A stand-in for `peernet serve`: on SIGHUP it writes the steps of upgrade 1 to its state file.
# Given a third argument (a file the follower's `say` appends to), it writes each step only
# once the follower has shown the one before: the follower reads the file every 0.25 s, and a
# step held for a fixed time could pass unseen on a loaded machine.
SERVER = textwrap.dedent("""
    import json, signal, sys, time
    from serve.upgrade import UpgradeRecord, save_record
    from pathlib import Path
    path = Path(sys.argv[1])
    said = Path(sys.argv[3]) if len(sys.argv) > 3 else None
    asked = []
    signal.signal(signal.SIGHUP, lambda *a: asked.append(time.time()))
    print("ready", flush=True)
    while not asked:
        time.sleep(0.05)
    r = UpgradeRecord(1, asked[0])
    for step in ("actor 1/1: restarting s0", "gateway: rolling"):
        r.step = step
        save_record(path, r)
        deadline = time.monotonic() + 30
        while said is not None and step not in said.read_text() and time.monotonic() < deadline:
            time.sleep(0.01)
    r.step, r.done, r.ok, r.took_s = "done", True, sys.argv[2] == "ok", 0.8
    r.error = None if r.ok else "TimeoutError: s0 was not back"
    save_record(path, r)
""")


def _serve(tmp_path: Path, outcome: str, *said: Path) -> tuple[subprocess.Popen[str], Path]:
    path = tmp_path / "serve.json"
    path.write_text(json.dumps({"pid": 0, "url": "http://x"}))
    for p in said:
        p.write_text("")
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(path), outcome, *map(str, said)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc, path


@pytest.mark.parametrize("outcome", ["ok", "failed"])
def test_request_upgrade_follows_every_step_to_the_end(tmp_path: Path, outcome: str) -> None:
    shown = tmp_path / "said"
    proc, path = _serve(tmp_path, outcome, shown)
    said: list[str] = []

    def say(line: str) -> None:
        said.append(line)
        with open(shown, "a") as f:
            f.write(line + "\n")

    try:
        record = request_upgrade(path, proc.pid, timeout_s=30, say=say)
    finally:
        proc.wait(10)
    assert record["done"] and record["ok"] == (outcome == "ok")
    assert said == ["peernet upgrade: actor 1/1: restarting s0", "peernet upgrade: gateway: rolling",
                    "peernet upgrade: done"]
    # The rest of the state file is kept.
    assert json.loads(path.read_text())["url"] == "http://x"


def test_an_earlier_upgrade_record_is_not_taken_for_this_one(tmp_path: Path) -> None:
    proc, path = _serve(tmp_path, "ok")
    save_record(path, UpgradeRecord(1, 0.0, step="done", done=True, ok=True))
    # The stand-in numbers its record 1 too: not newer than the one already there.
    try:
        with pytest.raises(TimeoutError):
            request_upgrade(path, proc.pid, timeout_s=2, say=lambda line: None)
    finally:
        proc.wait(10)
    assert read_record(path) is not None
