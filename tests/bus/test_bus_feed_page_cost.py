"""What a home-feed page of 20 costs Redis (issue 18): at most two round trips, the celebrity
merge, the like counts and the reader's `liked` included, on one Redis and on a Redis Cluster."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

import pytest
from bus_helpers import unique
from feed_page_cost import CELEBRITIES, PAGE, fill
from redis_cluster_fixture import CLUSTER, cluster_url
from redis_cost import redis_cost

from bus.feeds import Cursor, FeedPage, FeedWrites, GraphChange, Post
from bus.feeds_memory import MemoryFeedStore
from bus.feeds_redis import RedisFeedStore
from bus.redis import redis_client, redis_target

REAL = pytest.param("real", marks=pytest.mark.stack)


@pytest.fixture(params=[REAL, CLUSTER])
async def page_store(request: pytest.FixtureRequest) -> AsyncIterator[tuple[RedisFeedStore, str]]:
    url = (cluster_url(request) if request.param == "cluster"
           else request.getfixturevalue("services").redis_url)
    store = RedisFeedStore(redis_client(url), keyspace=unique("test-page-cost"), cap=800)
    await fill(store)
    try:
        yield store, url
    finally:
        await store.clear()
        await store.close()


async def test_a_page_of_20_costs_at_most_two_round_trips(
        page_store: tuple[RedisFeedStore, str]) -> None:
    store, url = page_store
    nodes = redis_target(url).node_urls
    first = await store.page("reader", PAGE, None)  # connects (and finds the cluster's slots)
    assert len(first.items) == PAGE and first.next is not None
    assert {p.author for p in first.items} >= set(CELEBRITIES)
    assert "gone" not in {p.author for p in first.items}
    assert sum(p.likes for p in first.items) > 0
    assert {p.liked for p in first.items} == {True, False}  # the reader's own likes, in the script

    for before in (None, first.next):
        page, cost = await redis_cost(partial(store.page, "reader", PAGE, before), nodes,
                                      store.prefix)
        assert page == (first if before is None else await store.page("reader", PAGE, before))
        assert cost.round_trips <= 2, cost
        # Commands are counted, not bounded here: a script's calls cost Redis CPU, not a trip.
        print(f"page before={before}: {cost.round_trips} round trip(s), "
              f"{len(cost.commands)} Redis commands {cost.by_name()}")


async def test_a_page_after_redis_forgot_its_scripts_costs_two_round_trips(
        page_store: tuple[RedisFeedStore, str]) -> None:
    store, url = page_store
    first = await store.page("reader", PAGE, None)
    admin = redis_client(url)
    try:
        await admin.script_flush()  # what a restarted Redis looks like to a cached script
    finally:
        await admin.aclose()
    page, cost = await redis_cost(partial(store.page, "reader", PAGE, None),
                                  redis_target(url).node_urls, store.prefix)
    assert page == first
    assert cost.round_trips == 2, cost  # EVALSHA answered NOSCRIPT, then EVAL
    assert cost.commands[:2] == ["evalsha", "eval"], cost
    _, again = await redis_cost(partial(store.page, "reader", PAGE, None),
                                redis_target(url).node_urls, store.prefix)
    assert again.round_trips == 1 and again.commands[0] == "evalsha", again


async def pages(store: RedisFeedStore | MemoryFeedStore, user: str, limit: int) -> list[FeedPage]:
    out: list[FeedPage] = []
    cursor: Cursor | None = None
    while not out or cursor is not None:
        out.append(await store.page(user, limit, cursor))
        cursor = out[-1].next
    return out


async def test_pages_are_those_of_the_memory_double(page_store: tuple[RedisFeedStore, str]) -> None:
    # Many entries of an author no longer followed above the reader's own posts: the page reads
    # on past them, as the in-memory store does.
    store, _ = page_store
    memory = MemoryFeedStore(cap=800)
    await fill(memory)
    for s in (store, memory):
        await s.record([GraphChange("reader", "gone2", True)], [],
                       [Post(f"gone2-{k}", "gone2", "x", 5000 + k) for k in range(150)])
        await s.write(FeedWrites(adds=[("reader", f"gone2-{k}", 5000 + k) for k in range(150)]))
        await s.record([GraphChange("reader", "gone2", False)], [], [])
    for limit in (1, 3, 20, 100):
        assert await pages(store, "reader", limit) == await pages(memory, "reader", limit)
    assert len([p for page in await pages(store, "reader", 7) for p in page.items]) == 70
