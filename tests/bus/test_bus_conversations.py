"""Contract suite of the ConversationIndex seam (bus/conversations.py), run against Redis, a
Redis Cluster (users spread over two slot groups, as two session shards spread them) and the
in-memory double, with the writes of the inbox append (the session shard's path) and of
`apply` (replay's)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from bus_helpers import unique
from redis_cluster_fixture import CLUSTER, cluster_url

from bus.conversations import (
    ChangeOp,
    ConversationIndex,
    ConversationOp,
    Cursor,
    MessageOp,
    ReadOp,
)
from bus.conversations_memory import MemoryConversations
from bus.inbox import InboxCache
from bus.inbox_memory import MemoryInboxCache
from bus.pubsub import PubSub
from bus.pubsub_memory import MemoryPubSub
from peernet.codec import pack, unpack
from peernet.wire import user_channel

REAL = pytest.param("real", marks=pytest.mark.stack)


@dataclass
class Kit:
    index: ConversationIndex
    inbox: InboxCache
    pubsub: PubSub
    tag: str
    # The checkpoint name of the group holding `user` (appends name users of one group only).
    group_of: Any

    def user(self, name: str) -> str:
        return f"{name}_{self.tag}"[:32]


@pytest.fixture(params=[REAL, CLUSTER, "memory"])
async def kit(request: pytest.FixtureRequest) -> AsyncIterator[Kit]:
    tag = unique("c").replace("-", "_").lower()[-12:]
    if request.param == "memory":
        pubsub = MemoryPubSub()
        await pubsub.start()
        inbox = MemoryInboxCache(retention_items=100, retention_ms=10**9, pubsub=pubsub,
                                 conversation_keep=KEEP)
        yield Kit(inbox.conversations(), inbox, pubsub, tag, lambda _u: "session-0-of-1@t")
        await pubsub.stop()
        return
    from bus.backends import conversation_index
    from bus.inbox_redis import RedisInboxCache, session_slots
    from bus.pubsub_redis import RedisPubSub
    from bus.redis import redis_client
    from peernet.config import load_config
    from peernet.routing import session_group, shard_for

    url = (cluster_url(request) if request.param == "cluster"
           else request.getfixturevalue("services").redis_url)
    shards = 2 if request.param == "cluster" else 1
    inbox = RedisInboxCache(redis_client(url), retention_items=100, retention_ms=10**9,
                            slots=session_slots(shards), conversation_keep=KEEP)
    cfg = load_config({"PEERNET_REDIS_URL": url,
                       "PEERNET_CONVERSATION_INDEX_KEEP": str(KEEP)})
    pubsub = RedisPubSub(url)
    await pubsub.start()
    yield Kit(conversation_index(cfg, inbox), inbox, pubsub, tag,
              lambda u: f"{session_group(shard_for(u, shards), shards)}@t-{tag}")
    await pubsub.stop()
    r = redis_client(url)
    try:
        keys = [k async for k in r.scan_iter(match=f"inbox:*{tag}*", count=1000)]
        for key in keys:  # one at a time: a cluster refuses a multi-key DEL across nodes
            await r.delete(key)
    finally:
        await r.aclose()


KEEP = 5


def msg(conv: str, n: int, sender: str, ts: int, to: str | None = None) -> dict[str, Any]:
    m: dict[str, Any] = {"id": f"m{n:03d}", "conv": conv, "from": sender, "body": f"b{n}",
                         "ts": ts}
    if to is not None:
        m["to"] = to
    return m


def pair(kit: Kit) -> tuple[str, str, str]:
    a, b = sorted([kit.user("ann"), kit.user("bob")])
    return a, b, f"dm:{a}:{b}"


async def test_messages_order_the_list_and_count_unread_for_others_only(kit: Kit) -> None:
    a, b, conv = pair(kit)
    g = f"g:{kit.tag}"
    state = {"conv": g, "title": "t", "owner": a, "members": [a, b], "version": 1}
    await kit.index.apply([
        ChangeOp(g, 100, state, (a, b)),
        MessageOp(conv, 1, msg(conv, 1, a, 200, b), (a, b)),
        MessageOp(conv, 2, msg(conv, 2, a, 300, b), (a, b)),
        MessageOp(g, 7, msg(g, 3, b, 250), (a, b)),
    ])
    page = await kit.index.page(b, 10, None)
    assert [c.conv for c in page.items] == [conv, g] and page.next is None
    dm, group = page.items
    assert dm.last == msg(conv, 2, a, 300, b) and dm.unread == 2 and dm.group is None
    assert group.last == msg(g, 3, b, 250) and group.unread == 0 and group.group == state
    assert [c.unread for c in (await kit.index.page(a, 10, None)).items] == [0, 1]


async def test_a_marker_moves_forward_only_and_unread_is_exact_in_any_order(kit: Kit) -> None:
    a, b, conv = pair(kit)
    await kit.index.apply([MessageOp(conv, p, msg(conv, p, a, 100 + p, b), (a, b))
                           for p in (1, 2, 3)])
    await kit.index.apply([ReadOp(conv, 2, "m002", b, 500, (a, b))])
    (entry,) = (await kit.index.page(b, 10, None)).items
    assert entry.unread == 1 and entry.read == {b: "m002"}
    # An older read changes nothing; a message at or before the marker, applied late (a replay
    # beside the shards), is not unread.
    await kit.index.apply([ReadOp(conv, 1, "m001", b, 600, (a, b)),
                           MessageOp(conv, 2, msg(conv, 2, a, 102, b), (a, b)),
                           MessageOp(conv, 4, msg(conv, 4, a, 104, b), (a, b))])
    (entry,) = (await kit.index.page(b, 10, None)).items
    assert entry.unread == 2 and entry.read == {b: "m002"}
    assert entry.last is not None and entry.last["id"] == "m004"
    await kit.index.apply([ReadOp(conv, 4, "m004", b, 700, (a, b))])
    (entry,) = (await kit.index.page(b, 10, None)).items
    assert entry.unread == 0 and entry.read == {b: "m004"}
    # Both sides' pages carry every marker, whichever slot group holds them.
    await kit.index.apply([ReadOp(conv, 3, "m003", a, 800, (a, b))])
    for user in (a, b):
        (entry,) = (await kit.index.page(user, 10, None)).items
        assert entry.read == {a: "m003", b: "m004"}


async def test_a_second_record_of_a_message_changes_nothing(kit: Kit) -> None:
    a, b, conv = pair(kit)
    first = msg(conv, 1, a, 100, b)
    await kit.index.apply([MessageOp(conv, 1, first, (a, b)), MessageOp(conv, 2, first, (a, b))])
    (entry,) = (await kit.index.page(b, 10, None)).items
    assert entry.unread == 1
    assert (await kit.index.locate(b, conv, "m001")).pos == 1


async def test_locate_finds_the_newest_ids_and_the_readers_marker(kit: Kit) -> None:
    a, b, conv = pair(kit)
    located = await kit.index.locate(b, conv, "m001")
    assert located.pos is None and located.marker == -1
    count = KEEP + 40
    await kit.index.apply([MessageOp(conv, p, msg(conv, p, a, 100 + p, b), (a, b))
                           for p in range(0, count)])
    await kit.index.apply([ReadOp(conv, 0, "m000", b, 900, (a, b))])
    assert (await kit.index.locate(b, conv, "m000")).marker == 0
    for p in range(count - KEEP, count):  # at least the newest `keep`
        assert (await kit.index.locate(b, conv, f"m{p:03d}")).pos == p
    # The oldest, well beyond `keep`, are forgotten (history finds them).
    assert (await kit.index.locate(b, conv, "m000")).pos is None
    assert (await kit.index.locate(b, conv, "nope")).pos is None


async def test_a_change_stores_the_newest_state_and_takes_the_conversation_from_the_removed(
        kit: Kit) -> None:
    a, b = kit.user("ann"), kit.user("bob")
    g = f"g:{kit.tag}"

    def state(version: int, *members: str) -> dict[str, Any]:
        return {"conv": g, "title": f"v{version}", "owner": a, "members": list(members),
                "version": version}

    await kit.index.apply([ChangeOp(g, 100, state(1, a, b), (a, b)),
                           MessageOp(g, 5, msg(g, 1, a, 150), (a, b)),
                           ChangeOp(g, 200, state(2, a), (a,), (b,)),
                           ChangeOp(g, 90, state(1, a, b), (a,))])  # an old one, replayed late
    (entry,) = (await kit.index.page(a, 10, None)).items
    assert entry.group == state(2, a) and entry.ts == 200
    assert (await kit.index.page(b, 10, None)).items == []


async def test_pages_go_by_activity_then_id_and_end_with_no_next(kit: Kit) -> None:
    u = kit.user("ann")
    peers = [kit.user(f"p{i}") for i in range(7)]
    ops: list[ConversationOp] = []
    for i, peer in enumerate(peers):
        lo, hi = sorted([u, peer])
        conv = f"dm:{lo}:{hi}"
        # Pairs of equal activity: the page cursor must split ties by conversation id.
        ops.append(MessageOp(conv, 1, msg(conv, i, peer, 1000 + i // 2, u), (u, peer)))
    await kit.index.apply(ops)
    expected = sorted(((1000 + i // 2, op.conv) for i, op in enumerate(ops)), reverse=True)
    seen: list[tuple[int, str]] = []
    cursor: Cursor | None = None
    for _ in range(10):
        page = await kit.index.page(u, 3, cursor)
        seen.extend((c.ts, c.conv) for c in page.items)
        cursor = page.next
        if cursor is None:
            break
        assert Cursor.decode(cursor.encode()) == cursor
    assert seen == expected


async def test_the_inbox_append_writes_conversations_with_its_items_and_publishes_receipts(
        kit: Kit) -> None:
    a, b, conv = pair(kit)
    got: list[dict[str, Any]] = []
    sub = await kit.pubsub.subscribe(user_channel(b), lambda _c, p: got.append(unpack(p)))
    receipt = pack({"t": "read", "conv": conv, "user": b, "id": "m001", "ts": 5})
    item = {"t": "msg", "seq": 1, "id": "m001", "conv": conv, "from": a, "to": b, "body": "x",
            "ts": 100}
    try:
        await kit.inbox.append([(b, item)], checkpoint_name=kit.group_of(b), checkpoint={},
                               conversations=[MessageOp(conv, 1, msg(conv, 1, a, 100, b), (b,))])
        (entry,) = (await kit.index.page(b, 10, None)).items
        assert entry.unread == 1
        read = ReadOp(conv, 1, "m001", b, 5, (b,), (b,), receipt)
        for _ in range(2):  # the second moves nothing and tells no one
            await kit.inbox.append([], checkpoint_name=kit.group_of(b), checkpoint={},
                                   conversations=[read])
        for _ in range(50):
            if got:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        assert got == [{"t": "read", "conv": conv, "user": b, "id": "m001", "ts": 5}]
        (entry,) = (await kit.index.page(b, 10, None)).items
        assert entry.unread == 0 and entry.read == {b: "m001"}
    finally:
        await sub.unsubscribe()


async def test_a_lost_cache_loses_the_index_with_it() -> None:
    inbox = MemoryInboxCache(retention_items=10, retention_ms=10**9)
    index: MemoryConversations = inbox.conversations()
    await index.apply([MessageOp("dm:a:b", 1, msg("dm:a:b", 1, "a", 1, "b"), ("a", "b"))])
    assert (await index.page("b", 5, None)).items
    inbox.wipe()
    assert (await index.page("b", 5, None)).items == []
