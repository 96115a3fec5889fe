"""Contract suite of the GroupStore seam (bus/groups.py), run against Redis, a Redis Cluster (in
a keyspace of its own, deleted afterwards) and the in-memory double."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from bus_helpers import closed_port, unique
from redis_cluster_fixture import CLUSTER, cluster_url

from bus.groups import Group
from bus.groups_memory import MemoryGroupStore
from bus.groups_redis import RedisGroupStore
from bus.redis import hash_tag, redis_client
from peernet.errors import ErrorCode, PeerNetError

REAL = pytest.param("real", marks=pytest.mark.stack)


@pytest.fixture(params=[REAL, CLUSTER, "memory"])
async def groups(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    if request.param == "memory":
        yield MemoryGroupStore()
        return
    url = (cluster_url(request) if request.param == "cluster"
           else request.getfixturevalue("services").redis_url)
    keyspace = unique("test-groups")
    store = RedisGroupStore(redis_client(url), keyspace=keyspace)
    yield store
    await store.close()
    r = redis_client(url)
    try:
        keys = [k async for k in r.scan_iter(match=f"{hash_tag(keyspace)}:*", count=1000)]
        for key in keys:  # one at a time: a cluster refuses a multi-key DEL across nodes
            await r.delete(key)
    finally:
        await r.aclose()


def state(version: int, *members: str, conv: str = "g:one") -> Group:
    return Group(conv, "title", members[0] if members else None, members, version)


async def test_a_stored_group_reads_back_and_an_unknown_one_is_none(groups: Any) -> None:
    assert await groups.get_many([]) == []
    assert await groups.get_many(["g:one", "g:two"]) == [None, None]
    await groups.put(state(1, "ann", "bob"))
    assert await groups.get_many(["g:two", "g:one"]) == [None, state(1, "ann", "bob")]


async def test_an_older_state_never_overwrites_a_newer_and_of_equal_ones_the_later_wins(
        groups: Any) -> None:
    await groups.put(state(2, "ann", "bob"))
    await groups.put(state(1, "ann", "bob", "cat"))
    assert await groups.get_many(["g:one"]) == [state(2, "ann", "bob")]
    await groups.put(state(2, "ann", "dan"))
    assert await groups.get_many(["g:one"]) == [state(2, "ann", "dan")]
    await groups.put_many([state(3, "ann"), state(1, "bob"), state(4)])
    assert await groups.get_many(["g:one"]) == [state(4)]


async def test_the_lock_is_held_by_one_token_and_freed_only_by_it(groups: Any) -> None:
    assert await groups.lock("g:one", "t1", 60_000)
    assert not await groups.lock("g:one", "t2", 60_000)
    assert await groups.lock("g:two", "t2", 60_000)  # another group's lock is another lock
    await groups.unlock("g:one", "t2")
    await groups.put(state(1, "ann"), unlock="t2")
    assert not await groups.lock("g:one", "t3", 60_000)
    await groups.put(state(2, "ann"), unlock="t1")  # stored and freed in one write
    assert await groups.get_many(["g:one"]) == [state(2, "ann")]
    assert await groups.lock("g:one", "t3", 60_000)
    await groups.unlock("g:one", "t3")
    assert await groups.lock("g:one", "t4", 60_000)


async def test_a_lock_whose_holder_died_expires(groups: Any) -> None:
    if isinstance(groups, MemoryGroupStore):
        pytest.skip("the in-memory locks never expire")
    assert await groups.lock("g:one", "dead", 200)
    await asyncio.sleep(0.4)
    assert await groups.lock("g:one", "alive", 60_000)


async def test_an_unreachable_redis_is_unavailable() -> None:
    store = RedisGroupStore(redis_client(f"redis://127.0.0.1:{closed_port()}/0",
                                         connect_timeout_s=0.5), keyspace="x")
    try:
        for call in (store.get_many(["g:one"]), store.lock("g:one", "t", 100),
                     store.put(state(1, "ann"))):
            with pytest.raises(PeerNetError) as exc:
                await call
            assert exc.value.code is ErrorCode.UNAVAILABLE
    finally:
        await store.close()
