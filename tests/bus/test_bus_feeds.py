"""Contract suite of the FeedStore / FeedFanout seam (bus/feeds.py), run against Redis (in a
keyspace of its own, deleted afterwards) and the in-memory double."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from bus_helpers import closed_port, service_addresses, unique
from redis_cluster_fixture import CLUSTER, cluster_url

from bus.feeds import Cursor, FeedWrites, GraphChange, LikeChange, Post
from bus.feeds_memory import MemoryFeedStore
from bus.feeds_redis import RedisFeedStore
from bus.pubsub_memory import MemoryPubSub
from bus.pubsub_redis import RedisPubSub
from bus.redis import redis_client
from peernet.codec import unpack
from peernet.config import load_config
from peernet.errors import PeerNetError

REAL = pytest.param("real", marks=pytest.mark.stack)
CAP = 5


@dataclass
class FeedsKit:
    kind: str
    store: Any  # FeedStore and FeedFanout
    redis_url: str
    memory_pubsub: MemoryPubSub | None

    async def subscribe(self, channel: str) -> tuple[list[bytes], Any]:
        got: list[bytes] = []
        ps: Any = self.memory_pubsub if self.memory_pubsub is not None else RedisPubSub(self.redis_url)
        if self.memory_pubsub is None:
            await ps.start()
        sub = await ps.subscribe(channel, lambda _c, payload: got.append(payload))
        return got, (ps, sub)


@pytest.fixture(params=[REAL, CLUSTER, "memory"])
async def feeds_kit(request: pytest.FixtureRequest) -> AsyncIterator[FeedsKit]:
    kind: str = request.param
    if kind != "memory":
        url = (cluster_url(request) if kind == "cluster"
               else request.getfixturevalue("services").redis_url)
        store: Any = RedisFeedStore(redis_client(url), keyspace=unique("test-feeds"), cap=CAP)
        kit = FeedsKit(kind, store, url, None)
    else:
        pubsub = MemoryPubSub()
        await pubsub.start()
        kit = FeedsKit(kind, MemoryFeedStore(cap=CAP, pubsub=pubsub),
                       service_addresses(load_config()).redis_url, pubsub)
    yield kit
    await kit.store.clear()
    if isinstance(kit.store, RedisFeedStore):
        await kit.store.close()
    if kit.memory_pubsub is not None:
        await kit.memory_pubsub.stop()


def post(pid: str, author: str, ts: int, body: str = "") -> Post:
    return Post(pid, author, body or f"body of {pid}", ts)


async def test_follow_claims_are_idempotent(feeds_kit: FeedsKit) -> None:
    s = feeds_kit.store
    assert await s.claim_follow("a", "b", True) is True
    assert await s.claim_follow("a", "b", True) is False
    lookup = await s.lookup(["b"], [])
    assert lookup.followers == {"b": ["a"]}
    assert await s.claim_follow("a", "b", False) is True
    assert await s.claim_follow("a", "b", False) is False
    assert (await s.lookup(["b"], [])).followers == {"b": []}


async def test_likes_need_a_known_post_and_count_once_per_user(feeds_kit: FeedsKit) -> None:
    s = feeds_kit.store
    assert await s.claim_like("u", "p1", True) is None
    await s.put_post(post("p1", "author", 1000))
    first = await s.claim_like("u", "p1", True)
    assert first is not None and (first.author, first.changed) == ("author", True)
    again = await s.claim_like("u", "p1", True)
    assert again is not None and again.changed is False
    await s.claim_like("v", "p1", True)
    page = await s.page("author", 10, None)
    assert [(p.id, p.likes) for p in page.items] == [("p1", 2)]
    unliked = await s.claim_like("u", "p1", False)
    assert unliked is not None and unliked.changed is True
    unliked = await s.claim_like("u", "p1", False)
    assert unliked is not None and unliked.changed is False
    assert (await s.page("author", 10, None)).items[0].likes == 1


async def test_concurrent_likes_count_exactly(feeds_kit: FeedsKit) -> None:
    s = feeds_kit.store
    await s.put_post(post("hot", "author", 1000))
    users = [f"user{i}" for i in range(40)]
    results = await asyncio.gather(*(s.claim_like(u, "hot", True) for u in users * 3))
    assert sum(r.changed for r in results) == 40
    assert (await s.page("author", 1, None)).items[0].likes == 40


async def test_pages_are_newest_first_with_ids_breaking_ties_and_cursors_that_cover_all(
        feeds_kit: FeedsKit) -> None:
    s = feeds_kit.store
    posts = [post("p0", "me", 100), post("p1", "me", 200), post("p2", "me", 200),
             post("p3", "me", 300), post("p4", "me", 300)]
    for p in posts:
        await s.put_post(p)
    expected = ["p4", "p3", "p2", "p1", "p0"]
    full = await s.page("me", 10, None)
    assert [p.id for p in full.items] == expected and full.next is None
    seen: list[str] = []
    cursor: Cursor | None = None
    while True:
        page = await s.page("me", 2, cursor)
        seen += [p.id for p in page.items]
        if page.next is None:
            break
        assert len(page.items) == 2
        cursor = Cursor.parse(page.next.encode())
    assert seen == expected
    exact = await s.page("me", 5, None)
    assert len(exact.items) == 5 and exact.next is None
    assert full.items[0] == Post("p4", "me", "body of p4", 300, 0, False)


async def test_fan_out_writes_are_capped_and_removable(feeds_kit: FeedsKit) -> None:
    s = feeds_kit.store
    await s.record([GraphChange("reader", "w", True)], [], [])
    posts = [post(f"w{i}", "w", 1000 + i) for i in range(CAP + 3)]
    await s.record([], [], posts)
    await s.write(FeedWrites(adds=[("reader", p.id, p.ts) for p in posts]))
    page = await s.page("reader", 100, None)
    assert [p.id for p in page.items] == [p.id for p in reversed(posts)][:CAP]
    lookup = await s.lookup(["w"], ["w"])
    assert [pid for pid, _ in lookup.posts["w"]] == [p.id for p in reversed(posts)][:CAP]
    assert lookup.followers["w"] == ["reader"] and lookup.celebrities == set()
    await s.write(FeedWrites(removes=[("reader", [p.id for p in posts])]))
    assert (await s.page("reader", 100, None)).items == []


async def test_pages_leave_out_authors_no_longer_followed(feeds_kit: FeedsKit) -> None:
    s = feeds_kit.store
    await s.claim_follow("reader", "x", True)
    await s.record([], [], [post("x1", "x", 10), post("y1", "y", 20)])
    await s.write(FeedWrites(adds=[("reader", "x1", 10), ("reader", "y1", 20)]))
    assert [p.id for p in (await s.page("reader", 10, None)).items] == ["x1"]
    await s.claim_follow("reader", "x", False)
    assert (await s.page("reader", 10, None)).items == []


async def test_celebrities_are_merged_at_read_time(feeds_kit: FeedsKit) -> None:
    s = feeds_kit.store
    await s.record([GraphChange("reader", "star", True), GraphChange("reader", "pal", True)],
                   [LikeChange("fan", "s2", True)], [])
    await s.write(FeedWrites(celebrities=["star"]))
    stars = [post("s1", "star", 100), post("s2", "star", 300), post("s3", "star", 500)]
    pals = [post("q1", "pal", 200), post("q2", "pal", 400)]
    await s.record([], [], stars + pals)
    await s.write(FeedWrites(adds=[("reader", p.id, p.ts) for p in pals]))
    page = await s.page("reader", 3, None)
    assert [p.id for p in page.items] == ["s3", "q2", "s2"]
    assert page.items[2].likes == 1
    assert page.next is not None
    rest = await s.page("reader", 3, page.next)
    assert [p.id for p in rest.items] == ["q1", "s1"] and rest.next is None
    assert (await s.lookup(["star"], [])).celebrities == {"star"}
    # A star's post also fanned out (before the mark) is not shown twice.
    await s.write(FeedWrites(adds=[("reader", "s3", 500)]))
    assert [p.id for p in (await s.page("reader", 3, None)).items] == ["s3", "q2", "s2"]


async def test_pages_say_whether_their_reader_likes_each_post(feeds_kit: FeedsKit) -> None:
    # Fanned-out posts and a celebrity's merged ones alike; `liked` is the reader's own.
    s = feeds_kit.store
    await s.record([GraphChange("reader", "pal", True), GraphChange("reader", "star", True),
                    GraphChange("other", "pal", True)], [], [])
    await s.write(FeedWrites(celebrities=["star"]))
    await s.record([], [], [post("q1", "pal", 100), post("q2", "pal", 300), post("s1", "star", 200)])
    await s.write(FeedWrites(adds=[(u, pid, ts) for u in ("reader", "other")
                                   for pid, ts in (("q1", 100), ("q2", 300))]))
    await s.claim_like("reader", "q1", True)
    await s.record([], [LikeChange("reader", "s1", True), LikeChange("other", "q2", True)], [])

    def liked(page: Any) -> list[tuple[str, int, bool]]:
        return [(p.id, p.likes, p.liked) for p in page.items]

    assert liked(await s.page("reader", 10, None)) == [
        ("q2", 1, False), ("s1", 1, True), ("q1", 1, True)]
    assert liked(await s.page("other", 10, None)) == [("q2", 1, True), ("q1", 1, False)]
    assert liked(await s.page("pal", 10, None)) == [("q2", 1, False), ("q1", 1, False)]
    first = await s.page("reader", 2, None)
    assert first.next is not None
    assert liked(await s.page("reader", 2, first.next)) == [("q1", 1, True)]
    await s.claim_like("reader", "q1", False)
    await s.record([], [LikeChange("reader", "s1", False)], [])
    assert liked(await s.page("reader", 10, None)) == [
        ("q2", 1, False), ("s1", 0, False), ("q1", 0, False)]


async def graph_walk(s: Any, user: str, side: str, limit: int) -> list[list[str]]:
    """Every page of one side of `user`'s graph, walked with the cursors it gives."""
    pages: list[list[str]] = []
    after = None
    while True:
        page = await s.graph(user, side, limit, after)
        pages.append(page.items)
        if page.next is None:
            return pages
        assert page.next == page.items[-1] and len(page.items) == limit
        after = page.next


