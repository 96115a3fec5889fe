"""`peernet status` without a cluster: the lag parsed from what /metrics really emits, actors
picked from Ray's actor table rows, the verdict and its rendering (peernet/status_report.py),
and the finding and reading around them (serve/status.py) on a fake gateway."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from bus.eventlog import ConsumerLag
from peernet.config import PeerNetConfig, load_config
from peernet.status_report import (
    ActorInfo,
    Gateway,
    GroupLag,
    Health,
    Node,
    ServeProcess,
    Service,
    StatusReport,
    node_from_ray,
    parse_consumer_lag,
    pick_actors,
    render_text,
    replica_actors,
)
from serve import metrics
from serve import status as status_module
from serve.deployment import state_file

# --- consumer lag from /metrics -----------------------------------------------------------------


def test_lag_is_summed_per_group_from_what_metrics_really_emits() -> None:
    metrics.set_consumer_lag([
        ConsumerLag("peernet.sessions.0-of-2@ev", "ev", {0: 3, 1: 0, 2: 5}),
        ConsumerLag("peernet.feeds@ev", "ev", {0: 1}),
        ConsumerLag("peernet.feeds@ev", "ev", {1: 7}),  # the group's other member
    ])
    try:
        text = metrics.render().decode()
    finally:
        metrics.set_consumer_lag([])
    assert parse_consumer_lag(text) == [
        GroupLag("peernet.feeds@ev", "ev", partitions=2, total=8),
        GroupLag("peernet.sessions.0-of-2@ev", "ev", partitions=3, total=8),
    ]


def test_lag_ignores_other_metrics_even_ones_named_like_it() -> None:
    text = "\n".join([
        "# HELP peernet_kafka_consumer_scrape_errors_total Scrapes",
        "# TYPE peernet_kafka_consumer_scrape_errors_total counter",
        "peernet_kafka_consumer_scrape_errors_total 4.0",
        "# HELP other_lag A lag of something else",
        "# TYPE other_lag gauge",
        'other_lag{group="g"} 99.0',
        "# HELP peernet_kafka_consumer_lag Records",
        "# TYPE peernet_kafka_consumer_lag gauge",
        'peernet_kafka_consumer_lag{group="g",partition="0",topic="t"} 2.0',
        "",
    ])
    assert parse_consumer_lag(text) == [GroupLag("g", "t", 1, 2)]
    assert parse_consumer_lag("") == []


# --- Ray's tables -------------------------------------------------------------------------------


def _row(name: str, state: str, *, node: str = "n1", pid: int = 100, restarts: int = 0,
         end: float = 0.0) -> dict[str, Any]:
    return {"Name": name, "State": state, "Address": {"NodeID": node, "IPAddress": "10.0.0.1"},
            "Pid": pid, "NumRestarts": restarts, "StartTime": 1.0, "EndTime": end}


def test_the_live_row_of_a_name_wins_and_an_absent_name_is_missing() -> None:
    table = [
        _row("session-shard-0-of-2", "DEAD", pid=1, end=50.0),
        _row("session-shard-0-of-2", "ALIVE", pid=2, restarts=3),
        _row("session-shard-1-of-2", "DEAD", pid=3, end=10.0),
        _row("session-shard-1-of-2", "DEAD", pid=4, end=20.0),
        _row("someone-else", "ALIVE"),
    ]
    got = pick_actors(table, ["session-shard-0-of-2", "session-shard-1-of-2", "projector"],
                      {"n1": "10.0.0.1"})
    assert got == [
        ActorInfo("session-shard-0-of-2", "ALIVE", node="10.0.0.1", pid=2, restarts=3),
        ActorInfo("session-shard-1-of-2", "DEAD", node="10.0.0.1", pid=4, restarts=0),
        ActorInfo("projector", "MISSING"),
    ]


def test_replicas_are_the_applications_live_replica_actors() -> None:
    table = [
        _row("SERVE_REPLICA::peernet#Gateway#b", "ALIVE", pid=2),
        _row("SERVE_REPLICA::peernet#Gateway#a", "RESTARTING", pid=1, node="n9"),
        _row("SERVE_REPLICA::peernet#Gateway#old", "DEAD"),
        _row("SERVE_REPLICA::other#Gateway#x", "ALIVE"),
        _row("SERVE_CONTROLLER_ACTOR", "ALIVE"),
    ]
    got = replica_actors(table, "peernet", {"n1": "10.0.0.1"})
    assert [(a.name.rsplit("#", 1)[1], a.state, a.node) for a in got] == [
        ("a", "RESTARTING", "n9"), ("b", "ALIVE", "10.0.0.1")]


def test_a_ray_node_row() -> None:
    node = node_from_ray({"NodeID": "abc", "Alive": True, "NodeManagerAddress": "10.0.0.2",
                          "NodeManagerHostname": "h2", "Resources": {
                              "CPU": 2.0, "memory": 3 * 2**30, "node:__internal_head__": 1.0}})
    assert node == Node("abc", True, "10.0.0.2", "h2", head=True, cpus=2.0, memory_bytes=3 * 2**30)
    dead = node_from_ray({"NodeID": "d", "Alive": False, "Resources": {}})
    assert (dead.alive, dead.head, dead.cpus, dead.memory_bytes) == (False, False, 0.0, 0)


# --- the verdict --------------------------------------------------------------------------------


def healthy_report(**changes: Any) -> StatusReport:
    report = StatusReport(
        serve=ServeProcess(running=True, source="serve.json", url="http://127.0.0.1:8000",
                           gcs_address="10.0.0.1:6379", namespace="peernet", pid=42,
                           ingress="haproxy", started_at=1000.0),
        nodes=[Node("n1", True, "10.0.0.1", "h1", True, 2.0, 2**31)],
        shards=[ActorInfo("session-shard-0-of-1", "ALIVE", "10.0.0.1", 7, 0),
                ActorInfo("projector", "ALIVE", "10.0.0.1", 8, 1)],
        gateway=Gateway("RUNNING", "HEALTHY", {"RUNNING": 2}, 2,
                        [ActorInfo("SERVE_REPLICA::peernet#Gateway#a", "ALIVE", "10.0.0.1", 9)]),
        lag=[GroupLag("peernet.feeds@ev", "ev", 8, 0)],
        health=Health(200, "ok", {"kafka": "ok", "redis": "ok", "mongo": "ok", "ray": "ok"}),
        services=[Service("kafka", "running", "127.0.0.1:9092", False, 11, "1 broker(s)")],
        now=1000.0 + 3725,
    )
    for name, value in changes.items():
        setattr(report, name, value)
    return report


def test_a_healthy_report() -> None:
    report = healthy_report()
    assert report.problems() == [] and report.warnings() == []
    assert report.healthy and report.reason() == "healthy"
    text = render_text(report)
    assert text.splitlines()[-1] == "healthy"
    assert "pid 42" in text and "up 1h02m" in text and "2 of 2 replicas running" in text
    assert "peernet.feeds@ev" in text
    as_json = json.loads(json.dumps(report.to_dict()))
    assert as_json["healthy"] is True and as_json["serve"]["uptime_s"] == 3725.0
    assert as_json["gateway"]["running_replicas"] == 2


@pytest.mark.parametrize(("changes", "problem"), [
    ({"serve": ServeProcess(False, "f", "u", "", "peernet", detail="pid 5 is gone")},
     "peernet serve is not running: pid 5 is gone"),
    ({"shards": [ActorInfo("projector", "RESTARTING")]}, "shard actor projector is RESTARTING"),
    ({"shards": [ActorInfo("projector", "MISSING")]}, "shard actor projector is MISSING"),
    ({"gateway": Gateway("RUNNING", "HEALTHY", {"RUNNING": 1, "STARTING": 1}, 2)},
     "1 of 2 gateway replicas running"),
    ({"gateway": Gateway("DEPLOY_FAILED", "UNHEALTHY", {}, 2, message="boom")},
     "gateway application DEPLOY_FAILED, deployment UNHEALTHY: boom"),
    ({"health": Health(503, "unavailable", {"kafka": "down: timeout", "redis": "ok"})},
     "/healthz answered 503, failing: kafka"),
    ({"services": [Service("redis", "stopped", "127.0.0.1:6379", False, None, "")]},
     "service redis is stopped"),
    ({"nodes": [Node("n1", False, "10.0.0.1", "h1", True, 0, 0)]}, "no Ray node is alive"),
    ({"errors": {"ray": "no answer within 10s"}}, "ray: no answer within 10s"),
])
def test_each_thing_down_is_a_problem(changes: dict[str, Any], problem: str) -> None:
    report = healthy_report(**changes)
    assert problem in report.problems()
    assert not report.healthy
    assert report.reason().startswith("NOT HEALTHY: ")
    assert render_text(report).splitlines()[-1] == report.reason()
    assert json.loads(json.dumps(report.to_dict()))["healthy"] is False


def test_a_dead_node_beside_live_ones_and_an_empty_lag_are_warnings_only() -> None:
    report = healthy_report(nodes=[Node("n1", True, "10.0.0.1", "h1", True, 2, 1),
                                   Node("n2", False, "10.0.0.2", "h2", False, 0, 0)], lag=[])
    assert report.healthy
    assert len(report.warnings()) == 2
    assert "10.0.0.2" in report.warnings()[0]


def test_a_section_not_read_says_why() -> None:
    report = healthy_report(nodes=None, shards=None, gateway=None,
                            errors={"ray": "Ray at 10.0.0.1:6379 not reachable: refused"})
    text = render_text(report)
    assert "not read: Ray at 10.0.0.1:6379 not reachable: refused" in text
    assert report.reason() == "NOT HEALTHY: ray: Ray at 10.0.0.1:6379 not reachable: refused"


# --- finding the server, reading it -------------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path) -> PeerNetConfig:
    return load_config({"PEERNET_HOME": str(tmp_path)})


def _write_state(cfg: PeerNetConfig, **state: Any) -> None:
    path = state_file(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state))


def test_no_state_file_and_no_address_is_not_running(home: PeerNetConfig) -> None:
    found, _ = status_module.find_serve(home)
    assert found.running is False and "no state file" in found.detail and not found.gcs_address


def test_a_stale_state_file_is_not_running(home: PeerNetConfig) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    _write_state(home, pid=proc.pid, url="http://127.0.0.1:8000", gcs_address="10.0.0.1:1")
    found, _ = status_module.find_serve(home)
    assert found.running is False and f"pid {proc.pid}" in found.detail
    assert found.gcs_address == ""  # the dead driver's cluster is not looked at


def test_an_address_without_state_file_reports_the_cluster(home: PeerNetConfig) -> None:
    found, _ = status_module.find_serve(home, address="10.0.0.1:6379", url="http://h:1")
    assert found.running is None and found.gcs_address == "10.0.0.1:6379"
    assert found.url == "http://h:1"
    report = StatusReport(serve=found)
    assert report.healthy  # an unknown driver is not a problem; its actors will tell


@pytest.fixture
def peernet_like() -> Iterator[subprocess.Popen[bytes]]:
    """A live process whose command line is `... peernet.cli serve`, as `peernet serve`'s is."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             "peernet.cli", "serve"])
    deadline = time.monotonic() + 10
    while b"peernet.cli" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    yield proc
    proc.kill()
    proc.wait()


