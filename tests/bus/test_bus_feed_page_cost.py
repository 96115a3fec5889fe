"""What a home-feed page of 20 costs Redis (issue 18): at most two round trips, the celebrity
merge and the like counts included, on one Redis and on a Redis Cluster."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

import pytest
from bus_helpers import unique
from redis_cluster_fixture import CLUSTER, cluster_url
from redis_cost import redis_cost

from bus.feeds import FeedWrites, GraphChange, LikeChange, Post
from bus.feeds_redis import RedisFeedStore
from bus.redis import redis_client, redis_target

REAL = pytest.param("real", marks=pytest.mark.stack)
PAGE = 20
FOLLOWED = [f"pal{i}" for i in range(10)]
CELEBRITIES = ["star0", "star1"]


@pytest.fixture(params=[REAL, CLUSTER])
async def page_store(request: pytest.FixtureRequest) -> AsyncIterator[tuple[RedisFeedStore, str]]:
    """A reader who follows 10 authors (5 posts each in the home feed), 2 celebrities (10 posts
    each, never fanned out) and no longer follows a third author whose posts are still in the
    feed; a third of the posts have likes."""
    url = (cluster_url(request) if request.param == "cluster"
           else request.getfixturevalue("services").redis_url)
    store = RedisFeedStore(redis_client(url), keyspace=unique("test-page-cost"), cap=800)
    posts = [Post(f"{a}-{k}", a, f"post {k} of {a}", 1000 + 37 * i + 3 * k)
             for i, a in enumerate([*FOLLOWED, "gone"]) for k in range(5)]
    stars = [Post(f"{c}-{k}", c, f"post {k} of {c}", 1010 + 41 * k + j)
             for j, c in enumerate(CELEBRITIES) for k in range(10)]
    likes = [LikeChange(f"fan{u}", p.id, True) for p in (posts + stars)[::3] for u in range(3)]
    await store.record([GraphChange("reader", a, True) for a in [*FOLLOWED, *CELEBRITIES, "gone"]],
                       likes, posts + stars)
    await store.write(FeedWrites(celebrities=CELEBRITIES,
                                 adds=[("reader", p.id, p.ts) for p in posts]))
    await store.record([GraphChange("reader", "gone", False)], [], [])
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

    for before in (None, first.next):
        page, cost = await redis_cost(partial(store.page, "reader", PAGE, before), nodes,
                                      store.prefix)
        assert page == (first if before is None else await store.page("reader", PAGE, before))
        assert cost.round_trips <= 2, cost
        # Commands are counted, not bounded here: a script's calls cost Redis CPU, not a trip.
        print(f"page before={before}: {cost.round_trips} round trip(s), "
              f"{len(cost.commands)} Redis commands {cost.by_name()}")
