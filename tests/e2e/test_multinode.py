"""Failover on a multi-node Ray cluster (issue 8): two Ray nodes on this machine (`ray start
--head` and `ray start --address`, Ray's health checks tuned to seconds), `peernet serve` joined
to them, the `dm` load running, and the worker node killed as a crashed host goes (its raylet and
every process under it SIGKILLed) by `bench --chaos node`. Its shard actors and gateway replica
come back on the head, clients resume, and nothing acknowledged is lost.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from fault_checks import run_fault
from wsclient import SERVER_TOPICS, Server, running_server

from bench.chaos import ACTOR_TITLES, _scan, pick_processes, worker_raylets
from bench.params import BenchParams
from peernet.config import RAY_HEALTH_CHECKS, PeerNetConfig
from serve.deployment import free_port_in

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "multinode"
RAY = str(Path(sys.executable).parent / "ray")
# Node failure noticed in seconds: the settings cluster.yaml starts a head with.
HEALTH_CHECKS = {**RAY_HEALTH_CHECKS, "RAY_health_check_initial_delay_ms": "1000"}
START_TIMEOUT_S = 420.0


# Every port this module has handed out: draws are random, and two equal draws for one `ray
# start` made it refuse to start ("a port number that is used by other components", seen in CI).
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free port below the kernel's ephemeral range (which an outgoing connection may take
    between this check and Ray's bind), apart from the worker ports used here, and from every
    port this module chose before."""
    for _ in range(100):
        port = free_port_in(22000, 23000)
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise AssertionError("no free port in 22000-23000 that was not handed out already")


def ray_start(args: list[str], env: dict[str, str]) -> None:
    # Every node's ports chosen free: the main test server's Ray runs on this machine too.
    ports = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
             "--runtime-env-agent-port", "--metrics-export-port"]
    if "--head" in args:
        ports.append("--ray-client-server-port")
        args = ["--include-dashboard=false", *args]
    cmd = [RAY, "start", "--disable-usage-stats", *[f"{p}={free_port()}" for p in ports], *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"


def kill_cluster(temp_dir: str, gcs_port: int) -> None:
    """SIGKILL every process of the test's own cluster (never `ray stop`, which stops every Ray
    on the machine, the main test server's included)."""
    doomed: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        words = proc.info.get("cmdline") or []
        # Ray's client server names the GCS with --address=, its other processes --gcs-address=.
        ours = any(temp_dir in w or (w.startswith(("--gcs-address=", "--address="))
                                     and w.endswith(f":{gcs_port}")) for w in words)
        if ours:
            with contextlib.suppress(psutil.Error):
                for p in [proc, *proc.children(recursive=True)]:
                    doomed[p.pid] = p
    for p in doomed.values():
        with contextlib.suppress(psutil.Error):
            p.kill()


@pytest.fixture(scope="module")
def two_node_server(local_stack: PeerNetConfig, tmp_path_factory: pytest.TempPathFactory
                    ) -> Iterator[Server]:
    run = uuid.uuid4().hex[:6]
    temp_dir = f"/tmp/pn-mn-{run}"
    gcs_port = free_port()
    ray_env = {**os.environ, **HEALTH_CHECKS, "RAY_AUTH_MODE": local_stack.ray.auth_mode}
    try:
        ray_start(["--head", f"--port={gcs_port}", "--num-cpus=2", f"--temp-dir={temp_dir}",
                   "--min-worker-port=21000", "--max-worker-port=21499"], ray_env)
        ray_start([f"--address=127.0.0.1:{gcs_port}", "--num-cpus=2",
                   "--resources={\"peernet_node_b\": 1}",
                   "--min-worker-port=21500", "--max-worker-port=21999"], ray_env)
        port = int(os.environ.get("PEERNET_TEST_MULTINODE_PORT", "18680"))
        s = local_stack.services
        env = {
            **os.environ, **HEALTH_CHECKS,
            # Its own home: the main test server's state file says "already serving" otherwise;
            # the services are the local stack's, given by URL.
            "PEERNET_HOME": str(tmp_path_factory.mktemp("mn-home")),
            "PEERNET_KAFKA_BOOTSTRAP": s.kafka_bootstrap, "PEERNET_REDIS_URL": s.redis_url,
            "PEERNET_MONGO_URL": s.mongo_url, "PEERNET_MONGO_DB": f"peernet_test_mn_{run}",
            "PEERNET_RAY_ADDRESS": f"127.0.0.1:{gcs_port}",
            # Both nodes are on this host: only the head may bind the port.
            "PEERNET_PROXY_LOCATION": "HeadOnly",
            "PEERNET_PORT": str(port), "PEERNET_DEV_TOKENS": "1",
            "PEERNET_EVENTS_TOPIC": f"peernet.test-mn{run}.events",
            "PEERNET_INBOX_TOPIC": f"peernet.test-mn{run}.inbox",
            "PEERNET_FEED_KEYSPACE": f"social-test-mn{run}",
            "PEERNET_PRESENCE_KEYSPACE": f"presence-test-mn{run}",
        }
        SERVER_TOPICS.extend([env["PEERNET_EVENTS_TOPIC"], env["PEERNET_INBOX_TOPIC"]])
        log_path = tmp_path_factory.mktemp("mn-server") / "peernet-serve.log"
        with running_server(env, log_path, START_TIMEOUT_S) as server:
            yield server
    finally:
        kill_cluster(temp_dir, gcs_port)


def on_worker_node(gcs: str) -> dict[str, int]:
    """PeerNet actor processes on the cluster's worker node, by kind."""
    (raylet,) = worker_raylets(gcs)
    under = {p.pid for p in psutil.Process(raylet).children()}
    procs = [p for p in _scan() if p.pid in under]
    return {k: len(pick_processes(procs, t, gcs)) for k, t in ACTOR_TITLES.items()}


@pytest.mark.ray
@pytest.mark.timeout(900)
async def test_a_killed_worker_node_loses_nothing_acknowledged(two_node_server: Server) -> None:
    server = two_node_server
    placed = on_worker_node(server.gcs_address)
    # SPREAD placement: the node about to die holds shards (else the test would prove little).
    assert sum(n for k, n in placed.items() if k != "replica") >= 2, placed
    # max_replicas_per_node (replicas - 1 on two nodes): the node never holds every replica.
    assert placed["replica"] == 1, placed

    params = BenchParams(scenario="dm", clients=30, rate=10, warmup=1, duration=30, drain=40,
                         fault_at=4, urls=(server.url,), chaos=("node",),
                         ray_address=server.gcs_address).validate()
    await run_fault(params, ARTIFACTS, "test_multinode", server.log_tail())
    assert not worker_raylets(server.gcs_address), "the killed node is back?"