def test_a_live_state_file_names_the_cluster_and_url(home: PeerNetConfig,
                                                     peernet_like: subprocess.Popen[bytes]) -> None:
    _write_state(home, pid=peernet_like.pid, url="http://0.0.0.0:8000", gcs_address="10.0.0.1:6379",
                 namespace="peernet", ingress="haproxy", started_at=123.0)
    found, state = status_module.find_serve(home)
    assert found == ServeProcess(running=True, source=str(state_file(home)),
                                 url="http://127.0.0.1:8000", gcs_address="10.0.0.1:6379",
                                 namespace="peernet", pid=peernet_like.pid, ingress="haproxy",
                                 started_at=123.0)
    assert state["gcs_address"] == "10.0.0.1:6379"
    assert status_module.find_serve(home, address="auto")[0].gcs_address == "auto"


class _FakeGateway(BaseHTTPRequestHandler):
    metrics_text = ""
    health: tuple[int, dict[str, Any]] = (200, {})

    def do_GET(self) -> None:
        if self.path == "/healthz":
            code, body = self.health
            payload, kind = json.dumps(body).encode(), "application/json"
        else:
            code, payload, kind = 200, self.metrics_text.encode(), "text/plain"
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_gateway() -> Iterator[tuple[str, type[_FakeGateway]]]:
    handler = type("Handler", (_FakeGateway,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


def test_collect_reads_health_and_lag_over_http(home: PeerNetConfig,
                                                fake_gateway: tuple[str, Any]) -> None:
    url, handler = fake_gateway
    handler.health = (503, {"status": "unavailable", "checks": {"kafka": "down: x", "redis": "ok"}})
    handler.metrics_text = ('# TYPE peernet_kafka_consumer_lag gauge\n'
                            'peernet_kafka_consumer_lag{group="g",partition="0",topic="t"} 4.0\n'
                            'peernet_kafka_consumer_lag{group="g",partition="1",topic="t"} 1.0\n')
    report = status_module.collect(home, url=url, services=lambda: [])
    assert report.health == Health(503, "unavailable", {"kafka": "down: x", "redis": "ok"})
    assert report.lag == [GroupLag("g", "t", 2, 5)]
    assert report.services == []
    assert "/healthz answered 503, failing: kafka" in report.problems()


def test_a_part_that_does_not_answer_in_time_is_named_and_the_rest_is_reported(
        home: PeerNetConfig) -> None:
    release = threading.Event()

    def hanging_services() -> list[Service]:
        release.wait(30)
        return []

    started = time.monotonic()
    try:
        report = status_module.collect(home, services=hanging_services, timeout_s=0.5)
        assert time.monotonic() - started < 5
        assert report.errors["services"] == "no answer within 0.5s"
        assert status_module.stuck()
    finally:
        release.set()
    assert report.serve.running is False and not report.healthy


def test_an_unreachable_cluster_fails_fast(home: PeerNetConfig) -> None:
    report = status_module.collect(home, address="127.0.0.1:1", url="http://127.0.0.1:1",
                                   timeout_s=5)
    assert report.errors["ray"].startswith("Ray at 127.0.0.1:1 not reachable")
    assert report.elapsed_s < 5
    assert report.nodes is None and not report.healthy


def test_the_gateway_from_serves_own_status_objects() -> None:
    """serve.status() holds enums: the report carries the names Serve documents (RUNNING),
    not the enums' reprs."""
    from ray.serve._private.common import DeploymentStatus, DeploymentStatusTrigger, ReplicaState
    from ray.serve.schema import (
        ApplicationStatus,
        ApplicationStatusOverview,
        DeploymentStatusOverview,
        ProxyStatus,
        ServeStatus,
    )

    deployment = DeploymentStatusOverview(
        status=DeploymentStatus.HEALTHY, status_trigger=DeploymentStatusTrigger.CONFIG_UPDATE_COMPLETED,
        replica_states={ReplicaState.RUNNING: 1, ReplicaState.STARTING: 1}, message="")
    app = ApplicationStatusOverview(status=ApplicationStatus.RUNNING, message="",
                                    last_deployed_time_s=1.0, deployments={"Gateway": deployment})
    status = ServeStatus(proxies={"n1": ProxyStatus.HEALTHY, "n2": ProxyStatus.UNHEALTHY},
                         applications={"peernet": app})
    gateway = status_module._gateway(status, 2, [])
    assert gateway == Gateway("RUNNING", "HEALTHY", {"RUNNING": 1, "STARTING": 1}, 2,
                              proxies={"HEALTHY": 1, "UNHEALTHY": 1})
    problems = healthy_report(gateway=gateway).problems()
    assert problems == ["1 of 2 gateway replicas running", "1 Serve proxy(ies) UNHEALTHY"]
    missing = status_module._gateway(ServeStatus(), 2, [])
    assert (missing.app_status, missing.running_replicas) == ("NOT_FOUND", 0)


def test_unread_sections_are_reported_in_a_fixed_order_whatever_failed_first() -> None:
    from peernet.status_report import ServeProcess, StatusReport

    proc = ServeProcess(running=True, source="s", url="u", gcs_address="g", namespace="n")
    a = StatusReport(serve=proc, errors={"lag": "x", "health": "y"})
    b = StatusReport(serve=proc, errors={"health": "y", "lag": "x"})
    assert a.problems() == b.problems() == ["health: y", "lag: x"]
    assert a.reason().startswith("NOT HEALTHY: health: y")
