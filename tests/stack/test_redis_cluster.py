"""The local Redis Cluster launcher (stack/redis_cluster.py) against the machine's redis-server:
the `redis_cluster` fixture's cluster has three masters covering every slot and serves a cluster
client on all of them; a cluster of the test's own stops leaving no node running, and one whose
node cannot start fails with that node's log."""

from __future__ import annotations

import socket
import time
import uuid
from pathlib import Path

import pytest
import redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis_cluster_fixture import local_redis_cluster

from stack.process import StackError, cmdline, is_alive, port_in_use
from stack.redis_cluster import HOST, SLOTS, LocalRedisCluster

pytestmark = pytest.mark.stack


def _client(port: int) -> redis.Redis:
    return redis.Redis(host=HOST, port=port, socket_timeout=5, decode_responses=True)


def _slot_owners(port: int) -> dict[int, int]:
    """Slot -> port of the master that serves it, as node `port` sees the cluster."""
    client = _client(port)
    try:
        ranges = client.execute_command("CLUSTER", "SLOTS")
    finally:
        client.close()
    return {slot: int(master[1]) for first, last, master, *_ in ranges
            for slot in range(int(first), int(last) + 1)}


def test_the_cluster_has_three_masters_covering_every_slot(redis_cluster: LocalRedisCluster) -> None:
    ports = redis_cluster.ports
    assert len(set(ports)) == 3
    assert redis_cluster.url == "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)
    for port in ports:
        client = _client(port)
        try:
            info = dict(line.split(":", 1) for line in
                        str(client.execute_command("CLUSTER", "INFO")).split() if ":" in line)
            nodes = str(client.execute_command("CLUSTER", "NODES")).strip().splitlines()
        finally:
            client.close()
        assert info["cluster_state"] == "ok", info
        assert info["cluster_slots_assigned"] == info["cluster_slots_ok"] == str(SLOTS), info
        assert info["cluster_known_nodes"] == info["cluster_size"] == "3", info
        # <id> <ip:port@bus> <flags> <master> <ping> <pong> <epoch> <link> <slot ranges...>
        fields = [line.split() for line in nodes]
        assert sorted(int(f[1].split("@")[0].rsplit(":", 1)[1]) for f in fields) == sorted(ports)
        assert all("master" in f[2].split(",") and f[7] == "connected" for f in fields), nodes
        assert all(len(f) > 8 for f in fields), f"a master without slots: {nodes}"
    owners = _slot_owners(ports[0])
    assert sorted(owners) == list(range(SLOTS))
    assert set(owners.values()) == set(ports)
    assert all(_slot_owners(port) == owners for port in ports[1:])


async def test_a_cluster_client_writes_to_every_master(redis_cluster: LocalRedisCluster) -> None:
    owners = _slot_owners(redis_cluster.ports[0])
    # One key per master: names tried until each master's slots have one.
    keys: dict[int, str] = {}
    prefix = f"test:cluster:{uuid.uuid4().hex[:8]}"
    for i in range(1000):
        key = f"{prefix}:{i}"
        keys.setdefault(owners[key_slot(key.encode())], key)
        if len(keys) == len(redis_cluster.ports):
            break
    assert set(keys) == set(redis_cluster.ports)
    assert len({key_slot(k.encode()) for k in keys.values()}) == len(keys)

    client = RedisCluster(startup_nodes=[ClusterNode(HOST, p) for p in redis_cluster.ports],
                          socket_timeout=5)
    try:
        for port, key in keys.items():
            await client.set(key, f"on {port}".encode(), ex=60)
        for port, key in keys.items():
            assert await client.get(key) == f"on {port}".encode()
            owner = client.get_node_from_key(key)
            assert owner is not None and owner.port == port
    finally:
        await client.aclose()
    # Each key is stored on its slot's master itself (a plain client asks that node alone).
    for port, key in keys.items():
        node = _client(port)
        try:
            assert node.get(key) == f"on {port}"
            node.delete(key)
        finally:
            node.close()


def test_stop_leaves_no_node_running(tmp_path_factory: pytest.TempPathFactory) -> None:
    t0 = time.monotonic()
    with local_redis_cluster(tmp_path_factory) as cluster:
        started_s = time.monotonic() - t0
        pids = cluster.pids
        assert len(pids) == 3
        for pid, port in zip(pids, cluster.ports, strict=True):
            assert is_alive(pid)
            assert Path(cmdline(pid).split()[0]).name == "redis-server", cmdline(pid)
            assert f"{HOST}:{port}" in cmdline(pid), cmdline(pid)
            assert port_in_use(HOST, port)
    t1 = time.monotonic()
    assert not [pid for pid in pids if is_alive(pid)]
    assert not [port for port in cluster.ports if port_in_use(HOST, port)]
    assert cluster.pids == ()
    cluster.stop()  # a second stop does nothing
    print(f"\nlocal Redis Cluster: started in {started_s:.1f}s, stopped in {t1 - t0 - started_s:.2f}s")


def test_a_node_that_cannot_start_fails_the_start_with_its_log(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    cluster = local_redis_cluster(tmp_path_factory)
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind((HOST, cluster.ports[1]))
        taken.listen()
        with pytest.raises(StackError) as failed:
            cluster.start()
        assert f"port {cluster.ports[1]} exited" in str(failed.value)
        assert "Address already in use" in str(failed.value)
    assert cluster.pids == ()
    assert not [port for port in (cluster.ports[0], cluster.ports[2]) if port_in_use(HOST, port)]


def test_the_stack_probe_and_peernet_status_see_a_cluster_url(
        redis_cluster: LocalRedisCluster) -> None:
    """`peernet status` and `peernet stack` probe Redis through stack/redis.py: for a
    redis+cluster:// URL they ask a listed node (the first that answers) for the cluster's
    state; a URL whose nodes are all down is a StackError that names them."""
    from peernet.config import load_config
    from stack.redis import REDIS

    dead = socket.socket()
    dead.bind((HOST, 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    live = redis_cluster.url.replace("redis+cluster://", f"redis+cluster://{HOST}:{dead_port},")
    assert REDIS.probe(load_config({"PEERNET_REDIS_URL": live}), 2.0).endswith(
        "cluster (3 nodes)")
    with pytest.raises(StackError, match=f"{HOST}:{dead_port}"):
        REDIS.probe(load_config({"PEERNET_REDIS_URL": f"redis+cluster://{HOST}:{dead_port}"}),
                    1.0)