async def test_graph_lists_page_in_user_id_order_and_follow_each_change(
        feeds_kit: FeedsKit) -> None:
    s = feeds_kit.store
    for target in ("carol", "bob", "dave_2", "dave", "a0"):
        await s.claim_follow("me", target, True)
    await s.record([GraphChange("eve", "bob", True), GraphChange("me", "zed", True)], [], [])
    everyone = ["a0", "bob", "carol", "dave", "dave_2", "zed"]
    assert await graph_walk(s, "me", "following", 100) == [everyone]
    assert await graph_walk(s, "me", "following", 2) == [everyone[0:2], everyone[2:4],
                                                          everyone[4:6]]
    assert await graph_walk(s, "me", "following", 4) == [everyone[:4], everyone[4:]]
    assert await graph_walk(s, "me", "following", 1) == [[u] for u in everyone]
    assert await graph_walk(s, "bob", "followers", 20) == [["eve", "me"]]
    assert await graph_walk(s, "me", "followers", 20) == [[]]
    assert await graph_walk(s, "nobody", "following", 20) == [[]]
    # A cursor that is no longer in the list (unfollowed meanwhile) still finds its place.
    first = await s.graph("me", "following", 2, None)
    await s.claim_follow("me", "bob", False)
    await s.record([GraphChange("me", "carol", False)], [], [])
    rest = await s.graph("me", "following", 10, first.next)
    assert rest.items == ["dave", "dave_2", "zed"] and rest.next is None
    assert (await s.graph("bob", "followers", 10, None)).items == ["eve"]
    assert (await s.graph("carol", "followers", 10, None)).items == []
    assert (await s.graph("me", "following", 10, "dave")).items == ["dave_2", "zed"]
    # Replayed changes leave the same lists (idempotent).
    await s.record([GraphChange("eve", "bob", True), GraphChange("me", "bob", False)], [], [])
    assert (await s.graph("bob", "followers", 10, None)).items == ["eve"]


