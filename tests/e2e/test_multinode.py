"""PeerNet on a multi-node Ray cluster (issue 8), Ray nodes on this machine (`ray start --head`
and `ray start --address`, Ray's health checks tuned to seconds) with `peernet serve` joined:

- failover: two nodes, the `dm` load running, and the worker node killed as a crashed host goes
  (its raylet and every process under it SIGKILLed) by `bench --chaos node`. Its shard actors and
  gateway replica come back on the head, clients resume, and nothing acknowledged is lost.
- `every_node` placement: one gateway replica on each node carrying the gateway resource, a
  node that joins later gets one, and a node that dies takes only its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from fault_checks import run_fault
from wsclient import (
    SERVER_TOPICS,
    Client,
    Server,
    dev_token,
    running_server,
    server_port,
    unique_user,
)

from bench.chaos import ACTOR_TITLES, _scan, pick_processes, worker_raylets
from bench.params import BenchParams
from peernet.config import GATEWAY_RESOURCE, RAY_HEALTH_CHECKS, PeerNetConfig
from serve.deployment import state_file
from serve.ray_env import free_port_in

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


def cluster_server_env(local_stack: PeerNetConfig, tag: str, gcs_port: int, home: Path,
                       port: str, **extra: str) -> dict[str, str]:
    """The environment of a `peernet serve` on a test's own Ray cluster: its own home (the main
    test server's state file says "already serving" otherwise), the local stack's services by
    URL, topics and keyspaces named by `tag`, and Serve's proxies on the head only (every node
    is on this host: only one may bind the port)."""
    s = local_stack.services
    return {
        **os.environ, **HEALTH_CHECKS,
        "PEERNET_HOME": str(home),
        "PEERNET_KAFKA_BOOTSTRAP": s.kafka_bootstrap, "PEERNET_REDIS_URL": s.redis_url,
        "PEERNET_MONGO_URL": s.mongo_url, "PEERNET_MONGO_DB": f"peernet_test_{tag}",
        "PEERNET_RAY_ADDRESS": f"127.0.0.1:{gcs_port}",
        "PEERNET_PROXY_LOCATION": "HeadOnly",
        "PEERNET_PORT": port, "PEERNET_DEV_TOKENS": "1",
        "PEERNET_EVENTS_TOPIC": f"peernet.test-{tag}.events",
        "PEERNET_MESSAGES_TOPIC": f"peernet.test-{tag}.messages",
        "PEERNET_INBOX_TOPIC": f"peernet.test-{tag}.inbox",
        "PEERNET_FEED_KEYSPACE": f"social-test-{tag}",
        "PEERNET_PRESENCE_KEYSPACE": f"presence-test-{tag}",
        "PEERNET_METRICS_KEYSPACE": f"metrics-test-{tag}",
        **extra,
    }


# --- every_node placement ----------------------------------------------------------------------

GATEWAY_NODE = f'--resources={{"{GATEWAY_RESOURCE}": 1}}'
# Small nodes: Ray would otherwise count this machine's memory and CPUs once per node.
SMALL_NODE = ["--num-cpus=1", "--memory=1000000000", "--object-store-memory=100000000"]
REPLICA_TITLE = ACTOR_TITLES["replica"]
# Replicas placed, and a dead node counted out (Ray's health checks, then two readings of the
# node table by `peernet serve`): generous, since the machine is shared.
PLACED_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class EveryNodeCluster:
    server: Server
    gcs_port: int
    ray_env: dict[str, str]


@pytest.fixture
def every_node_server(local_stack: PeerNetConfig, tmp_path_factory: pytest.TempPathFactory
                      ) -> Iterator[EveryNodeCluster]:
    """Two nodes carrying the gateway resource, and `peernet serve` in every_node placement with
    one shard actor of each kind (the footprint kept small). Function-scoped: its Ray is gone
    before the next test starts its own."""
    run = uuid.uuid4().hex[:6]
    temp_dir = f"/tmp/pn-en-{run}"
    gcs_port = free_port()
    ray_env = {**os.environ, **HEALTH_CHECKS, "RAY_AUTH_MODE": local_stack.ray.auth_mode}
    try:
        ray_start(["--head", f"--port={gcs_port}", f"--temp-dir={temp_dir}", *SMALL_NODE, GATEWAY_NODE,
                   "--min-worker-port=20000", "--max-worker-port=20299"], ray_env)
        ray_start([f"--address=127.0.0.1:{gcs_port}", *SMALL_NODE, GATEWAY_NODE,
                   "--min-worker-port=20300", "--max-worker-port=20599"], ray_env)
        # All nodes are on this host: only the head's HAProxy binds the port; it balances over
        # the replicas of every node.
        env = cluster_server_env(
            local_stack, f"en{run}", gcs_port, tmp_path_factory.mktemp("en-home"),
            server_port("PEERNET_TEST_EVERY_NODE_PORT"),
            PEERNET_GATEWAY_PLACEMENT="every_node", PEERNET_SESSION_SHARDS="1",
            PEERNET_FEED_SHARDS="1", PEERNET_PRESENCE_SHARDS="1")
        SERVER_TOPICS.extend([env["PEERNET_EVENTS_TOPIC"], env["PEERNET_MESSAGES_TOPIC"],
                              env["PEERNET_INBOX_TOPIC"]])
        log_path = tmp_path_factory.mktemp("en-server") / "peernet-serve.log"
        with running_server(env, log_path, START_TIMEOUT_S) as server:
            yield EveryNodeCluster(server, gcs_port, ray_env)
    finally:
        kill_cluster(temp_dir, gcs_port)


def raylets(gcs: str) -> list[int]:
    """The raylets of the cluster at `gcs`, the head's included."""
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        words = proc.info.get("cmdline") or []
        if words and words[0].endswith("/raylet") and f"--gcs-address={gcs}" in words:
            out.append(proc.pid)
    return sorted(out)


