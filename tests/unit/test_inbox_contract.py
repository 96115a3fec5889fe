"""The InboxCache contract (bus/inbox.py), run against RedisInboxCache on the running Redis
(marked `stack`) and MemoryInboxCache, so that the double the unit suite relies on behaves as
the real cache does."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from redis_cluster_fixture import CLUSTER, cluster_url
from unit_helpers import inbox_item, unique_user

from bus.inbox import Bounds, InboxCache
from bus.inbox_memory import MemoryInboxCache
from peernet.config import load_config
from peernet.errors import ErrorCode, PeerNetError
from peernet.ids import now_ms
from peernet.routing import session_group, shard_for

REAL = pytest.param("real", marks=pytest.mark.stack)
MEMORY = "memory"

RETENTION_ITEMS = 3
RETENTION_MS = 60_000
OLD = 1_000  # a ts far older than the retention


@dataclass
class InboxKit:
    kind: str
    cache: InboxCache
    # Lose everything this test stored, as a Redis restart without persistence would.
    wipe: Callable[[], Any]
    # Another cache on the same data whose backend is unreachable or down.
    down: Callable[[], Any]
    users: list[str] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)

    def user(self) -> str:
        name = unique_user("inbox")
        self.users.append(name)
        return name

    def checkpoint_name(self) -> str:
        name = unique_user("ckpt")
        self.checkpoints.append(name)
        return name


@pytest.fixture(params=[REAL, CLUSTER, MEMORY])
async def inbox_kit(request: pytest.FixtureRequest) -> AsyncIterator[InboxKit]:
    kind: str = request.param
    if kind == "memory":
        memory = MemoryInboxCache(retention_items=RETENTION_ITEMS, retention_ms=RETENTION_MS)

        def memory_down() -> InboxCache:
            down = memory.client()
            down.set_down(True)
            return down

        kit = InboxKit(kind, memory, memory.wipe, memory_down)
        yield kit
        memory.set_down(False)
        return

    from bus.inbox_redis import RedisInboxCache
    from bus.redis import redis_client

    url = cluster_url(request) if kind == "cluster" else load_config().services.redis_url
    client = redis_client(url)
    cache = RedisInboxCache(client, retention_items=RETENTION_ITEMS, retention_ms=RETENTION_MS)
    real_kit: InboxKit

    async def forget() -> None:
        # One slot (the cache's default grouping): one DEL, on a Redis Cluster too.
        keys = [cache.user_key(u) for u in real_kit.users]
        keys += [cache.checkpoint_keys(c)[1] for c in real_kit.checkpoints]
        if keys:
            await client.delete(*keys)
        if real_kit.users:
            await client.hdel("inbox:acked", *real_kit.users)

    def unreachable() -> InboxCache:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return RedisInboxCache(redis_client(f"redis://127.0.0.1:{port}/0", connect_timeout_s=1.0),
                               retention_items=RETENTION_ITEMS, retention_ms=RETENTION_MS)

    real_kit = InboxKit(kind, cache, forget, unreachable)
    yield real_kit
    await forget()
    await client.aclose()


async def wipe(kit: InboxKit) -> None:
    result = kit.wipe()
    if result is not None:
        await result


async def test_append_then_read_bounds_and_recent(inbox_kit: InboxKit) -> None:
    cache, user = inbox_kit.cache, inbox_kit.user()
    assert await cache.bounds(user) == Bounds(0, 0)
    assert await cache.read(user, 0, 10) == []
    assert await cache.recent(user, 10) == []
    items = [inbox_item(s) for s in (1, 2)]
    await cache.append([(user, i) for i in items], checkpoint_name=inbox_kit.checkpoint_name(),
                       checkpoint={0: 1})
    assert await cache.read(user, 0, 10) == items
    assert await cache.bounds(user) == Bounds(1, 2)
    assert await cache.recent(user, 1) == items[1:]
    assert await cache.recent(user, 10) == items


async def test_items_round_trip_like_a_wire(inbox_kit: InboxKit) -> None:
    cache, user = inbox_kit.cache, inbox_kit.user()
    item = inbox_item(1, body="héllo ✓ 🙂", extra={"nested": [1, "two", None, True]},
                      pair=(1, 2), raw=b"\x00\xff")
    await cache.append([(user, item)], checkpoint_name=inbox_kit.checkpoint_name(), checkpoint={})
    (got,) = await cache.read(user, 0, 10)
    assert got == {**item, "pair": [1, 2]}  # msgpack has no tuples
    assert got is not item
    item["body"] = "changed after append"
    assert (await cache.read(user, 0, 10))[0]["body"] == "héllo ✓ 🙂"


async def test_read_pages_by_seq_after_and_limit(inbox_kit: InboxKit) -> None:
    cache, user = inbox_kit.cache, inbox_kit.user()
    items = [inbox_item(s) for s in (1, 2, 3, 4, 5)]
    # Appended out of order: reads are by seq all the same.
    await cache.append([(user, items[i]) for i in (3, 0, 4, 2, 1)],
                       checkpoint_name=inbox_kit.checkpoint_name(), checkpoint={})
    assert await cache.read(user, 2, 2) == items[2:4]
    assert await cache.read(user, 4, 10) == items[4:]
    assert await cache.read(user, 5, 10) == []
    assert await cache.read(user, 0, 0) == []
    assert [i["seq"] for i in await cache.recent(user, 3)] == [3, 4, 5]


async def test_same_user_and_seq_replaces_itself(inbox_kit: InboxKit) -> None:
    cache, user = inbox_kit.cache, inbox_kit.user()
    name = inbox_kit.checkpoint_name()
    first, second = inbox_item(1, body="first"), inbox_item(2)
    await cache.append([(user, first), (user, second)], checkpoint_name=name, checkpoint={0: 2})
    # A replay of seq 1 (even with other content) and a repeat inside one batch: one item each.
    again = {**first, "body": "replayed"}
    await cache.append([(user, again), (user, second), (user, second)], checkpoint_name=name,
                       checkpoint={0: 2})
    assert await cache.read(user, 0, 10) == [again, second]
    assert await cache.bounds(user) == Bounds(1, 2)


async def test_users_are_separate(inbox_kit: InboxKit) -> None:
    cache = inbox_kit.cache
    alice, bob = inbox_kit.user(), inbox_kit.user()
    a, b = inbox_item(1, body="for alice"), inbox_item(1, body="for bob")
    await cache.append([(alice, a), (bob, b)], checkpoint_name=inbox_kit.checkpoint_name(),
                       checkpoint={})
    assert await cache.read(alice, 0, 10) == [a]
    assert await cache.read(bob, 0, 10) == [b]


async def test_checkpoint_is_stored_with_the_append_and_merged_per_partition(
        inbox_kit: InboxKit) -> None:
    cache, user = inbox_kit.cache, inbox_kit.user()
    name = inbox_kit.checkpoint_name()
    assert await cache.checkpoint(name) is None
    await cache.append([(user, inbox_item(1))], checkpoint_name=name, checkpoint={0: 5, 3: 7})
    assert await cache.checkpoint(name) == {0: 5, 3: 7}
    await cache.append([(user, inbox_item(2))], checkpoint_name=name, checkpoint={0: 9})
    assert await cache.checkpoint(name) == {0: 9, 3: 7}
    # No items: the checkpoint alone; no checkpoint: the items alone.
    await cache.append([], checkpoint_name=name, checkpoint={1: 4})
    assert await cache.checkpoint(name) == {0: 9, 1: 4, 3: 7}
    await cache.append([(user, inbox_item(3))], checkpoint_name=name, checkpoint={})
    assert await cache.checkpoint(name) == {0: 9, 1: 4, 3: 7}
    assert await cache.bounds(user) == Bounds(1, 3)
    assert await cache.checkpoint(inbox_kit.checkpoint_name()) is None


async def test_a_refused_append_stores_neither_items_nor_checkpoint(inbox_kit: InboxKit) -> None:
    cache, user = inbox_kit.cache, inbox_kit.user()
    name = inbox_kit.checkpoint_name()
    unpackable = inbox_item(2, body=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await cache.append([(user, inbox_item(1)), (user, unpackable)], checkpoint_name=name,
                           checkpoint={0: 2})
    assert await cache.bounds(user) == Bounds(0, 0)
    assert await cache.checkpoint(name) is None


async def test_retention_trims_old_items_beyond_the_newest_count(inbox_kit: InboxKit) -> None:
    cache, user = inbox_kit.cache, inbox_kit.user()
    name = inbox_kit.checkpoint_name()
    await cache.append([(user, inbox_item(s, ts=OLD)) for s in range(1, 6)], checkpoint_name=name,
                       checkpoint={})
    assert [i["seq"] for i in await cache.read(user, 0, 10)] == [3, 4, 5]
    assert await cache.bounds(user) == Bounds(3, 5)
    # The next append trims again, to the newest RETENTION_ITEMS.
    await cache.append([(user, inbox_item(6, ts=OLD))], checkpoint_name=name, checkpoint={})
    assert await cache.bounds(user) == Bounds(4, 6)


async def test_retention_keeps_young_items_however_many(inbox_kit: InboxKit) -> None:
    cache, user = inbox_kit.cache, inbox_kit.user()
    await cache.append([(user, inbox_item(s)) for s in range(1, 8)],
                       checkpoint_name=inbox_kit.checkpoint_name(), checkpoint={})
    assert await cache.bounds(user) == Bounds(1, 7)


async def test_retention_stops_at_the_first_young_item(inbox_kit: InboxKit) -> None:
    cache, user = inbox_kit.cache, inbox_kit.user()
    now = now_ms()
    ts = {1: OLD, 2: OLD, 3: now, 4: OLD, 5: OLD, 6: OLD, 7: OLD}
    await cache.append([(user, inbox_item(s, ts=t)) for s, t in ts.items()],
                       checkpoint_name=inbox_kit.checkpoint_name(), checkpoint={})
    # 4 items over the retention count, but only the two before the young seq 3 go.
    assert [i["seq"] for i in await cache.read(user, 0, 10)] == [3, 4, 5, 6, 7]


async def test_retention_trims_an_excess_larger_than_one_read_of_the_oldest(
        inbox_kit: InboxKit) -> None:
    """The Redis script reads the oldest items a few at a time: an excess of many chunks goes in
    one append, and it still stops at the first young item past the first chunk."""
    cache, user = inbox_kit.cache, inbox_kit.user()
    name = inbox_kit.checkpoint_name()
    await cache.append([(user, inbox_item(s, ts=OLD)) for s in range(1, 41)], checkpoint_name=name,
                       checkpoint={})
    assert await cache.bounds(user) == Bounds(38, 40)
    other = inbox_kit.user()
    ts = {s: (now_ms() if s == 21 else OLD) for s in range(1, 41)}
    await cache.append([(other, inbox_item(s, ts=t)) for s, t in ts.items()], checkpoint_name=name,
                       checkpoint={})
    assert await cache.bounds(other) == Bounds(21, 40)


async def test_retention_applies_to_the_users_appended_to(inbox_kit: InboxKit) -> None:
    cache = inbox_kit.cache
    alice, bob = inbox_kit.user(), inbox_kit.user()
    name = inbox_kit.checkpoint_name()
    # Within one append the trim runs after all items are in, per user.
    await cache.append([(alice, inbox_item(s, ts=OLD)) for s in range(1, 5)]
                       + [(bob, inbox_item(s, ts=OLD)) for s in range(1, 3)],
                       checkpoint_name=name, checkpoint={})
    assert await cache.bounds(alice) == Bounds(2, 4)
    assert await cache.bounds(bob) == Bounds(1, 2)


async def test_ack_is_cumulative_and_never_moves_back(inbox_kit: InboxKit) -> None:
    cache = inbox_kit.cache
    user, other, third = inbox_kit.user(), inbox_kit.user(), inbox_kit.user()
    assert await cache.acked(user) == 0
    assert await cache.ack_many({user: 5}) == {user: 5}
    assert await cache.ack_many({user: 3}) == {user: 5}
    assert await cache.acked(user) == 5
    assert await cache.ack_many({}) == {}
    # Several users in one write, each on its own: one moves on, one stays, one starts.
    assert await cache.ack_many({user: 8, other: 2, third: 0}) == {user: 8, other: 2, third: 0}
    assert await cache.ack_many({user: 7, other: 4}) == {user: 8, other: 4}
    assert (await cache.acked(user), await cache.acked(other), await cache.acked(third)) == (8, 4, 0)


async def test_a_wiped_cache_has_no_checkpoint_items_or_acks(inbox_kit: InboxKit) -> None:
    cache, user = inbox_kit.cache, inbox_kit.user()
    name = inbox_kit.checkpoint_name()
    await cache.append([(user, inbox_item(1))], checkpoint_name=name, checkpoint={0: 1})
    await cache.ack_many({user: 1})
    await wipe(inbox_kit)
    assert await cache.checkpoint(name) is None
    assert await cache.bounds(user) == Bounds(0, 0)
    assert await cache.read(user, 0, 10) == []
    assert await cache.acked(user) == 0


async def test_recent_of_zero_items_is_empty(inbox_kit: InboxKit) -> None:
    cache, user = inbox_kit.cache, inbox_kit.user()
    await cache.append([(user, inbox_item(s)) for s in (1, 2)],
                       checkpoint_name=inbox_kit.checkpoint_name(), checkpoint={})
    assert await cache.recent(user, 0) == []


async def test_an_unreachable_cache_is_unavailable(inbox_kit: InboxKit) -> None:
    cache = inbox_kit.down()
    user = inbox_kit.user()
    calls = [
        lambda: cache.append([(user, inbox_item(1))], checkpoint_name="x", checkpoint={0: 1}),
        lambda: cache.read(user, 0, 10),
        lambda: cache.bounds(user),
        lambda: cache.recent(user, 10),
        lambda: cache.checkpoint("x"),
        lambda: cache.ack_many({user: 1}),
        lambda: cache.acked(user),
    ]
    for call in calls:
        with pytest.raises(PeerNetError) as caught:
            await call()
        assert caught.value.code is ErrorCode.UNAVAILABLE and caught.value.retriable


def _user_of_shard(shard: int, count: int) -> str:
    while True:
        user = unique_user("grouped")
        if shard_for(user, count) == shard:
            return user


@pytest.mark.parametrize("kind", [REAL, CLUSTER])
async def test_session_slots_keep_a_shards_users_and_checkpoints_together(
        request: pytest.FixtureRequest, kind: str) -> None:
    """With the session shards' grouping (what `peernet serve` uses), a shard's append stores its
    users' items and its checkpoints under one hash tag, the shard's; an append naming a user of
    another shard writes nothing and says so (ValueError), since on a Redis Cluster it could not
    be one atomic step."""
    from bus.inbox_redis import RedisInboxCache, session_slots
    from bus.redis import redis_client

    url = cluster_url(request) if kind == "cluster" else load_config().services.redis_url
    client = redis_client(url)
    cache = RedisInboxCache(client, retention_items=RETENTION_ITEMS, retention_ms=RETENTION_MS,
                            slots=session_slots(2))
    mine, theirs = _user_of_shard(0, 2), _user_of_shard(1, 2)
    name = f"{session_group(0, 2)}@{unique_user('topic')}"
    marks = f"{name}#events"
    keys = [cache.user_key(mine), cache.user_key(theirs), *cache.checkpoint_keys(name),
            *cache.checkpoint_keys(marks)]
    try:
        assert cache.user_key(mine).startswith("inbox:{session-0-of-2.")
        assert cache.user_key(theirs).startswith("inbox:{session-1-of-2.")
        item = inbox_item(1)
        assert await cache.append([(mine, item)], checkpoint_name=name, checkpoint={0: 1},
                                  also={marks: {0: 7}}, expect_version=0) == 1
        assert await cache.read(mine, 0, 10) == [item]
        assert await cache.checkpoint(name) == {0: 1}
        assert await cache.checkpoint(marks) == {0: 7}
        assert await cache.version(name) == 1
        with pytest.raises(ValueError, match="another group"):
            await cache.append([(theirs, inbox_item(1))], checkpoint_name=name,
                               checkpoint={0: 2})
        assert await cache.read(theirs, 0, 10) == []
        assert await cache.checkpoint(name) == {0: 1}
        assert await cache.version(name) == 1
    finally:
        for key in keys:
            await client.delete(key)
        await client.aclose()


@pytest.mark.parametrize("count", [1, 2, 3, 5, 16])
def test_spread_tags_put_each_group_in_its_own_share_of_the_slots(count: int) -> None:
    """A cluster's masters own contiguous slot ranges: group i of n gets a tag in the i-th n-th
    of the slot space, so n groups reach every master when n >= the masters."""
    from redis.crc import key_slot

    from bus.inbox_redis import spread_tag

    slots = [key_slot(spread_tag(f"g-{i}-of-{count}", i, count).encode()) for i in range(count)]
    assert [slot * count // 16384 for slot in slots] == list(range(count))
    assert spread_tag("g-0-of-3", 0, 3) == spread_tag("g-0-of-3", 0, 3)  # stable


@pytest.mark.parametrize("kind", [REAL, CLUSTER, MEMORY])
async def test_an_append_publishes_its_pushes_once_stored_and_none_when_it_stored_nothing(
        request: pytest.FixtureRequest, kind: str) -> None:
    """A cache that publishes sends an append's pushes in the same step: a subscriber that gets
    one finds its item in the cache already, and an append refused as behind publishes none."""
    import asyncio

    from bus.inbox import CacheBehind
    from bus.pubsub import PubSub
    from peernet.codec import unpack

    pubsub: PubSub
    cache: InboxCache
    if kind == MEMORY:
        from bus.pubsub_memory import MemoryPubSub

        memory_pubsub = MemoryPubSub()
        pubsub = memory_pubsub
        cache = MemoryInboxCache(retention_items=RETENTION_ITEMS, retention_ms=RETENTION_MS,
                                 pubsub=memory_pubsub)
        assert not MemoryInboxCache(retention_items=1, retention_ms=1).publishes
    else:
        from bus.inbox_redis import RedisInboxCache
        from bus.pubsub_redis import RedisPubSub
        from bus.redis import redis_client

        url = cluster_url(request) if kind == "cluster" else load_config().services.redis_url
        pubsub = RedisPubSub(url)
        cache = RedisInboxCache(redis_client(url), retention_items=RETENTION_ITEMS,
                                retention_ms=RETENTION_MS)
    await pubsub.start()
    user, name = unique_user("pub"), unique_user("ckpt")
    channel = f"test-push:{user}"
    got: list[tuple[dict[str, Any], list[Any]]] = []
    seen = asyncio.Event()

    def on_push(_channel: str, data: bytes) -> None:
        got.append((unpack(data), []))
        seen.set()

    try:
        assert cache.publishes
        await pubsub.subscribe(channel, on_push)
        item = inbox_item(1)
        version = await cache.append([(user, item)], checkpoint_name=name, checkpoint={0: 1},
                                     expect_version=0, publish=[channel])
        await asyncio.wait_for(seen.wait(), 5)
        assert [g for g, _ in got] == [item]
        assert await cache.read(user, 0, 10) == [item]
        with pytest.raises(CacheBehind):
            await cache.append([(user, inbox_item(2))], checkpoint_name=name, checkpoint={0: 2},
                               expect_version=version + 5, publish=[channel])
        with pytest.raises(ValueError):  # a channel for each item, or none
            await cache.append([(user, inbox_item(2)), (user, inbox_item(3))], checkpoint_name=name,
                               checkpoint={0: 2}, expect_version=version, publish=[channel])
        await asyncio.sleep(0.3)
        assert len(got) == 1 and await cache.bounds(user) == Bounds(1, 1)
    finally:
        await pubsub.stop()
        if kind != MEMORY:
            assert isinstance(cache, RedisInboxCache)
            await cache._r.delete(cache.user_key(user), *cache.checkpoint_keys(name))