async def test_graph_lists_of_follows_stored_before_the_lists_existed(
        feeds_kit: FeedsKit) -> None:
    # Follows written by an older version: the sets without the zsets by id. The first read
    # builds the list from the set; later changes keep both.
    if feeds_kit.kind == "memory":
        pytest.skip("the in-memory store has no older layout")
    s = feeds_kit.store
    r = redis_client(feeds_kit.redis_url)
    try:
        await r.sadd(f"{s.prefix}:following:old", *[f"u{i:04d}" for i in range(2500)])
        await r.sadd(f"{s.prefix}:followers:u0001", "old")
    finally:
        await r.aclose()
    page = await s.graph("old", "following", 100, None)
    assert page.items == [f"u{i:04d}" for i in range(100)] and page.next == "u0099"
    assert (await s.graph("u0001", "followers", 100, None)).items == ["old"]
    await s.claim_follow("old", "new", True)
    await s.claim_follow("old", "u0000", False)
    walked = [u for p in await graph_walk(s, "old", "following", 100) for u in p]
    assert walked == ["new"] + [f"u{i:04d}" for i in range(1, 2500)]


async def test_pushes_reach_the_subscribers_of_each_channel(feeds_kit: FeedsKit) -> None:
    got, (ps, sub) = await feeds_kit.subscribe("u:test-push-a")
    try:
        await feeds_kit.store.write(FeedWrites(pushes=[(["u:test-push-a", "u:test-push-b"],
                                                        b"\x81\xa1t\xa4feed")]))
        for _ in range(200):
            if got:
                break
            await asyncio.sleep(0.01)
        assert [unpack(g) for g in got] == [{"t": "feed"}]
    finally:
        await sub.unsubscribe()
        if isinstance(ps, RedisPubSub):
            await ps.stop()


