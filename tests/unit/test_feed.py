"""FeedShard logic (actors/feed.py), projections of social events and `peernet replay`
(actors/replay.py), on the in-memory event log, feed store and document store."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest
from unit_helpers import eventually

from actors.feed import Batch, FeedShard, feeds_group, parse, plan
from actors.projector import Projector
from actors.replay import replay
from bus.eventlog import Record
from bus.eventlog_memory import MemoryEventLog
from bus.feeds import Cursor, GraphChange, Lookup, Post
from bus.feeds_memory import MemoryFeedStore
from bus.store import Document
from bus.store_memory import MemoryDocumentStore
from bus.topics import peernet_topics
from peernet.codec import unpack
from peernet.config import PeerNetConfig, load_config
from peernet.envelope import Event

THRESHOLD = 3
CAP = 10


@pytest.fixture
def cfg() -> PeerNetConfig:
    return load_config({"PEERNET_CELEBRITY_THRESHOLD": str(THRESHOLD), "PEERNET_FEED_CAP": str(CAP),
                        "PEERNET_EVENTS_PARTITIONS": "4", "PEERNET_INBOX_PARTITIONS": "4"})


@pytest.fixture
async def log(cfg: PeerNetConfig) -> MemoryEventLog:
    log = MemoryEventLog()
    await log.start()
    await log.ensure_topics(peernet_topics(cfg))
    return log


class World:
    """Appends social events the way the gateway does (same keys and data), and with a store,
    claims them in it first as the gateway does."""

    def __init__(self, cfg: PeerNetConfig, log: MemoryEventLog,
                 store: MemoryFeedStore | None = None) -> None:
        self.cfg = cfg
        self.log = log
        self.store = store
        self.clock = 1_000_000

    def _ts(self) -> int:
        self.clock += 10
        return self.clock

    async def _append(self, event: Event, key: str) -> Event:
        await self.log.append(self.cfg.topics.events, event.encode(), key=key.encode())
        return event

    async def follow(self, a: str, b: str, on: bool = True) -> Event:
        if self.store is not None:
            await self.store.claim_follow(a, b, on)
        return await self._append(Event("follow" if on else "unfollow", a, {"user": b},
                                        ts=self._ts()), a)

    async def post(self, author: str, body: str) -> Post:
        e = await self._append(Event("post", author, {"body": body}, ts=self._ts()), author)
        return Post(e.id, author, body, e.ts)

    async def like(self, user: str, post: Post, on: bool = True) -> Event:
        return await self._append(Event("like" if on else "unlike", user,
                                        {"post": post.id, "author": post.author}, ts=self._ts()),
                                  post.id)

    async def dm(self, a: str, b: str, body: str) -> Event:
        conv = f"dm:{min(a, b)}:{max(a, b)}"
        return await self._append(Event("dm", a, {"to": b, "body": body, "conv": conv},
                                        ts=self._ts()), conv)


def snapshot(store: MemoryFeedStore) -> dict[str, Any]:
    """Everything a feed store holds, comparable."""
    return {
        "feeds": {u: z.newest() for u, z in store.feeds.items() if z.scores},
        "posts_by": {u: z.newest() for u, z in store.posts_by.items() if z.scores},
        "following": {u: sorted(s) for u, s in store.following.items() if s},
        "followers": {u: sorted(s) for u, s in store.followers.items() if s},
        "posts": dict(store.posts),
        "likes": {p: sorted(s) for p, s in store.likes.items() if s},
        "celebrities": sorted(store.celebrities),
    }


def in_order(cfg: PeerNetConfig, log: MemoryEventLog) -> list[Record]:
    """The records of the events topic in the order they were appended."""
    return sorted(log.records(cfg.topics.events), key=lambda r: Event.decode(r.value).ts)


async def drain(shard: FeedShard, cfg: PeerNetConfig, log: MemoryEventLog) -> None:
    """Process every record of the events topic, in one batch, in append order."""
    await shard.process(in_order(cfg, log))


# -- plan (pure) ------------------------------------------------------------------------------


def test_a_post_goes_to_its_author_and_every_follower_with_a_push_to_each() -> None:
    p = Post("p1", "alice", "hi", 100)
    writes = plan(Batch([], [], [p]), Lookup(followers={"alice": ["bob", "carol"]}), THRESHOLD,
                  push=True)
    assert writes.adds == [("alice", "p1", 100), ("bob", "p1", 100), ("carol", "p1", 100)]
    assert writes.celebrities == []
    ((channels, payload),) = writes.pushes
    assert channels == ["u:alice", "u:bob", "u:carol"]
    assert unpack(payload) == {"t": "feed", "item": {"id": "p1", "author": "alice", "body": "hi",
                                                     "ts": 100, "likes": 0}}
    assert not plan(Batch([], [], [p]), Lookup(), THRESHOLD, push=False).pushes


def test_an_author_over_the_threshold_is_marked_and_not_fanned_out_but_still_pushed() -> None:
    fans = [f"f{i}" for i in range(THRESHOLD + 1)]
    p = Post("p1", "star", "hi", 100)
    writes = plan(Batch([], [], [p]), Lookup(followers={"star": fans}), THRESHOLD, push=True)
    assert writes.adds == [("star", "p1", 100)]
    assert writes.celebrities == ["star"]
    assert writes.pushes[0][0] == ["u:star"] + [f"u:{f}" for f in fans]
    # Already marked (sticky), even with few followers now.
    writes = plan(Batch([], [], [p]), Lookup(followers={"star": ["f0"]}, celebrities={"star"}),
                  THRESHOLD, push=False)
    assert writes.adds == [("star", "p1", 100)] and writes.celebrities == []


def test_follows_backfill_and_unfollows_remove_as_the_batch_leaves_the_graph() -> None:
    recent = {"b": [("b2", 20), ("b1", 10)], "c": [("c1", 5)], "star": [("s1", 7)]}
    batch = Batch([GraphChange("a", "b", True), GraphChange("a", "c", True),
                   GraphChange("a", "c", False), GraphChange("a", "star", True)], [], [])
    writes = plan(batch, Lookup(posts=recent, celebrities={"star"}), THRESHOLD, push=True)
    assert writes.adds == [("a", "b2", 20), ("a", "b1", 10)]
    assert writes.removes == [("a", ["c1"])]
    assert writes.pushes == []


def test_malformed_social_events_are_counted_and_skipped() -> None:
    batch, malformed = parse([Event("follow", "a", {}), Event("post", "a", {"body": "x"}),
                              Event("like", "a", {"nope": 1}), Event("dm", "a", {})])
    assert malformed == 2
    assert [p.author for p in batch.posts] == ["a"] and batch.graph == [] and batch.likes == []


# -- FeedShard on the log ---------------------------------------------------------------------


async def test_two_shards_in_one_group_build_every_feed(cfg: PeerNetConfig,
                                                        log: MemoryEventLog) -> None:
    store = MemoryFeedStore(cap=CAP)
    clients = [log.client() for _ in range(2)]
    for c in clients:
        await c.start()
    shards = [FeedShard(i, 2, cfg, c, store) for i, c in enumerate(clients)]
    for s in shards:
        await s.start()
    try:
        w = World(cfg, log, store)
        for reader in ("r1", "r2", "r3"):
            await w.follow(reader, "author")
        await w.follow("r1", "other")
        posts = [await w.post("author", f"post {i}") for i in range(6)]
        other = await w.post("other", "elsewhere")
        await w.follow("r3", "author", on=False)

        async def settled() -> bool:
            page1 = await store.page("r1", 20, None)
            page3 = await store.page("r3", 20, None)
            return len(page1.items) == 7 and page3.items == []

        await eventually(settled)
        page = await store.page("r1", 20, None)
        assert [p.id for p in page.items] == [other.id, *[p.id for p in reversed(posts)]]
        assert [p.id for p in (await store.page("r2", 20, None)).items] == [
            p.id for p in reversed(posts)]
        assert (await store.page("r3", 20, None)).items == []
        assert sum(s.stats.posts for s in shards) == 7
        assert all(s.stats.errors == 0 for s in shards)
        # Both shards took part: the group spread the partitions over them.
        assert all(s.stats.started for s in shards)
        pushed = {ch for ch, _ in store.pushed}
        assert {"u:r1", "u:r2", "u:author", "u:other"} <= pushed
    finally:
        for s in shards:
            await s.stop()


async def test_a_follow_after_the_posts_backfills_and_pages_walk_back(cfg: PeerNetConfig,
                                                                     log: MemoryEventLog) -> None:
    store = MemoryFeedStore(cap=CAP)
    shard = FeedShard(0, 1, cfg, log, store, push=False)
    w = World(cfg, log)
    posts = [await w.post("writer", f"w{i}") for i in range(CAP + 4)]
    await drain(shard, cfg, log)
    await w.follow("late", "writer")
    await drain(shard, cfg, log)
    newest = [p.id for p in reversed(posts)][:CAP]
    seen: list[str] = []
    cursor: Cursor | None = None
    while True:
        page = await store.page("late", 4, cursor)
        seen += [p.id for p in page.items]
        if page.next is None:
            break
        cursor = page.next
    assert seen == newest  # the cap bounds how far back a feed goes


async def test_a_celebrity_is_merged_at_read_time_in_order(cfg: PeerNetConfig,
                                                          log: MemoryEventLog) -> None:
    store = MemoryFeedStore(cap=CAP)
    shard = FeedShard(0, 1, cfg, log, store, push=False)
    w = World(cfg, log)
    fans = [f"fan{i}" for i in range(THRESHOLD + 1)]
    for f in fans:
        await w.follow(f, "star")
    await w.follow("fan0", "pal")
    await drain(shard, cfg, log)
    mixed = []
    for i in range(3):
        mixed.append(await w.post("star", f"s{i}"))
        mixed.append(await w.post("pal", f"p{i}"))
    await drain(shard, cfg, log)
    assert store.celebrities == {"star"}
    assert {store.posts[pid][0] for pid in store.feed_ids("fan0")} == {"pal"}
    page = await store.page("fan0", 4, None)
    rest = await store.page("fan0", 4, page.next)
    assert [p.id for p in page.items + rest.items] == [p.id for p in reversed(mixed)]
    assert [p.id for p in (await store.page("fan1", 10, None)).items] == [
        p.id for p in reversed(mixed) if p.author == "star"]


async def test_likes_count_once_per_user_and_unlikes_take_them_back(cfg: PeerNetConfig,
                                                                   log: MemoryEventLog) -> None:
    store = MemoryFeedStore(cap=CAP)
    shard = FeedShard(0, 1, cfg, log, store, push=False)
    w = World(cfg, log)
    p = await w.post("author", "likeable")
    await w.like("u1", p)
    await w.like("u1", p)  # a repeat that reached the log (e.g. a retried append)
    await w.like("u2", p)
    await w.like("u3", p)
    await w.like("u3", p, on=False)
    await drain(shard, cfg, log)
    assert (await store.page("author", 1, None)).items[0].likes == 2


async def test_a_feed_store_outage_delays_the_feeds_and_loses_nothing(cfg: PeerNetConfig,
                                                                     log: MemoryEventLog) -> None:
    store = MemoryFeedStore(cap=CAP)
    shard = FeedShard(0, 1, cfg, log, store, push=False)
    await shard.start()
    try:
        w = World(cfg, log)
        await w.follow("reader", "author")
        store.set_down(True)
        p = await w.post("author", "during the outage")
        await eventually(lambda: shard.stats.errors >= 2)  # the write failed, and its retry
        assert store.feed_ids("reader") == []  # delayed, not written
        store.set_down(False)
        await eventually(lambda: store.feed_ids("reader"))
        assert store.feed_ids("reader") == [p.id]
    finally:
        await shard.stop()


async def test_processing_the_same_records_again_changes_nothing(cfg: PeerNetConfig,
                                                                 log: MemoryEventLog) -> None:
    store = MemoryFeedStore(cap=CAP)
    shard = FeedShard(0, 1, cfg, log, store, push=False)
    w = World(cfg, log)
    await script(w)
    await drain(shard, cfg, log)
    before = snapshot(store)
    await drain(shard, cfg, log)
    assert snapshot(store) == before


async def script(w: World) -> None:
    """A small social history: follows, posts, likes, an unfollow, a celebrity, DMs."""
    for f in ("a", "b", "c", "d"):
        await w.follow(f, "star")
    await w.follow("a", "b")
    await w.follow("b", "a")
    pa = await w.post("a", "from a")
    pb = await w.post("b", "from b")
    ps = await w.post("star", "from the star")
    await w.like("b", pa)
    await w.like("c", pa)
    await w.like("a", ps)
    await w.like("c", pa, on=False)
    await w.follow("c", "b")
    await w.post("b", "b again")
    await w.follow("c", "b", on=False)
    await w.like("b", pb)  # one's own post: no note
    await w.dm("a", "b", "hello")


# -- projections and replay -------------------------------------------------------------------


async def projections(store: MemoryDocumentStore) -> dict[str, list[dict[str, Any]]]:
    return {c: await store.documents(c)
            for c in ("users", "follows", "posts", "likes", "notes", "messages")}


async def test_projections_of_social_events(cfg: PeerNetConfig, log: MemoryEventLog) -> None:
    docs = MemoryDocumentStore()
    projector = Projector(cfg, log, docs)
    w = World(cfg, log)
    await script(w)
    await projector.apply(log.records(cfg.topics.events))
    got = await projections(docs)
    assert [d["_id"] for d in got["users"]] == ["a", "b", "c", "d", "star"]
    assert {d["_id"] for d in got["follows"]} == {"a:star", "b:star", "c:star", "d:star", "a:b",
                                                   "b:a"}
    assert len(got["posts"]) == 4
    assert sorted(d["user"] for d in got["likes"]) == ["a", "b", "b"]
    kinds = sorted((d["kind"], d["user"], d["from"]) for d in got["notes"])
    # Every follow (c's re-follow of b too) notes the followed; likes note the author, but not
    # a like of one's own post.
    assert kinds == sorted([("follow", "star", f) for f in "abcd"] + [
        ("follow", "b", "a"), ("follow", "a", "b"), ("follow", "b", "c"),
        ("like", "a", "b"), ("like", "a", "c"), ("like", "star", "a")])
    assert len(got["messages"]) == 1
    await projector.apply(log.records(cfg.topics.events))
    assert await projections(docs) == got


async def test_replay_rebuilds_feeds_and_projections_and_is_safe_to_run_twice(
        cfg: PeerNetConfig, log: MemoryEventLog) -> None:
    live_feeds = MemoryFeedStore(cap=CAP)
    live_docs = MemoryDocumentStore()
    w = World(cfg, log)
    await script(w)
    # Live: one record at a time, in the order they were appended (partitions interleave).
    shard = FeedShard(0, 1, cfg, log, live_feeds, push=False)
    projector = Projector(cfg, log, live_docs)
    for record in in_order(cfg, log):
        await shard.process([record])
        await projector.apply([record])
    expected_feeds, expected_docs = snapshot(live_feeds), await projections(live_docs)

    out = io.StringIO()
    result = await replay(cfg, log, live_feeds, live_docs, wipe=True, out=out)
    assert result.records == len(log.records(cfg.topics.events))
    assert result.keys_wiped > 0 and result.documents_wiped > 0
    assert snapshot(live_feeds) == expected_feeds
    assert await projections(live_docs) == expected_docs
    assert "replay [" in out.getvalue() and "(100%)" in out.getvalue()
    again = await replay(cfg, log, live_feeds, live_docs, wipe=False, out=io.StringIO())
    assert again.records == result.records
    assert snapshot(live_feeds) == expected_feeds
    assert await projections(live_docs) == expected_docs
    assert live_feeds.pushed == []  # replay never pushes


def test_the_group_is_one_per_events_topic(cfg: PeerNetConfig) -> None:
    other = load_config({"PEERNET_EVENTS_TOPIC": "t2"})
    assert feeds_group(cfg) != feeds_group(other)
    assert feeds_group(cfg).startswith("peernet.feeds")



@pytest.mark.parametrize("linger_ms", [400, 0])
async def test_the_projector_writes_events_that_arrive_within_its_linger_as_one_batch(
        cfg: PeerNetConfig, log: MemoryEventLog, linger_ms: int) -> None:
    """Events appended one by one within the linger reach MongoDB in one or two writes; with no
    linger each poll is written at once."""
    docs = MemoryDocumentStore()
    c = replace(cfg, shards=replace(cfg.shards, projector_linger_ms=linger_ms))
    projector = Projector(c, log, docs)
    await projector.start()
    try:
        w = World(c, log)
        for i in range(6):
            await w.post("a", f"p{i}")
            await asyncio.sleep(0.03)
        await eventually(lambda: projector.stats.records == 6)
        await eventually(lambda: projector.stats.written >= 6)
        assert len(await docs.documents("posts")) == 6
        if linger_ms:
            assert projector.stats.batches <= 2, projector.stats
        else:
            assert projector.stats.batches >= 3, projector.stats
    finally:
        await projector.stop()


async def test_a_feed_shards_queue_depth_is_the_batch_it_holds_until_written(
        cfg: PeerNetConfig, log: MemoryEventLog) -> None:
    """The batch counts whole from its poll until its feed writes succeed, through the retries
    of a feed store outage; then the depth is 0."""
    store = MemoryFeedStore(cap=CAP)
    shard = FeedShard(0, 1, cfg, log, store, push=False)
    assert shard.queue_depth() == 0
    w = World(cfg, log)
    await w.follow("reader", "author")
    await w.post("author", "held")
    await w.dm("reader", "author", "not social, but in the batch")
    store.set_down(True)
    await shard.start()
    try:
        await eventually(lambda: shard.stats.errors >= 2)  # retried at least once
        assert shard.queue_depth() == 3
        store.set_down(False)
        await eventually(lambda: store.feed_ids("reader"))
        await eventually(lambda: shard.queue_depth() == 0)
    finally:
        await shard.stop()


class GatedDocumentStore(MemoryDocumentStore):
    """A document store whose writes wait until `gate` is set (a slow MongoDB)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.waiting = 0

    async def upsert_many(self, collection: str, docs: Sequence[Document]) -> None:
        self.waiting += 1
        await self.gate.wait()
        await super().upsert_many(collection, docs)

    async def insert_new(self, collection: str, docs: Sequence[Document]) -> None:
        self.waiting += 1
        await self.gate.wait()
        await super().insert_new(collection, docs)


