"""FeedShards: home feeds computed ahead of time from the event log (fan-out on write).

The FeedShards read the events topic in one consumer group (`feeds_group`), so its partitions
are spread over them; the state they write lives in Redis behind bus/feeds.py, so a shard holds
nothing a restart could lose. For each batch of records:
  1. the graph, like and post events are recorded in log order (idempotent set operations);
  2. one round trip reads what the plan needs: the followers of the batch's authors, the
     celebrity marks, and the recent posts of the users followed or unfollowed;
  3. `plan` decides the writes: each post goes to its author's feed and, unless the author has
     more followers than the celebrity threshold, to every follower's feed; a follow backfills
     the followee's recent posts, an unfollow removes them; every follower and the author get a
     live `feed` push;
  4. one pipeline publishes the pushes and writes the feeds; then the offsets are committed.
A crash anywhere replays the batch, and replaying changes nothing: every write is idempotent.
`peernet replay` runs the same `process` over the whole log, without pushes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from actors.consuming import ConsumerLoop, group_name
from bus.eventlog import ConsumerLag, EventLog, Record
from bus.feeds import FeedFanout, FeedWrites, GraphChange, LikeChange, Lookup, Post
from peernet.codec import pack
from peernet.config import PeerNetConfig
from peernet.envelope import EnvelopeError, Event
from peernet.wire import user_channel

log = logging.getLogger("peernet.feed")

T = TypeVar("T")

FEEDS_GROUP = "peernet.feeds"
SOCIAL_EVENTS = frozenset({"follow", "unfollow", "post", "like", "unlike"})


def feeds_group(cfg: PeerNetConfig) -> str:
    """The FeedShards' one consumer group. Named after the events topic too: deployments and
    test runs on other topics of one Kafka must not share a group (they would rebalance
    together)."""
    return group_name(FEEDS_GROUP, cfg.topics.events)


def feed_frame(post: Post) -> dict[str, object]:
    """The live push of a new post to a connection."""
    return {"t": "feed", "item": post.frame()}


@dataclass
class FeedStats:
    events_seen: int = 0
    social_events: int = 0
    posts: int = 0
    feed_inserts: int = 0  # fan-out throughput: entries written into home feeds
    backfilled: int = 0
    removed: int = 0
    pushes: int = 0  # channels published to
    celebrities_marked: int = 0
    batches: int = 0
    busy_s: float = 0.0  # time spent processing batches (fan-out cost)
    malformed: int = 0
    errors: int = 0
    last_error: str = ""
    started: bool = False


@dataclass
class Batch:
    """The social events of a batch of records, parsed (malformed ones are dropped)."""

    graph: list[GraphChange]
    likes: list[LikeChange]
    posts: list[Post]

    @property
    def final_graph(self) -> dict[tuple[str, str], bool]:
        """(follower, followee) -> following, as the batch leaves it."""
        return {(g.follower, g.followee): g.following for g in self.graph}


def parse(events: Sequence[Event]) -> tuple[Batch, int]:
    """The batch of `events`, and how many social events were malformed."""
    batch = Batch([], [], [])
    malformed = 0
    for e in events:
        d = e.data
        try:
            if e.type in ("follow", "unfollow"):
                batch.graph.append(GraphChange(e.actor, str(d["user"]), e.type == "follow"))
            elif e.type in ("like", "unlike"):
                batch.likes.append(LikeChange(e.actor, str(d["post"]), e.type == "like"))
            elif e.type == "post":
                batch.posts.append(Post(e.id, e.actor, str(d["body"]), int(e.ts)))
        except (KeyError, TypeError, ValueError):
            malformed += 1
    return batch, malformed


def plan(batch: Batch, lookup: Lookup, threshold: int, *, push: bool) -> FeedWrites:
    """The feed writes and pushes of a recorded batch (pure: unit-tested without Redis)."""
    writes = FeedWrites()
    celebs = set(lookup.celebrities)
    for post in batch.posts:
        followers = lookup.followers.get(post.author, [])
        if post.author not in celebs and len(followers) > threshold:
            # Sticky: an author once too popular to fan out is read-merged from then on, so
            # no post of theirs falls between fan-out and merge.
            celebs.add(post.author)
            writes.celebrities.append(post.author)
        targets = [post.author] if post.author in celebs else [post.author, *followers]
        writes.adds.extend((user, post.id, post.ts) for user in targets)
        if push:
            users = dict.fromkeys([post.author, *followers])
            writes.pushes.append(([user_channel(u) for u in users], pack(feed_frame(post))))
    for (follower, followee), following in batch.final_graph.items():
        recent = lookup.posts.get(followee, [])
        if following:
            if followee not in celebs:
                writes.adds.extend((follower, pid, ts) for pid, ts in recent)
        elif recent:
            writes.removes.append((follower, [pid for pid, _ in recent]))
    return writes


class FeedShard:
    """One member of the feeds consumer group (or, with `consume=False`, the processor that
    `peernet replay` drives)."""

    def __init__(self, index: int, count: int, cfg: PeerNetConfig, log_: EventLog,
                 feeds: FeedFanout, *, push: bool = True) -> None:
        self.index = index
        self.count = count
        self._cfg = cfg
        self._log = log_
        self._feeds = feeds
        self._push = push
        self._threshold = cfg.feeds.celebrity_threshold
        self._loop: ConsumerLoop | None = None
        self._stopping = False
        self.stats = FeedStats()

    async def start(self) -> None:
        # The event log only: DMs have a log of their own, so a FeedShard never fetches one.
        self._loop = ConsumerLoop(
            self._log, [self._cfg.topics.events], FEEDS_GROUP, self.process,
            name=f"feed-shard-{self.index}", on_error=self._count_error,
            max_records=self._cfg.shards.max_batch, linger_ms=self._cfg.shards.feed_linger_ms,
            step="process")
        await self._loop.start()
        self.stats.started = True
        log.info("feed shard %d/%d started", self.index, self.count)

    async def lag(self) -> list[ConsumerLag]:
        """How far this shard's consumer trails the events topic (empty before `start`)."""
        return await self._loop.lag() if self._loop is not None else []

    def queue_depth(self) -> int:
        """Records fetched from the events topic and not yet handled: the batch the consumer
        loop holds, from its poll until the batch's feed writes are done. A batch is handled as
        one (one pipeline, retried whole while the feed store is away), so every record of it
        counts until then, social or not."""
        return self._loop.queue_depth() if self._loop is not None else 0

    async def stop(self) -> None:
        self._stopping = True
        if self._loop is not None:
            await self._loop.stop()

    async def process(self, records: Sequence[Record]) -> int:
        """Apply the social events of `records`; returns how many there were."""
        started = time.perf_counter()
        events: list[Event] = []
        for record in records:
            self.stats.events_seen += 1
            try:
                event = Event.decode(record.value)
            except EnvelopeError as exc:
                self._count_error("decode", exc)
                continue
            if event.type in SOCIAL_EVENTS:
                events.append(event)
        if not events:
            return 0
        batch, malformed = parse(events)
        if malformed:
            self.stats.malformed += malformed
            log.warning("feed shard %d: %d malformed social events skipped", self.index, malformed)
        await self._feeds.record(batch.graph, batch.likes, batch.posts)
        followees = list(dict.fromkeys(b for _, b in batch.final_graph))
        authors = list(dict.fromkeys(p.author for p in batch.posts))
        lookup = await self._feeds.lookup(authors, followees) if authors or followees else Lookup()
        writes = plan(batch, lookup, self._threshold, push=self._push)
        if writes:
            await self._feeds.write(writes)
        s = self.stats
        s.social_events += len(events)
        s.posts += len(batch.posts)
        s.feed_inserts += len(writes.adds)
        s.backfilled += sum(len(lookup.posts.get(b, ())) for (_, b), on in batch.final_graph.items()
                            if on and b not in lookup.celebrities)
        s.removed += sum(len(ids) for _, ids in writes.removes)
        s.pushes += sum(len(channels) for channels, _ in writes.pushes)
        s.celebrities_marked += len(writes.celebrities)
        s.batches += 1
        s.busy_s += time.perf_counter() - started
        return len(events)

    def _count_error(self, what: str, exc: BaseException, trace: bool = False) -> None:
        self.stats.errors += 1
        self.stats.last_error = f"{what}: {exc}"[:300]
        log.warning("feed shard %d: %s failed: %s", self.index, what, exc, exc_info=trace)
