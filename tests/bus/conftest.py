"""Fixtures of the bus contract suites: one kit per seam, parametrized over the real
implementation (marked `stack`, against the running local stack) and the in-memory one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from bus_helpers import (
    SERVICE_WAIT_S,
    CacheKit,
    LogKit,
    PubSubKit,
    Services,
    StoreKit,
    closed_port,
    service_addresses,
    unique,
)
from redis_cluster_fixture import CLUSTER, cluster_url

from bus.cache import Cache
from bus.cache_memory import MemoryCache
from bus.eventlog import EventLog
from bus.eventlog_memory import MemoryEventLog
from bus.kafka import KafkaEventLog
from bus.mongo import MongoDocumentStore
from bus.pubsub import PubSub
from bus.pubsub_memory import MemoryPubSub
from bus.pubsub_redis import RedisPubSub
from bus.redis import RedisCache, redis_client, redis_target
from bus.store import DocumentStore
from bus.store_memory import MemoryDocumentStore
from peernet.config import PeerNetConfig, load_config
from peernet.errors import PeerNetError

REAL = pytest.param("real", marks=pytest.mark.stack)
MEMORY = "memory"

# Short timeouts: a dead service must fail a test in seconds, not minutes.
KAFKA_REQUEST_TIMEOUT_MS = 3000
KAFKA_DELIVERY_TIMEOUT_MS = 5000


async def _wait_until_up(name: str, ping: Callable[[], Awaitable[None]]) -> None:
    """The local stack may be restarting (another engineer, or a fault test): wait, then fail
    with the error, rather than fail at once."""
    deadline = time.monotonic() + SERVICE_WAIT_S
    while True:
        try:
            await ping()
            return
        except (PeerNetError, OSError) as exc:
            if time.monotonic() > deadline:
                pytest.fail(f"{name} did not answer within {SERVICE_WAIT_S:.0f}s: {exc!r}")
            await asyncio.sleep(1.0)


@pytest.fixture(scope="session")
def bus_cfg() -> PeerNetConfig:
    return load_config()


@pytest.fixture(scope="session")
def services(request: pytest.FixtureRequest, bus_cfg: PeerNetConfig) -> Services:
    """The real services, once the shared `local_stack` fixture (tests/conftest.py) has brought
    the local stack up. Only tests of real backends ask for it (kits: lazily), so that the
    memory half of the suites runs without any service."""
    try:
        request.getfixturevalue("local_stack")
    except pytest.FixtureLookupError:
        pass  # no shared fixture: use the services as they are
    return service_addresses(bus_cfg)


def _real_services(request: pytest.FixtureRequest) -> Services:
    services: Services = request.getfixturevalue("services")
    return services


# --- EventLog --------------------------------------------------------------------------------


@pytest.fixture(params=[REAL, MEMORY])
async def log_kit(request: pytest.FixtureRequest) -> AsyncIterator[LogKit]:
    kind: str = request.param
    services = _real_services(request) if kind == "real" else service_addresses(load_config())
    server = MemoryEventLog()

    def new() -> EventLog:
        if kind == "memory":
            return server.client()
        return KafkaEventLog(services.kafka_bootstrap,
                             request_timeout_ms=KAFKA_REQUEST_TIMEOUT_MS,
                             delivery_timeout_ms=KAFKA_DELIVERY_TIMEOUT_MS,
                             client_id=unique("test"))

    async def make() -> EventLog:
        log = new()
        kit.created.append(log)
        if kind == "real":
            await _wait_until_up("kafka", log.start)
        else:
            await log.start()
        return log

    def unreachable() -> EventLog:
        if kind == "memory":
            down = MemoryEventLog()
            down.set_down(True)
            return down
        return KafkaEventLog(f"127.0.0.1:{closed_port()}", request_timeout_ms=1000,
                             delivery_timeout_ms=2000, ping_timeout_ms=1000)

    kit = LogKit(kind, make, unreachable)
    yield kit
    for log in kit.created:
        await log.stop()


# --- PubSub ----------------------------------------------------------------------------------


def _redis_url(request: pytest.FixtureRequest, kind: str) -> str:
    """The Redis a kit of `kind` uses: the local stack's, or the test Redis Cluster's."""
    if kind == "cluster":
        return cluster_url(request)
    services = _real_services(request) if kind == "real" else service_addresses(load_config())
    return services.redis_url


@pytest.fixture(params=[REAL, CLUSTER, MEMORY])
async def pubsub_kit(request: pytest.FixtureRequest) -> AsyncIterator[PubSubKit]:
    kind: str = request.param
    url = _redis_url(request, kind)
    server = MemoryPubSub()
    # On a cluster, each node answers for its own clients: the admin asks them all.
    admin = redis_client(url) if kind != "memory" else None
    nodes = [redis_client(u) for u in redis_target(url).node_urls] if kind == "cluster" else []

    async def make() -> PubSub:
        ps: PubSub = server.client() if kind == "memory" else RedisPubSub(url)
        kit.created.append(ps)
        if kind != "memory":
            await _wait_until_up("redis", ps.start)
        else:
            await ps.start()
        return ps

    async def numsub(channel: str) -> int:
        if admin is None:
            return server.subscriber_count(channel)
        total = 0
        for node in nodes or [admin]:
            ((_, count),) = await node.pubsub_numsub(channel)
            total += int(count)
        return total

    async def drop(ps: PubSub) -> None:
        if isinstance(ps, MemoryPubSub):
            ps.drop_connection()
            return
        assert admin is not None and isinstance(ps, RedisPubSub)
        for node in nodes or [admin]:
            for client in await node.client_list():
                if client.get("name") == ps.connection_name:
                    await node.client_kill_filter(_id=client["id"])
                    return
        raise AssertionError(f"no Redis connection named {ps.connection_name}")

    # A cluster's PUBLISH counts the subscribers of the node that took it only.
    kit = PubSubKit(kind, make, numsub, drop, exact_counts=kind != "cluster")
    yield kit
    for ps in kit.created:
        await ps.stop()
    for client in [*nodes, *([admin] if admin is not None else [])]:
        await client.aclose()


# --- Cache -----------------------------------------------------------------------------------


@pytest.fixture(params=[REAL, CLUSTER, MEMORY])
async def cache_kit(request: pytest.FixtureRequest) -> AsyncIterator[CacheKit]:
    kind: str = request.param
    url = _redis_url(request, kind)
    server = MemoryCache()

    async def make() -> Cache:
        cache: Cache = server.client() if kind == "memory" else RedisCache(url)
        kit.created.append(cache)
        await cache.start()
        if kind != "memory":
            await _wait_until_up("redis", cache.ping)
        return cache

    def unreachable() -> Cache:
        if kind == "memory":
            down = MemoryCache()
            down.set_down(True)
            return down
        return RedisCache(f"redis://127.0.0.1:{closed_port()}/0", socket_timeout_s=1.0)

    kit = CacheKit(kind, make, unreachable, unique("test:cache"))
    yield kit
    if kind != "memory":
        # Leave nothing behind in the shared Redis (one key at a time: a cluster's keys here
        # are in many slots).
        client = redis_client(url)
        async for key in client.scan_iter(match=f"*{kit.prefix}*"):
            await client.delete(key)
        await client.aclose()
    for cache in kit.created:
        await cache.stop()


# --- DocumentStore ---------------------------------------------------------------------------


@pytest.fixture(params=[REAL, MEMORY])
async def store_kit(request: pytest.FixtureRequest) -> AsyncIterator[StoreKit]:
    kind: str = request.param
    services = _real_services(request) if kind == "real" else service_addresses(load_config())
    server = MemoryDocumentStore()
    db = unique("test_bus").replace("-", "_")

    async def make() -> DocumentStore:
        store: DocumentStore = (server.client() if kind == "memory"
                                else MongoDocumentStore(services.mongo_url, db))
        kit.created.append(store)
        await store.start()
        if kind == "real":
            await _wait_until_up("mongo", store.ping)
        return store

    def unreachable() -> DocumentStore:
        if kind == "memory":
            down = MemoryDocumentStore()
            down.set_down(True)
            return down
        return MongoDocumentStore(f"mongodb://127.0.0.1:{closed_port()}/?directConnection=true",
                                  "unreachable", server_selection_timeout_ms=500)

    kit = StoreKit(kind, make, unreachable)
    yield kit
    for store in kit.created:
        if isinstance(store, MongoDocumentStore):
            await store.drop_database()
            break
    for store in kit.created:
        await store.stop()