async def test_the_projectors_queue_depth_counts_what_it_gathers_until_written(
        cfg: PeerNetConfig, log: MemoryEventLog) -> None:
    docs = GatedDocumentStore()
    c = replace(cfg, shards=replace(cfg.shards, projector_linger_ms=1_500))
    projector = Projector(c, log, docs)
    assert projector.queue_depth() == 0
    w = World(c, log)
    await w.post("a", "first")
    await projector.start()
    try:
        await eventually(lambda: projector.queue_depth() == 1)
        await w.post("a", "gathered")  # within the linger: the same batch
        await w.post("a", "gathered too")
        await eventually(lambda: projector.queue_depth() == 3)
        await eventually(lambda: docs.waiting)
        assert projector.queue_depth() == 3
        docs.gate.set()
        await eventually(lambda: projector.queue_depth() == 0)
        assert len(await docs.documents("posts")) == 3
    finally:
        await projector.stop()


async def test_a_feed_shard_reads_the_event_log_only_never_the_messages() -> None:
    """DMs have a log of their own, so the FeedShards never fetch one."""
    from actors.feed import FeedShard
    from bus.eventlog_memory import MemoryEventLog
    from bus.feeds_memory import MemoryFeedStore
    from bus.topics import peernet_topics

    cfg = load_config()
    log = MemoryEventLog()
    await log.start()
    await log.ensure_topics(peernet_topics(cfg))
    shard = FeedShard(0, 1, cfg, log, MemoryFeedStore(cap=10))
    await shard.start()
    try:
        assert shard._loop is not None and shard._loop.topics == [cfg.topics.events]
        assert cfg.topics.messages != cfg.topics.events
    finally:
        await shard.stop()
