"""The PresenceStore contract, run against Redis and the in-memory store."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from bus_helpers import Services, closed_port, eventually_equal, service_addresses, unique
from redis_cluster_fixture import CLUSTER, cluster_url

from bus.presence import NEVER_SEEN, OFFLINE, ONLINE, Change, PresenceState, PresenceStore
from bus.presence_memory import MemoryPresenceStore
from bus.presence_redis import RedisPresenceStore
from bus.redis import hash_tag, redis_client
from peernet.config import load_config
from peernet.errors import ErrorCode, PeerNetError

REAL = pytest.param("real", marks=pytest.mark.stack)
# Long enough that the calls made right after a renewal find the lease live (five calls on a
# loaded machine could outlast 300 ms); its lapse is then waited for, so that a lease that
# never lapses fails the test.
LEASE_MS = 1500
EXPIRED_WITHIN_S = 10.0


@dataclass
class PresenceKit:
    kind: str
    make: Callable[..., PresenceStore]
    unreachable: Callable[[], PresenceStore]
    keyspace: str
    clients: list[object] = field(default_factory=list)


@pytest.fixture(params=[REAL, CLUSTER, "memory"])
async def kit(request: pytest.FixtureRequest) -> AsyncIterator[PresenceKit]:
    kind: str = request.param
    services: Services = (request.getfixturevalue("services") if kind == "real"
                          else service_addresses(load_config()))
    url = cluster_url(request) if kind == "cluster" else services.redis_url
    keyspace = unique("test:presence")
    server = MemoryPresenceStore()

    def make(last_seen_ttl_s: int = 3600) -> PresenceStore:
        if kind == "memory":
            return MemoryPresenceStore(last_seen_ttl_s=last_seen_ttl_s, _server=server._server)
        client = redis_client(url)
        k.clients.append(client)
        return RedisPresenceStore(client, keyspace=keyspace, last_seen_ttl_s=last_seen_ttl_s)

    def unreachable() -> PresenceStore:
        if kind == "memory":
            down = MemoryPresenceStore()
            down.set_down(True)
            return down
        client = redis_client(f"redis://127.0.0.1:{closed_port()}/0", socket_timeout_s=1.0,
                              connect_timeout_s=1.0)
        k.clients.append(client)
        return RedisPresenceStore(client, keyspace=keyspace, last_seen_ttl_s=60)

    k = PresenceKit(kind, make, unreachable, keyspace)
    yield k
    if kind != "memory":
        client = redis_client(url)
        keys = [key async for key in client.scan_iter(match=f"{hash_tag(keyspace)}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    for c in k.clients:
        await c.aclose()  # type: ignore[attr-defined]


async def test_a_lease_is_live_until_its_ttl_or_its_release(kit: PresenceKit) -> None:
    store, other = kit.make(), kit.make()
    assert await store.renew_lease("r1", LEASE_MS) is False  # never existed
    assert await store.renew_lease("r1", LEASE_MS) is True
    await store.renew_lease("r2", LEASE_MS)
    assert await other.live(["r1", "r2", "r3"]) == {"r1", "r2"}
    await store.release_lease("r2")
    assert await other.live(["r1", "r2"]) == {"r1"}
    await eventually_equal(lambda: other.live(["r1"]), set(), EXPIRED_WITHIN_S)
    assert await store.renew_lease("r1", LEASE_MS) is False  # lapsed
    assert await other.live([]) == set()


async def test_statuses_are_written_with_the_replicas_users(kit: PresenceKit) -> None:
    store, reader = kit.make(), kit.make()
    assert await reader.read(["a", "b"]) == {"a": NEVER_SEEN, "b": NEVER_SEEN}
    await store.record("0of2", "r1", add=["a", "b"], changes=[Change("a", ONLINE, 10),
                                                             Change("b", ONLINE, 11)])
    await store.record("0of2", "r2", add=["b"])
    await store.record("1of2", "r1", add=["z"], changes=[Change("z", ONLINE, 12)])
    assert await reader.held("0of2") == {"r1": {"a", "b"}, "r2": {"b"}}
    await store.record("0of2", "r1", remove=["a"], changes=[Change("a", OFFLINE, 20)])
    assert await reader.read(["a", "b", "z"]) == {
        "a": PresenceState(OFFLINE, 20), "b": PresenceState(ONLINE, 11),
        "z": PresenceState(ONLINE, 12)}
    await store.record("0of2", "r1", forget=True)
    assert await reader.held("0of2") == {"r2": {"b"}}
    assert await reader.held("1of2") == {"r1": {"z"}}
    assert await reader.held("2of3") == {}
    await store.record("0of2", "r9")  # nothing to record: nothing recorded
    assert await reader.held("0of2") == {"r2": {"b"}}


async def test_an_offline_users_last_seen_expires_an_online_users_never(kit: PresenceKit) -> None:
    store = kit.make(last_seen_ttl_s=1)
    await store.record("0of1", "r1", add=["on"], changes=[Change("on", ONLINE, 5)])
    await store.record("0of1", "r1", changes=[Change("off", OFFLINE, 6)])
    assert (await store.read(["off"]))["off"] == PresenceState(OFFLINE, 6)
    await eventually_equal(lambda: store.read(["off"]), {"off": NEVER_SEEN}, EXPIRED_WITHIN_S)
    assert await store.read(["on", "off"]) == {"on": PresenceState(ONLINE, 5), "off": NEVER_SEEN}


async def test_an_unreachable_store_is_unavailable(kit: PresenceKit) -> None:
    store = kit.unreachable()
    calls = [store.renew_lease("r1", 100), store.release_lease("r1"), store.live(["r1"]),
             store.read(["a"]), store.held("0of1"),
             store.record("0of1", "r1", add=["a"])]
    for call in calls:
        with pytest.raises(PeerNetError) as err:
            await call
        assert err.value.code is ErrorCode.UNAVAILABLE
