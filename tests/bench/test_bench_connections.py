"""The `connections` scenario: its parameters, its figures on synthetic input, and two runs
against the real test server (a small open-hold-DMs run, and a reconnect storm). The server
runs assert the accounting (every connection welcomed and timed, none closed, nothing lost,
every cut client back with `resume`), never a timing. Results go to
test-artifacts/bench-connections/."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest
import websockets
from replicas import until_two_replicas
from websockets.datastructures import Headers
from websockets.http11 import Response
from wsclient import Server

from bench.client import SetupError, refusal_reason
from bench.connections import merge_opened, open_cpu, storm_figures
from bench.latency import LatencyHistogram
from bench.params import BenchParams, ParamError, check_open_files, default_procs
from bench.report import build_report, connections_verdict, render_markdown, write_results
from bench.runner import run_bench

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "bench-connections"
S = 1_000_000


def test_connections_params_are_checked() -> None:
    ok = BenchParams(scenario="connections", clients=100, rate=0, storm="")
    assert ok.validate() is ok
    assert ok.with_(rate=50, storm="replica", fault_at=3).validate()
    bad = [
        dict(storm="replica"),                      # no DMs to account across the cut
        dict(rate=50, storm="replica", fault_at=40),  # past warm-up + duration
        dict(keepalive="tcp"),
        dict(connect_rate=0),
        dict(hold=-1),
        dict(target="socketio"),
        dict(driver="go"),
        dict(find_max=True),
    ]
    for change in bad:
        with pytest.raises(ParamError):
            ok.with_(**change).validate()
    # A rate of 0 means no DMs in `connections` only.
    with pytest.raises(ParamError):
        BenchParams(scenario="dm", rate=0).validate()


def test_load_processes_are_sized_to_the_open_files_limit() -> None:
    assert default_procs(200, 20_000) == 1
    assert default_procs(20_000, 20_000) == 4          # 5,000 sockets each by default
    assert default_procs(20_000, 2_200) == 10          # 2,000 each when the limit is 2,200
    p = BenchParams(scenario="connections", clients=20_000, procs=1)
    with pytest.raises(ParamError, match="--procs 4"):
        check_open_files(p, 20_000)
    check_open_files(p.with_(procs=2), 20_000)


def test_a_refused_connection_is_counted_by_why() -> None:
    assert refusal_reason(TimeoutError()) == "timeout"
    assert refusal_reason(websockets.InvalidStatus(Response(503, "Service Unavailable", Headers()))) \
        == "http_503"
    assert refusal_reason(ConnectionRefusedError(errno.ECONNREFUSED, "refused")) == "connection_refused"
    assert refusal_reason(OSError(errno.EMFILE, "Too many open files")) == "client_out_of_files"
    assert refusal_reason(SetupError("u: handshake closed with 4401", "closed_4401")) == "closed_4401"
    assert refusal_reason(ValueError("?")) == "ValueError"


def _opened(count: int, refused: dict[str, int], replicas: dict[str, int]) -> dict[str, object]:
    h = LatencyHistogram()
    for i in range(count):
        h.record_us(1000 + i)
    return {"welcome": h.encode(), "handshake": h.encode(), "start_lag": LatencyHistogram().encode(),
            "refused": refused, "refused_sample": [], "replicas": replicas, "online": count}


def test_the_open_merges_every_process_and_tells_server_refusals_from_the_generators() -> None:
    out = merge_opened([_opened(3, {"http_503": 2}, {"r1": 3}),
                        _opened(4, {"client_out_of_files": 1}, {"r1": 1, "r2": 3})], span_s=1.0)
    assert out["opened"] == 7 and out["welcome_ms"]["count"] == 7
    assert out["refused"] == {"http_503": 2, "client_out_of_files": 1}
    assert out["refused_by_server"] == 2 and out["refused_in_load_generator"] == 1
    assert out["replicas"] == {"r1": 4, "r2": 3}
    assert out["generator_behind"] is False     # every connect started on time
    verdict = connections_verdict({"open": out, "hold": {"closed": 0}})
    assert not verdict["ok"]
    assert any("refused by the server" in p for p in verdict["problems"])
    assert any("load generator" in p for p in verdict["problems"])


def test_the_storm_times_the_last_client_back_and_resumed() -> None:
    injected = 10 * S
    cuts = [
        [0, 1006, 9 * S, 9 * S + 1, 9 * S + 2],                    # before the kill: not the storm's
        [1, 1006, injected + 1000, injected + 2 * S, injected + int(2.5 * S)],
        [2, 1006, injected + 2000, injected + 3 * S, injected + int(3.2 * S)],
        [2, 1006, injected + 4 * S, injected + 5 * S, injected + int(5.1 * S)],  # cut again
    ]
    s = storm_figures(cuts, injected, injected + 20 * S, {"r1": 2, "r2": 1}, online=3)
    assert s["cut"] == 2 and s["cuts_total"] == 3 and s["codes"] == {"1006": 3}
    assert s["back"] == s["resumed"] == 2
    assert s["all_back_after_s"] == 5.0 and s["all_resumed_after_s"] == 5.1
    cuts.append([3, 1006, injected + 1000, 0, 0])                 # never back
    s = storm_figures(cuts, injected, injected + 20 * S, {}, online=2)
    assert s["all_back_after_s"] is None and s["not_back"] == [3] and s["back"] == 2
    v = connections_verdict({"open": {}, "hold": {}, "storm": {**s, "resume": {"missing": 0}}})
    assert not v["ok"] and "back" in v["verdict"]


async def _run(params: BenchParams, name: str) -> tuple[dict[str, object], object]:
    run = await run_bench(params)
    report = build_report(run, ["pytest", "test_bench_connections", name])
    await asyncio.to_thread(write_results, report, ARTIFACTS / name, plots=False)
    assert "### Connections" in render_markdown(report)
    (target,) = report["targets"]
    assert not target["error"], target["error"]
    return target, run.targets[0]


@pytest.mark.ray
@pytest.mark.timeout(300)
async def test_connections_open_hold_and_dm(peernet_url: str) -> None:
    """200 connections at 100/s from two load processes, held with WebSocket pings past half a
    heartbeat (so every connection sends one), then DMs among them."""
    params = BenchParams(scenario="connections", urls=(peernet_url,), clients=200, procs=2,
                         connect_rate=100, hold=10, keepalive="ws-ping", idle_baseline=2,
                         rate=20, warmup=1, duration=4, drain=15).validate()
    target, result = await _run(params, "open-hold-dm")
    c = target["connections_scenario"]
    assert c["ok"], c["problems"]
    o = c["open"]
    assert o["opened"] == 200 and o["refused"] == {} and o["online"] == 200
    assert o["welcome_ms"]["count"] == 200          # the latency of every connection counted
    assert o["handshake_ms"]["count"] == 200
    assert sum(o["replicas"].values()) == 200
    h = c["hold"]
    assert h["closed"] == 0 and h["online_after"] == 200
    # The test server's heartbeat is 15 s: each connection idle for 7.5 s sent a WebSocket ping.
    assert h["keepalives"] >= 200
    cpu = c["cpu"]
    assert cpu["hold_samples"] > 0 and cpu["idle_samples"] > 0
    assert cpu["load_generator_processes"] >= 2
    assert target["memory"]["per_connection_kib"] is not None
    (phase,) = result.phases
    t = phase.accounting.total
    assert t.acked > 0 and t.failed == 0 and t.lost == 0 and t.delivered == t.expected


@pytest.mark.ray
@pytest.mark.timeout(420)
async def test_a_replica_killed_under_connections_loses_nothing(peernet_server: Server) -> None:
    """A few hundred connections, one gateway replica killed under DMs: every connection it
    held is cut, every one comes back with `resume`, nothing acknowledged is lost."""
    params = BenchParams(scenario="connections", urls=(peernet_server.url,), clients=300,
                         connect_rate=150, hold=2, idle_baseline=1, rate=20, warmup=1, duration=14,
                         drain=30, storm="replica", fault_at=3,
                         ray_address=peernet_server.gcs_address).validate()
    try:
        target, result = await _run(params, "storm")
    finally:
        await until_two_replicas(peernet_server)
    c = target["connections_scenario"]
    assert c["open"]["opened"] == 300 and c["hold"]["closed"] == 0
    s = c["storm"]
    assert s["injected"] and s["cut"] > 0
    # Every connection of the killed replica was cut: as many as that replica held.
    assert s["cut"] in s["connections_per_replica_before"].values()
    assert s["back"] == s["resumed"] == s["cut"], s
    assert s["all_resumed_after_s"] is not None
    assert s["resume"]["acknowledged"] > 0 and s["resume"]["missing"] == 0
    assert c["ok"], c["problems"]
    storm_phase = result.phases[-1]
    assert storm_phase.fault is not None and storm_phase.accounting.total.lost == 0


def test_the_open_reports_server_cpu_per_connection_by_process() -> None:
    # 20 s of open, 5,000 connections: 150% of a core is 30 s of CPU, 6 ms a connection.
    window = {"samples": 10, "system_cpu_mean_pct": 80.0, "by_category": {
        "ray:worker:Gateway": {"cpu_mean_pct": 120.0, "processes": 2},
        "redis": {"cpu_mean_pct": 30.0, "processes": 1},
        "load_generator": {"cpu_mean_pct": 40.0, "processes": 2}}}
    cpu = open_cpu(window, 20.0, 5000)
    assert cpu["server_pct"] == 150.0 and cpu["load_generator_per_process_pct"] == 20.0
    assert cpu["server_ms_per_connection"] == 6.0
    assert cpu["ms_per_connection_by_category"] == {"ray:worker:Gateway": 4.8, "redis": 1.2}
    assert open_cpu(window, 20.0, 0)["server_ms_per_connection"] is None