def replicas_by_node(gcs: str) -> dict[int, list[int]]:
    """Gateway replica processes under each raylet of the cluster (by the raylet's pid)."""
    replicas = set(pick_processes(_scan(), REPLICA_TITLE, gcs))
    out = {}
    for raylet in raylets(gcs):
        with contextlib.suppress(psutil.Error):
            out[raylet] = sorted(p.pid for p in psutil.Process(raylet).children() if p.pid in replicas)
    return out


async def one_replica_on_each(gcs: str, nodes: int) -> dict[int, list[int]]:
    """Wait until the cluster has `nodes` raylets with one gateway replica under each."""
    deadline = time.monotonic() + PLACED_TIMEOUT_S
    while True:
        placed = await asyncio.to_thread(replicas_by_node, gcs)
        if len(placed) == nodes and all(len(p) == 1 for p in placed.values()):
            return placed
        assert time.monotonic() < deadline, f"not one replica on each of {nodes} nodes: {placed}"
        await asyncio.sleep(0.5)


async def ingress_reaches(server: Server, count: int) -> None:
    """Wait until `count` sockets open at once reach `count` replicas through the ingress (HAProxy,
    by least connections), for up to 60 s. Tokens are fetched first and a few tries allowed:
    HAProxy learns of a new replica by a reload, and its least-connections choice is a moment's
    (on a loaded CI machine both sockets of one try went to one replica of two, the two token
    requests just before them to the other)."""
    seen: list[list[str]] = []
    deadline = time.monotonic() + 60
    while True:
        users = [unique_user("en") for _ in range(count)]
        tokens = [await dev_token(server.url, u) for u in users]
        clients: list[Client] = []
        try:
            for user, token in zip(users, tokens, strict=True):
                clients.append(await Client.connect(server.ws_url, server.url, user, token=token))
            seen.append(sorted(str(c.welcome.get("replica")) for c in clients))
        finally:
            for c in clients:
                await c.close()
        if len(set(seen[-1])) == count:
            return
        assert time.monotonic() < deadline, f"{count} sockets never reached {count} replicas: {seen}"
        await asyncio.sleep(1)


def expected_replicas(server: Server) -> int:
    """What `peernet serve` asks Serve for (and `peernet status` expects)."""
    return int(json.loads(state_file(server.cfg).read_text())["replicas"])


