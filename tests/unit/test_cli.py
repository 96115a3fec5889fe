"""The `peernet` command as the composition root (cli/), and the parts of it that the load harness's
chaos mode drives instead of importing the server: how a running `peernet serve` is recognised,
one stack service stopped and started, the stack's pids and the upgrade's record as JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import bench.chaos as chaos
from bench.client import SetupError
from cli.main import build_parser
from peernet.config import PROJECT_ROOT
from peernet.serve_process import is_serve_command


@pytest.mark.parametrize("cmdline, serving", [
    (["/v/bin/python", "/v/bin/peernet", "serve", "--dev-tokens"], True),
    (["/v/bin/python", "-m", "cli", "serve"], True),
    (["/v/bin/python", "-m", "peernet.cli", "serve"], True),  # started by an older install
    (["/v/bin/python", "-m", "cli", "status"], False),
    (["/v/bin/python", "-m", "bench", "dm"], False),
])
def test_a_serve_process_is_recognised_by_its_command_line(cmdline: list[str], serving: bool) -> None:
    assert is_serve_command(cmdline) is serving


def test_the_command_parses_what_chaos_mode_runs() -> None:
    parser = build_parser()
    down = parser.parse_args(["stack", "down", "kafka", "--kill"])
    assert (down.action, down.service, down.kill) == ("down", "kafka", True)
    up = parser.parse_args(["stack", "up", "mongo", "--timeout", "120"])
    assert (up.action, up.service, up.timeout) == ("up", "mongo", 120.0)
    assert parser.parse_args(["stack", "status", "--json"]).json
    assert parser.parse_args(["upgrade", "--json"]).json


def test_python_dash_m_cli_is_the_command() -> None:
    done = subprocess.run([sys.executable, "-m", "cli", "stack", "down", "nosuch"], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "no service 'nosuch'" in done.stderr


def test_chaos_reads_the_stack_pids_from_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"name": "kafka", "state": "running", "external": False, "address": "a", "pid": 7,
             "detail": ""},
            {"name": "mongo", "state": "stopped", "external": False, "address": "b", "pid": None,
             "detail": ""}]
    asked: list[tuple[str, ...]] = []

    def fake(*args: str, **_: object) -> str:
        asked.append(args)
        return json.dumps(rows)

    monkeypatch.setattr(chaos, "peernet", fake)
    assert chaos.stack_pids() == {"kafka": 7, "mongo": None}
    assert asked == [("stack", "status", "--json")]
    monkeypatch.setattr(chaos, "peernet", lambda *a, **k: "not json")
    with pytest.raises(SetupError):
        chaos.stack_pids()
