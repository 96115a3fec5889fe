"""Recognising server processes, reading consumer lag from Prometheus text, summarising samples."""

from __future__ import annotations

import pytest

from bench.probe import LOAD_GENERATOR, Sample, ServerProbe, classify_process, parse_lag


@pytest.mark.parametrize("name, cmdline, expected", [
    ("raylet", ["/x/ray/core/src/ray/raylet/raylet", "--raylet_socket_name=/tmp/s"], "ray:raylet"),
    ("gcs_server", ["/x/ray/core/src/ray/gcs/gcs_server", "--log_dir=/tmp"], "ray:gcs"),
    ("ray::ServeRepl", ["ray::ServeReplica:peernet:Gateway"], "ray:worker"),
    ("python3", ["ray::IDLE"], "ray:worker"),
    ("python3", ["/v/bin/python3", "/v/ray/dashboard/dashboard.py", "--host=127.0.0.1"], "ray:other"),
    ("java", ["java", "-Xmx512m", "-cp", "libs/*", "kafka.Kafka", "server.properties"], "kafka"),
    ("redis-server", ["redis-server 127.0.0.1:6379"], "redis"),
    ("python3", ["/s/bin/python3", "/s/bin/secantusd-py", "--port", "27017"], "mongo"),
    ("peernet", ["/v/bin/python", "/v/bin/peernet", "serve", "--dev-tokens"], "peernet"),
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
