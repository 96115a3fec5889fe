"""The Go DM driver (`--driver go`, bench/go/dmdriver): built with the machine's Go on first use,
then driven through the harness. Against the fake server it must account exactly as the Python
load processes do, fault for fault; against the real PeerNet it must lose nothing."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bench_fake_peernet import Faults, serve_fake

import bench.go_driver
from bench.__main__ import main
from bench.go_driver import binary_path, build
from bench.params import BenchParams, ParamError
from bench.probe import LOAD_GENERATOR
from bench.runner import PhaseOutcome, TargetResult, run_bench

# A p99 bound no machine misses: these judge the accounting, never timing.
QUICK = BenchParams(clients=20, rate=80, duration=1.5, warmup=0.5, drain=3.0, seed=7, bound_ms=60_000)


@pytest.fixture(scope="module", autouse=True)
def dmdriver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Built once here, where the harness builds it on first use, but in a home of the tests' own
    (never the developer's .peernet/)."""
    assert shutil.which("go"), "the Go toolchain (1.26 or newer) builds bench/go/dmdriver: see the README"
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench.go_driver, "home_dir", lambda: home)
        binary = build(print)
        assert binary == binary_path() and binary.is_relative_to(home) and binary.is_file()
        yield binary


async def one_phase(params: BenchParams) -> tuple[PhaseOutcome, TargetResult]:
    run = await run_bench(params)
    (target,) = run.targets
    assert not target.error, target.error
    (phase,) = target.phases
    return phase, target


def counted(phase: PhaseOutcome) -> dict[str, Any]:
    """What the accounting says, apart from timings."""
    acc = phase.accounting
    stats = phase.conn_stats
    return {"by_kind": {k: c.to_dict() for k, c in acc.by_kind.items()}, "failed": acc.failed_reasons,
            "lost": sorted(acc.lost_sample), "timed": {k: h.count for k, h in acc.latency.items()},
            "sent": phase.sent, "late": phase.late, "foreign": phase.foreign, "stray": phase.stray,
            "inbox_gaps": phase.inbox_gaps,
            "conns": {k: stats[k] for k in ("connects", "reconnects", "resent", "resumes", "frames_in")}}


@pytest.mark.usefixtures("quick_phases")
@pytest.mark.parametrize("faults", [Faults(), Faults(drop_every=25), Faults(dup_every=10),
                                    Faults(kick_every=20)], ids=["clean", "dropped", "doubled", "kicked"])
async def test_go_driver_accounts_as_the_python_workers_do(faults: Faults) -> None:
    async with serve_fake(faults) as (_, url):
        python, _ = await one_phase(QUICK.with_(urls=(url,)))
    async with serve_fake(faults) as (_, url):
        go, target = await one_phase(QUICK.with_(urls=(url,), driver="go"))
    assert counted(go) == counted(python)
    assert any("Go driver" in n for n in target.notes)
    # The faults were there to be noticed: the same numbers as tests/bench/test_bench_fake_server.py.
    c = go.accounting.total
    assert (c.acked, c.expected) == (160, 320)
    assert (c.lost, c.duplicated) == (12 if faults.drop_every else 0, 32 if faults.dup_every else 0)
    if faults.kick_every:
        assert go.conn_stats["reconnects"] >= 5 and go.conn_stats["resent"] >= 5


@pytest.mark.parametrize("changes, message", [
    ({"scenario": "fanout"}, "dm scenario only"),
    ({"target": "socketio"}, "drives PeerNet"),
    ({"binary": False}, "MessagePack"),
    ({"procs": 2}, "--procs"),
])
def test_go_driver_refuses_what_it_does_not_do(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ParamError, match=message):
        BenchParams(driver="go", **changes).validate()


def test_cli_takes_the_driver(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dm", "--driver", "go", "--json-frames", "--quiet"]) == 2
    assert "MessagePack" in capsys.readouterr().err


def test_the_driver_is_not_run_by_hand(dmdriver: Path) -> None:
    run = subprocess.run([str(dmdriver), "--help"], capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and "python -m bench dm --driver go" in run.stderr


@pytest.mark.ray
async def test_go_driver_loses_nothing_on_peernet(peernet_url: str) -> None:
    # 100/s for 4 s: 400 DMs, each owed to its recipient and to its sender's own inbox.
    params = BenchParams(clients=40, rate=100, duration=3, warmup=1, drain=15, bound_ms=60_000,
                         urls=(peernet_url,), driver="go")
    phase, target = await one_phase(params)
    c = phase.accounting.total
    assert (c.acked, c.failed) == (400, 0), phase.accounting.failed_reasons
    assert c.lost == 0, f"{c.lost} of {c.expected} deliveries lost, e.g. {phase.accounting.lost_sample}"
    assert c.expected == c.delivered == 800
    assert (c.duplicated, c.reordered, c.order_mismatch, c.unexpected, c.unacked_delivered) == (0, 0, 0, 0, 0)
    assert phase.inbox_gaps == 0
    assert phase.accounting.hist("dm").count == 300  # the warm-up's 100 accounted, not timed
    assert phase.sent == 400 and phase.foreign == 0
    # The driver's CPU is counted as the load generator's.
    assert any(p["category"] == LOAD_GENERATOR and "dmdriver" in p["cmd"] for p in target.processes)
    assert phase.server["by_category"][LOAD_GENERATOR]["processes"] == 2  # with the coordinator