@pytest.mark.ray
@pytest.mark.timeout(900)
async def test_every_node_placement_follows_the_nodes_that_carry_the_resource(
        every_node_server: EveryNodeCluster) -> None:
    server, gcs = every_node_server.server, every_node_server.server.gcs_address
    took: dict[str, float] = {}

    before = await one_replica_on_each(gcs, 2)
    assert expected_replicas(server) == 2
    assert f"2 carrying {GATEWAY_RESOURCE}" in server.log_tail(200)

    # A node joins, carrying the resource: it gets its replica, and no other replica restarts.
    t0 = time.monotonic()
    old = set(raylets(gcs))
    await asyncio.to_thread(ray_start, [f"--address=127.0.0.1:{every_node_server.gcs_port}", *SMALL_NODE,
                                        GATEWAY_NODE, "--min-worker-port=20600",
                                        "--max-worker-port=20899"], every_node_server.ray_env)
    took["ray start of the third node"] = time.monotonic() - t0
    (joined,) = set(raylets(gcs)) - old
    after = await one_replica_on_each(gcs, 3)
    took["join to its replica running"] = time.monotonic() - t0
    assert {r: p for r, p in after.items() if r != joined} == before, "a replica was restarted"
    assert expected_replicas(server) == 3
    assert "gateway replicas 2 -> 3" in server.log_tail(200)
    # ... and the ingress reaches it: three sockets at once land on three replicas.
    await ingress_reaches(server, 3)
    took["join to all three reached through HAProxy"] = time.monotonic() - t0

    # The node dies as a crashed host goes: the count follows, and only its replica is gone.
    victim = psutil.Process(joined)
    doomed = [victim, *victim.children(recursive=True)]
    t0 = time.monotonic()
    for proc in reversed(doomed):
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + PLACED_TIMEOUT_S
    while expected_replicas(server) != 2:
        assert time.monotonic() < deadline, f"the count did not follow the dead node:\n{server.log_tail()}"
        await asyncio.sleep(0.25)
    took["kill to the count lowered"] = time.monotonic() - t0
    assert "gateway replicas 3 -> 2" in server.log_tail(200)
    assert await one_replica_on_each(gcs, 2) == before, "a replica on a live node was stopped"
    await asyncio.sleep(5)  # two more readings of the node table: nothing else changes
    assert await asyncio.to_thread(replicas_by_node, gcs) == before
    await ingress_reaches(server, 2)
    print("every_node placement: " + "; ".join(f"{k} {v:.1f} s" for k, v in took.items()))


# --- failover ---------------------------------------------------------------------------------


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
        env = cluster_server_env(local_stack, f"mn{run}", gcs_port,
                                 tmp_path_factory.mktemp("mn-home"),
                                 server_port("PEERNET_TEST_MULTINODE_PORT"))
        # Two shards of each kind, as a cluster sets its counts (deploy/peernet.env), so that
        # the node about to die holds shards of its own (the default is one of each).
        env.update(PEERNET_SESSION_SHARDS="2", PEERNET_FEED_SHARDS="2",
                   PEERNET_PRESENCE_SHARDS="2")
        SERVER_TOPICS.extend([env["PEERNET_EVENTS_TOPIC"], env["PEERNET_MESSAGES_TOPIC"],
                              env["PEERNET_INBOX_TOPIC"]])
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
    started = [line for line in server.log_tail(400).splitlines() if "peernet: actor " in line]
    assert sum(n for k, n in placed.items() if k != "replica") >= 2, (placed, started)
    # max_replicas_per_node (replicas - 1 on two nodes): the node never holds every replica.
    assert placed["replica"] == 1, placed

    params = BenchParams(scenario="dm", clients=30, rate=10, warmup=1, duration=30, drain=40,
                         fault_at=4, urls=(server.url,), chaos=("node",),
                         ray_address=server.gcs_address).validate()
    await run_fault(params, ARTIFACTS, "test_multinode", server.log_tail())
    assert not worker_raylets(server.gcs_address), "the killed node is back?"