async def test_clear_empties_the_keyspace(feeds_kit: FeedsKit) -> None:
    s = feeds_kit.store
    await s.put_post(post("c1", "me", 1))
    await s.claim_follow("me", "you", True)
    assert await s.clear() > 0
    assert (await s.page("me", 10, None)).items == []
    assert await s.claim_like("x", "c1", True) is None


async def test_an_unreachable_store_is_unavailable(feeds_kit: FeedsKit) -> None:
    if feeds_kit.kind == "memory":
        down: Any = MemoryFeedStore(cap=CAP)
        down.set_down(True)
    else:
        down = RedisFeedStore(redis_client(f"redis://127.0.0.1:{closed_port()}/0",
                                           socket_timeout_s=1.0), keyspace="none", cap=CAP)
    with pytest.raises(PeerNetError) as err:
        await down.claim_follow("a", "b", True)
    assert err.value.code.value == "unavailable"
    with pytest.raises(PeerNetError):
        await down.page("a", 10, None)
    with pytest.raises(PeerNetError):
        await down.graph("a", "followers", 10, None)


async def test_several_celebrities_merge_into_one_order(feeds_kit: FeedsKit) -> None:
    s = feeds_kit.store
    await s.record([GraphChange("reader", "s1", True), GraphChange("reader", "s2", True)], [], [])
    await s.write(FeedWrites(celebrities=["s1", "s2"]))
    await s.record([], [], [post(f"a{i}", "s1", 100 + 2 * i) for i in range(4)]
                   + [post(f"b{i}", "s2", 101 + 2 * i) for i in range(4)])
    seen: list[str] = []
    cursor: Cursor | None = None
    while True:
        page = await s.page("reader", 3, cursor)
        seen += [p.id for p in page.items]
        if page.next is None:
            break
        cursor = page.next
    assert seen == ["b3", "a3", "b2", "a2", "b1", "a1", "b0", "a0"]


async def test_concurrent_pages_each_get_their_own_readers_feed(feeds_kit: FeedsKit) -> None:
    # Many readers at once (a replica under load): each gets its own reader's page, in order.
    s = feeds_kit.store
    readers = [f"r{i}" for i in range(40)]
    await s.record([GraphChange(r, "w", True) for r in readers], [],
                   [post(f"w{i}", "w", 100 + i) for i in range(len(readers) + 1)])
    # Reader i has the posts w0 .. wi (capped to the newest CAP).
    await s.write(FeedWrites(adds=[(r, f"w{k}", 100 + k)
                                   for i, r in enumerate(readers) for k in range(i + 1)]))
    pages = await asyncio.gather(*(s.page(r, 3, None) for r in readers),
                                 *(s.page(r, 3, None) for r in reversed(readers)))
    expected = [[f"w{k}" for k in range(i, max(-1, i - 3), -1)] for i in range(len(readers))]
    assert [[p.id for p in page.items] for page in pages] == expected + expected[::-1]


@pytest.mark.stack
async def test_pages_are_read_again_after_redis_forgets_its_scripts(services: Any) -> None:
    client = redis_client(services.redis_url)
    store = RedisFeedStore(client, keyspace=unique("test-feeds"), cap=CAP)
    try:
        await store.claim_follow("reader", "w", True)
        await store.record([], [], [post("w1", "w", 10)])
        await store.write(FeedWrites(adds=[("reader", "w1", 10)]))
        assert [p.id for p in (await store.page("reader", 10, None)).items] == ["w1"]
        await client.script_flush()  # what a restarted Redis looks like to a cached script
        pages = await asyncio.gather(*(store.page("reader", 10, None) for _ in range(5)))
        assert [[p.id for p in page.items] for page in pages] == [["w1"]] * 5
    finally:
        await store.clear()
        await store.close()
