"""The fault harness's short form, run in CI: the `dm` scenario against the real test server
with each fault of `bench --chaos` injected once, and zero loss asserted (docs/reliability.md
has the long form's results, made by `peernet bench dm --chaos all ...`).

Each fault passes when nothing acknowledged is lost, no request goes unanswered (`unavailable`
is an answer; silence is not) and delivery is whole again before its phase ends. Timings are
reported in test-artifacts/bench-chaos/, never asserted.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fault_checks import run_fault
from replicas import until_two_replicas
from stack_faults import require_ours_running
from wsclient import Server

from bench.chaos import SERVICE_FAULTS
from bench.params import BenchParams
from peernet.config import PeerNetConfig

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "bench-chaos"

BASE = BenchParams(scenario="dm", clients=30, rate=10, warmup=1, duration=14, drain=30,
                   fault_at=3, fault_gap=1)
# Per fault: long enough for the service or actor to come back inside the phase on a busy CI
# machine (a SIGKILLed broker recovers its logs before it answers again).
SHORT: dict[str, BenchParams] = {
    "kafka": BASE.with_(duration=40),
    "redis": BASE.with_(duration=20),
    "mongo": BASE.with_(mongo_down=8, duration=20),
    "replica": BASE,
    "session-shard": BASE.with_(duration=25),
    "feed-shard": BASE,
    "presence-shard": BASE,
    "burst": BASE.with_(burst_factor=10, burst_s=5),
    # Seven actors restarted one after another, then two replicas rolled.
    "upgrade": BASE.with_(duration=100),
}


# What an exception nobody handled leaves in a Python log.
UNHANDLED = re.compile(r"Traceback \(most recent call last\)|Task exception was never retrieved|"
                       r"Exception in callback|Unhandled exception")


# Logs of Ray's own system processes, not PeerNet's: Ray's dashboard agent logs a traceback
# whenever it cannot reach the dashboard, which `peernet serve` does not start.
RAY_SYSTEM_LOGS = ("dashboard", "raylet", "gcs_server", "monitor", "log_monitor", "runtime_env",
                   "debug_state", "events")


class LogWatch:
    """The test server's logs (its own output, and the logs of its Ray session but Ray's own
    system processes'): what was written to them since the watch began."""

    def __init__(self, server: Server) -> None:
        tmp = server.env.get("PEERNET_RAY_TMPDIR", "")
        self.roots = [server.log_path] + ([Path(tmp)] if tmp else [])
        self.start = self._sizes()

    def _files(self) -> Iterator[Path]:
        for root in self.roots:
            if root.is_file():
                yield root
            elif root.is_dir():
                yield from (p for p in root.rglob("*")
                            if p.is_file() and p.suffix in (".log", ".err", ".out")
                            and not p.name.startswith(RAY_SYSTEM_LOGS))

    def _sizes(self) -> dict[Path, int]:
        out = {}
        for p in self._files():
            try:
                out[p] = p.stat().st_size
            except OSError:
                pass
        return out

    def new_lines(self, pattern: re.Pattern[str]) -> list[str]:
        found = []
        for p in self._files():
            try:
                with open(p, "rb") as f:
                    f.seek(self.start.get(p, 0))
                    text = f.read().decode(errors="replace")
            except OSError:
                continue
            lines = text.splitlines()
            for i, line in enumerate(lines):
                if pattern.search(line):
                    found.append(f"{p.name}: " + " | ".join(_whole_traceback(lines, i)))
        return found


def _whole_traceback(lines: list[str], start: int) -> list[str]:
    """The lines of the report that begins at `start`, down to the exception's own line (the
    first unindented line after the frames), so a failure names the exception, not only where."""
    end = start + 1
    while end < len(lines) and end - start < 200 and lines[end][:1] in (" ", "\t", ""):
        end += 1
    return lines[start:end + 1]


@pytest.mark.ray
@pytest.mark.timeout(420)
@pytest.mark.parametrize("fault", list(SHORT))
async def test_fault_loses_nothing_acknowledged(fault: str, peernet_server: Server,
                                                stack_control: Any, cfg: PeerNetConfig) -> None:
    if fault in SERVICE_FAULTS:
        # The stack's configuration, not the server's: the server has a home of its own.
        require_ours_running(stack_control, cfg, fault)
    params = SHORT[fault].with_(urls=(peernet_server.url,), chaos=(fault,),
                                ray_address=peernet_server.gcs_address).validate()
    logs = LogWatch(peernet_server)
    try:
        _, phase = await run_fault(params, ARTIFACTS / fault, f"test_chaos {fault}")
        if fault == "upgrade":
            # Replaced replicas closed their sockets as a restart (docs/protocol.md), not cut.
            codes = phase.conn_stats.get("close_codes", {})
            assert codes and set(codes) == {"1012"}, codes
    finally:
        if fault in ("replica", "upgrade"):
            await until_two_replicas(peernet_server)
    # Every failure on the way was handled: no exception escaped into any log.
    unhandled = logs.new_lines(UNHANDLED)
    assert not unhandled, "\n\n".join(unhandled[:5])
