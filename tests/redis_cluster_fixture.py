"""The `redis_cluster` fixture: a throwaway Redis Cluster (stack/redis_cluster.py) of three
masters on free ports, started by the first test that asks for it and stopped at the end of the
session. tests/conftest.py imports it, so a test module anywhere under tests/ just names it:

    def test_x(redis_cluster: LocalRedisCluster) -> None:
        cfg = load_config({"PEERNET_REDIS_URL": redis_cluster.url})
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from ports import free_ports

from stack.process import StackError
from stack.redis_cluster import LocalRedisCluster

MASTERS = 3

# The third kind of the Redis-backed contract suites (beside "real" and "memory"): the real
# implementation against the `redis_cluster` fixture's cluster.
CLUSTER = pytest.param("cluster", marks=pytest.mark.stack)


def cluster_url(request: pytest.FixtureRequest) -> str:
    """The `redis+cluster://` URL of the session's cluster (started on first use)."""
    cluster: LocalRedisCluster = request.getfixturevalue("redis_cluster")
    return cluster.url


def local_redis_cluster(tmp_path_factory: pytest.TempPathFactory, masters: int = MASTERS,
                        replicas: int = 0) -> LocalRedisCluster:
    """A cluster (not started) in a new temporary directory. Its bus ports are free ports too:
    the default, port + 10000, is past 65535 for most of the OS's ephemeral ports."""
    nodes = masters * (1 + replicas)
    ports = free_ports(2 * nodes)
    return LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster"), ports[:nodes],
                             bus_ports=ports[nodes:], replicas=replicas)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    """A started Redis Cluster of three masters, shared by the whole session: tests use keys
    no other test uses, and never stop or reconfigure its nodes."""
    cluster = local_redis_cluster(tmp_path_factory)
    try:
        cluster.start()
    except StackError as exc:
        pytest.fail(f"the test Redis Cluster did not start: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()
