"""`peernet status` against the real running server: run as an operator would (a subprocess with
the server's environment), it finds the server by its state file and reports its nodes, shard
actors, gateway replicas, consumer lag and services as they are, and exits 0; a part that cannot
be reached makes it exit 1 with the reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest
from wsclient import Server

from actors.wiring import actor_names
from peernet.config import PROJECT_ROOT
from serve.deployment import state_file

pytestmark = [pytest.mark.ray, pytest.mark.stack]

STATUS_WALL_S = 30.0  # the command's own reads are bounded by 10 s; the rest is imports on 2 busy cores


def run_status(server: Server, *args: str) -> tuple[int, str, str, float]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "cli", "status", *args], env=server.env,
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started


def expected_groups(server: Server) -> set[str]:
    cfg = server.cfg
    events, n = cfg.topics.events, cfg.shards.session_shards
    return ({f"peernet.sessions.{i}-of-{n}@{events}" for i in range(n)}
            | {f"peernet.feeds@{events}", f"peernet.projections@{events}"})


def test_status_reports_the_running_server_and_exits_0(peernet_server: Server) -> None:
    # Each consumer answers /metrics' lag call within 1 s or is left out of that scrape; on a
    # busy machine one may miss a scrape, so a report lacking a group is taken again (twice).
    for _ in range(3):
        code, out, err, wall = run_status(peernet_server, "--json")
        assert code == 0, f"exit {code}: {err}\n{out}"
        report: dict[str, Any] = json.loads(out)
        if expected_groups(peernet_server) <= {g["group"] for g in report["lag"]}:
            break
    assert report["healthy"] is True and report["problems"] == [] and report["reason"] == "healthy"
    assert wall < STATUS_WALL_S and report["elapsed_s"] < 10

    state = json.loads(state_file(peernet_server.cfg).read_text())
    serve = report["serve"]
    assert serve["running"] is True and serve["pid"] == state["pid"]
    assert serve["url"] == peernet_server.url and serve["gcs_address"] == peernet_server.gcs_address
    assert serve["ingress"] == peernet_server.cfg.gateway.ingress and serve["uptime_s"] > 0

    alive = [n for n in report["nodes"] if n["alive"]]
    assert alive, report["nodes"]
    gcs_host = peernet_server.gcs_address.rsplit(":", 1)[0]
    (head,) = [n for n in alive if n["address"] == gcs_host]
    assert head["head"] is True and head["cpus"] == 2.0 and head["memory_bytes"] > 0  # RAY_NUM_CPUS=2

    shards = {s["name"]: s for s in report["shards"]}
    assert list(shards) == actor_names(peernet_server.cfg)
    for shard in shards.values():
        assert shard["state"] == "ALIVE", shard
        assert shard["node"] == gcs_host and shard["restarts"] is not None
        assert os.path.exists(f"/proc/{shard['pid']}"), shard  # the actor's real process

    gateway = report["gateway"]
    assert (gateway["app_status"], gateway["deployment_status"]) == ("RUNNING", "HEALTHY")
    assert gateway["running_replicas"] == gateway["expected_replicas"] == 2
    assert len(gateway["replicas"]) == 2
    for replica in gateway["replicas"]:
        assert replica["state"] == "ALIVE" and os.path.exists(f"/proc/{replica['pid']}"), replica

    lag = {g["group"]: g for g in report["lag"]}
    assert expected_groups(peernet_server) <= set(lag), sorted(lag)
    events = peernet_server.cfg.topics.events
    for group in expected_groups(peernet_server):
        assert lag[group]["topic"] == events and lag[group]["total"] >= 0
        assert lag[group]["partitions"] >= 1

    health = report["health"]
    assert health["status_code"] == 200 and health["healthy"] is True
    assert {"kafka", "redis", "mongo", "ray"} <= set(health["checks"])
    assert {s["name"]: s["state"] for s in report["services"]} == {
        "kafka": "running", "redis": "running", "mongo": "running"}


def test_the_human_report_by_address_and_url(peernet_server: Server) -> None:
    code, out, err, _ = run_status(peernet_server, "--address", peernet_server.gcs_address,
                                   "--url", peernet_server.url)
    assert code == 0, f"exit {code}: {err}\n{out}"
    lines = out.splitlines()
    assert lines[-1] == "healthy"
    assert lines[0].startswith("serve ") and peernet_server.url in lines[0]
    for name in actor_names(peernet_server.cfg):
        assert any(line.split()[:2] == ["ALIVE", name] for line in lines), (name, out)
    assert any("2 of 2 replicas running" in line for line in lines), out
    assert any(line.startswith("health    /healthz 200 ok") for line in lines), out


def test_a_gateway_that_does_not_answer_exits_1_with_the_reason(peernet_server: Server) -> None:
    code, out, err, _ = run_status(peernet_server, "--json", "--url", "http://127.0.0.1:1")
    assert code == 1, out
    report = json.loads(out)
    assert report["healthy"] is False
    assert any(p.startswith("health: GET http://127.0.0.1:1/healthz") for p in report["problems"])
    # Everything else was still read, and is healthy.
    assert all(s["state"] == "ALIVE" for s in report["shards"])
    assert report["gateway"]["running_replicas"] == 2
    # The one-line reason, last on stderr (Ray may have logged before it).
    assert err.strip().splitlines()[-1].startswith("peernet status: NOT HEALTHY: health: "), err
