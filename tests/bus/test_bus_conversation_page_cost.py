"""What a page of a user's conversations costs Redis (issue 21): one round trip, and a number of
commands that grows with the page, not with the user's 3,000 conversations; on one Redis and
on a Redis Cluster (where the user's keys share its shard's slot)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

import pytest
from bus_helpers import unique
from redis_cluster_fixture import CLUSTER, cluster_url
from redis_cost import redis_cost

from bus.backends import conversation_index
from bus.conversations import ConversationOp, MessageOp, ReadOp
from bus.conversations_redis import RedisConversations
from bus.inbox_redis import RedisInboxCache, session_slots
from bus.redis import redis_client, redis_target
from peernet.config import load_config

REAL = pytest.param("real", marks=pytest.mark.stack)

CONVERSATIONS = 3_000
PAGE = 20


@pytest.fixture(params=[REAL, CLUSTER])
async def filled(request: pytest.FixtureRequest) -> AsyncIterator[tuple[RedisConversations, str,
                                                                         str, str]]:
    url = (cluster_url(request) if request.param == "cluster"
           else request.getfixturevalue("services").redis_url)
    tag = unique("pc").replace("-", "_")[-12:]
    reader = f"r_{tag}"
    inbox = RedisInboxCache(redis_client(url), retention_items=100, retention_ms=10**9,
                            slots=session_slots(2))
    index = conversation_index(load_config({"PEERNET_REDIS_URL": url}), inbox)
    ops: list[ConversationOp] = []
    for i in range(CONVERSATIONS):
        peer = f"p{i}_{tag}"
        lo, hi = sorted([reader, peer])
        conv = f"dm:{lo}:{hi}"
        for pos in (0, 1):
            ops.append(MessageOp(conv, pos, {"id": f"m{i}_{pos}", "conv": conv, "from": peer,
                                             "to": reader, "body": "x" * 40, "ts": 10_000 + i},
                                 (reader, peer)))
        if i % 3 == 0:
            ops.append(ReadOp(conv, 0, f"m{i}_0", reader, 20_000 + i, (reader, peer)))
    for start in range(0, len(ops), 2_000):
        await index.apply(ops[start:start + 2_000])
    try:
        yield index, url, reader, tag
    finally:
        r = redis_client(url)
        try:
            keys = [k async for k in r.scan_iter(match=f"inbox:*{tag}*", count=5000)]
            for key in keys:  # one at a time: a cluster refuses a multi-key DEL across nodes
                await r.delete(key)
        finally:
            await r.aclose()


async def test_a_page_of_20_of_3000_conversations_is_one_round_trip(
        filled: tuple[RedisConversations, str, str, str]) -> None:
    index, url, reader, tag = filled
    nodes = redis_target(url).node_urls
    first = await index.page(reader, PAGE, None)  # connects (and finds the cluster's slots)
    assert len(first.items) == PAGE and first.next is not None
    assert [c.ts for c in first.items] == list(range(10_000 + CONVERSATIONS - 1,
                                                     10_000 + CONVERSATIONS - 1 - PAGE, -1))
    assert {c.unread for c in first.items} == {1, 2}
    for before in (None, first.next):
        page, cost = await redis_cost(partial(index.page, reader, PAGE, before), nodes, tag)
        assert page == (first if before is None else await index.page(reader, PAGE, before))
        assert cost.round_trips == 1, cost
        # The cursor's ties, the range, and per conversation its last message, unread count
        # and markers: none of it grows with the 3,000.
        assert len(cost.commands) <= 3 + 4 * PAGE, cost.by_name()
        print(f"page before={before}: {cost.round_trips} round trip, "
              f"{len(cost.commands)} Redis commands {cost.by_name()}")


async def test_read_finds_a_message_and_the_marker_in_one_round_trip(
        filled: tuple[RedisConversations, str, str, str]) -> None:
    index, url, reader, tag = filled
    lo, hi = sorted([reader, f"p3_{tag}"])
    conv = f"dm:{lo}:{hi}"
    await index.locate(reader, conv, "m3_1")
    located, cost = await redis_cost(partial(index.locate, reader, conv, "m3_1"),
                                     redis_target(url).node_urls, tag)
    assert (located.pos, located.marker) == (1, 0)
    assert cost.round_trips == 1 and cost.commands == ["zscore", "hget"], cost
