"""Per-user sessions as virtual actors: plain `Session` objects hosted by a fixed pool of
`SessionShard`s, each user owned by the shard `shard_for(user, count)`.

The path of an inbox item: the gateway appends an event to the events topic (keyed by
conversation, so one conversation has one order) with its recipients in a header. Every shard
reads the whole events topic in its own consumer group and keeps the events for users it owns.
For each, the user's Session assigns the next seq (no gaps), the shard appends the item to the
inbox topic (durable, acks=all), then to the Redis inbox cache together with its checkpoint, then
publishes it on the user's channel `u:{user}`, which only the gateway replicas holding that user
subscribe to. Offsets are committed only after all that, so a crash replays, never skips.

A group's records (its messages and membership changes, keyed by its conversation) are read
by every shard, whose view of the group's membership in the log's order decides the recipients
of a message that raced a change (actors/groups.py).

On start, and whenever the cache was wiped or lost writes (its checkpoint version is not the one
the shard last wrote), a shard replays the inbox topic from the cache's checkpoint, so the cache
holds everything the log holds; an events watermark stored with the items makes the inbox
exactly-once across restarts.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from actors.consuming import ConsumerLoop, until_ok
from actors.conversations import MESSAGE_EVENTS, conversation_op
from actors.groups import Memberships, is_group_record
from actors.inbox_items import inbox_item
from bus.conversations import ConversationOp, MessageOp
from bus.eventlog import ConsumerLag, EventLog, Record
from bus.inbox import CacheBehind, InboxCache, Item
from bus.pubsub import PubSub
from peernet.codec import pack, unpack
from peernet.config import PeerNetConfig
from peernet.envelope import EnvelopeError, Event
from peernet.errors import PeerNetError
from peernet.routing import session_group, shard_for
from peernet.wire import parse_recipients, user_channel

log = logging.getLogger("peernet.session")

T = TypeVar("T")

# Where an inbox item came from: the partition, offset and log (topic) of its event.
Source = tuple[int, int, str]

# How many of a user's newest item ids a session remembers to drop redelivered events.
RECENT_IDS = 256


class Session:
    """One user's inbox sequence: assigns seq with no gaps and drops events it has seen."""

    __slots__ = ("last_seq", "recent", "user")

    def __init__(self, user: str, last_seq: int, recent_ids: Sequence[str] = ()) -> None:
        self.user = user
        self.last_seq = last_seq
        self.recent: OrderedDict[str, None] = OrderedDict((i, None) for i in recent_ids)

    def admit(self, item_id: str) -> int | None:
        """The seq for a new item, or None when this id is already in the inbox."""
        if item_id in self.recent:
            return None
        self.last_seq += 1
        self.remember(item_id)
        return self.last_seq

    def remember(self, item_id: str) -> None:
        self.recent[item_id] = None
        if len(self.recent) > RECENT_IDS:
            self.recent.popitem(last=False)


@dataclass
class ShardStats:
    events_seen: int = 0
    items_delivered: int = 0
    duplicates_dropped: int = 0
    errors: int = 0
    catch_ups: int = 0
    cache_rebuilds: int = 0
    records_skipped: int = 0
    items_restored: int = 0
    sessions: int = 0
    last_error: str = ""
    started: bool = False
    extra: dict[str, int] = field(default_factory=dict)


class SessionShard:
    """Hosts the Sessions of the users it owns and delivers their inbox items.

    Exactly-once into the inbox: every inbox record carries the events-log position it came
    from, and the shard's events watermark (the next position to deliver, per partition) is
    stored in the cache atomically with the items. After a restart, records below the watermark
    were delivered already and are skipped; after a wipe, the watermark is recomputed from the
    inbox log along with the items.
    """

    def __init__(self, index: int, count: int, cfg: PeerNetConfig, log_: EventLog,
                 cache: InboxCache, pubsub: PubSub) -> None:
        self.index = index
        self.count = count
        self._cfg = cfg
        self._log = log_
        self._cache = cache
        self._pubsub = pubsub
        self._sessions: dict[str, Session] = {}
        self._memberships = Memberships()
        self._checkpoint: dict[int, int] = {}  # inbox-topic offsets the cache holds
        # Positions delivered (the events watermark), per log read and partition.
        self._positions: dict[str, dict[int, int]] = {}
        self._version: int | None = None  # the cache checkpoint's version we last wrote
        self._loop: ConsumerLoop | None = None
        self._stopping = False
        self._queued = 0  # records of the batch in `process` not yet handled (queue_depth)
        self.stats = ShardStats()

    @property
    def checkpoint_name(self) -> str:
        # Offsets belong to one topic: a new inbox topic must never reuse an old checkpoint.
        # Its name before the `@` is the shard's: the Redis inbox cache groups keys by it.
        return f"{session_group(self.index, self.count)}@{self._cfg.topics.inbox}"

    @property
    def watermark_name(self) -> str:
        return self.watermark_name_of(self._cfg.topics.events)

    def watermark_name_of(self, topic: str) -> str:
        """The cache name of the events watermark of `topic` (a log this shard reads)."""
        return f"{self.checkpoint_name}#{topic}"

    def owns(self, user: str) -> bool:
        return shard_for(user, self.count) == self.index

    async def recover(self) -> None:
        """Bring the cache, the sessions and the events watermark up to the inbox log (what a
        restarted shard does before it delivers anything)."""
        await self._retry("catch up", self._catch_up)

    async def start(self) -> None:
        await self.recover()
        # The messages log carries DMs; the event log carries the social events that leave
        # notes (and the DMs written before the messages log existed).
        self._loop = ConsumerLoop(
            self._log, self.topics, f"peernet.sessions.{self.index}-of-{self.count}",
            lambda records: self.process(records), name=f"session-shard-{self.index}",
            on_error=self._count_error, max_records=self._cfg.shards.max_batch,
            # `process` retries its own steps with the seqs it assigned; run again after a
            # failure that escaped it, it would drop its items as already admitted.
            retry_handler=False, on_stopped=self._loop_stopped)
        await self._loop.start()
        self.stats.started = True
        log.info("session shard %d/%d started: %d sessions restored", self.index, self.count,
                 len(self._sessions))

    @property
    def topics(self) -> list[str]:
        return list(dict.fromkeys([self._cfg.topics.events, self._cfg.topics.messages]))

    async def lag(self) -> list[ConsumerLag]:
        """How far this shard's consumers trail the logs it reads (empty before `start`)."""
        return await self._loop.lag() if self._loop is not None else []

    def queue_depth(self) -> int:
        """Records fetched and not yet handled: those of a batch `process` holds, and those
        fetched that wait for it. A record for none of this shard's users, or one delivered
        already, is handled once examined; one with items for its users is handled once the
        batch's items are in the inbox log, the cache and published (they go in one append), so
        a shard stuck retrying that append reports them all. The catch-up on start is not
        counted."""
        return self._queued + (self._loop.waiting() if self._loop is not None else 0)

    async def stop(self) -> None:
        self._stopping = True
        if self._loop is not None:
            await self._loop.stop()

    # -- the delivery loop -------------------------------------------------------------------

    def _loop_stopped(self, exc: BaseException) -> None:
        # Every step of the loop catches its failures; one that still escapes has stopped the
        # delivery for good (retrying the batch could skip or renumber items), so the shard
        # says so: `started` goes false, which the gateways' health check reports.
        self.stats.started = False
        self.stats.errors += 1
        self.stats.last_error = f"delivery loop: {exc}"[:300]
        log.error("session shard %d: the delivery loop stopped", self.index, exc_info=exc)

    async def process(self, records: Sequence[Record]) -> None:
        """Deliver the events of `records` to the inboxes of the users this shard owns."""
        pending: list[tuple[str, Item, Source]] = []
        convs: list[ConversationOp] = []  # the conversation index's ops, in log order
        self._queued += len(records)
        handled = 0  # of `records`, counted off `_queued` already
        try:
            for record in records:
                self.stats.events_seen += 1
                held = len(pending)
                try:
                    if record.offset < self._position(record.topic).get(record.partition, 0):
                        # Delivered already (a redelivery after a crash before the commit).
                        self.stats.duplicates_dropped += sum(
                            1 for u in parse_recipients(record.headers) if self.owns(u))
                        continue
                    await self._collect(record, pending, convs)
                except Exception as exc:  # one bad record must not stop every user's delivery
                    self.stats.records_skipped += 1
                    self._count_error(f"event at {record.topic}/{record.partition}/{record.offset}", exc)
                finally:
                    if len(pending) == held:  # nothing of it waits for the append
                        self._queued -= 1
                        handled += 1
            for record in records:
                position = self._position(record.topic)
                position[record.partition] = max(position.get(record.partition, 0), record.offset + 1)
            if pending or convs:
                await self._persist(pending, convs)
        finally:
            self._queued -= len(records) - handled

    def _position(self, topic: str) -> dict[int, int]:
        """The next position to deliver of each partition of `topic` (the events watermark)."""
        return self._positions.setdefault(topic, {})

    async def _collect(self, record: Record, pending: list[tuple[str, Item, Source]],
                       convs: list[ConversationOp]) -> None:
        recipients = parse_recipients(record.headers)
        event: Event | None = None
        if is_group_record(record.key):
            # Every shard reads a group's changes, its users in it or not, to know the members
            # at each of the group's messages in the log's order (actors/groups.py).
            event = self._decode(record)
            if event is None:
                return
            recipients = self._memberships.recipients(event, recipients)
            self.stats.extra["group_sends_raced"] = self._memberships.raced
        mine = [u for u in recipients if self.owns(u)]
        if not mine:
            return
        event = event or self._decode(record)
        if event is None:
            return
        items = [(user, inbox_item(event, user)) for user in mine]  # raises before any admit
        # A conversation's position is its record's offset in the conversation's partition. A
        # message's op names the inboxes it entered (a duplicate record is no new message), so
        # it is made after the admits; the others' before, so that a malformed one raises
        # before any admit.
        message = event.type in MESSAGE_EVENTS
        op = None if message else conversation_op(event, record.offset, mine, notify=True)
        admitted = []
        for user, item in items:
            if item is None:
                continue
            session = await self._session(user)
            seq = session.admit(event.id)
            if seq is None:
                self.stats.duplicates_dropped += 1
                continue
            item["seq"] = seq
            pending.append((user, item, (record.partition, record.offset, record.topic)))
            admitted.append(user)
        if message:
            op = conversation_op(event, record.offset, admitted, notify=True)
        if op is not None:
            convs.append(op)

    def _decode(self, record: Record) -> Event | None:
        try:
            return Event.decode(record.value)
        except EnvelopeError as exc:
            self.stats.records_skipped += 1
            self._count_error("decode", exc)
            return None

    def _source(self, src: Source) -> list[object]:
        # Records of the event log keep the two-field form every inbox record had before the
        # messages log existed; others name their log.
        p, o, topic = src
        return [p, o] if topic == self._cfg.topics.events else [p, o, topic]

    async def _persist(self, pending: list[tuple[str, Item, Source]],
                       convs: Sequence[ConversationOp] = ()) -> None:
        topic = self._cfg.topics.inbox
        entries = [(user.encode(), pack({"user": user, "item": item, "src": self._source(src)}), ())
                   for user, item, src in pending]
        # Until the log has them, nothing else happens; the same seqs are retried, so a failed
        # attempt can leave a duplicate in the log but never a gap or a second numbering.
        appended = (await self._retry("append inbox", lambda: self._log.append_many(topic, entries))
                    if entries else [])
        for meta in appended:
            self._checkpoint[meta.partition] = max(self._checkpoint.get(meta.partition, 0),
                                                   meta.offset + 1)
        items = [(user, item) for user, item, _ in pending]
        if self._cache.publishes:
            # One Redis call for the batch: items, checkpoints and the pushes (each item as
            # stored, on its user's channel) together.
            channels = [user_channel(user) for user, _ in items]
            await self._retry("cache inbox", lambda: self._cache_append(items, channels, convs))
        else:
            await self._retry("cache inbox", lambda: self._cache_append(items, (), convs))
            await self._publish(items)
        self.stats.items_delivered += len(items)

    async def _cache_append(self, items: list[tuple[str, Item]], channels: Sequence[str] = (),
                            convs: Sequence[ConversationOp] = ()) -> None:
        try:
            await self._write_cache(items, channels, convs)
        except CacheBehind as exc:
            # The cache was wiped or lost its latest writes: rebuild it from the inbox log (which
            # already holds `items`), then write them again (a harmless replace).
            log.warning("session shard %d: %s; rebuilding the inbox cache from the log",
                        self.index, exc)
            self.stats.cache_rebuilds += 1
            await self._catch_up(behind=True)
            await self._write_cache(items, channels, convs)

    async def _write_cache(self, items: list[tuple[str, Item]], channels: Sequence[str] = (),
                           convs: Sequence[ConversationOp] = ()) -> None:
        self._version = await self._cache.append(
            items, checkpoint_name=self.checkpoint_name, checkpoint=self._checkpoint,
            also={self.watermark_name_of(t): pos for t, pos in self._positions.items()},
            expect_version=self._version, publish=channels, conversations=convs)

    async def _publish(self, items: list[tuple[str, Item]]) -> None:
        # Best effort: a connection that misses a push sees the gap and the item stays in the
        # inbox for `resume`.
        if not items:
            return
        try:
            await self._pubsub.publish_many([(user_channel(user), pack(item)) for user, item in items])
        except Exception as exc:
            self._count_error("publish", exc, trace=not isinstance(exc, PeerNetError))

    # -- sessions and recovery ---------------------------------------------------------------

    async def _session(self, user: str) -> Session:
        session = self._sessions.get(user)
        if session is None:
            recent = await self._retry("load session", lambda: self._cache.recent(user, RECENT_IDS))
            last = int(recent[-1]["seq"]) if recent else 0
            session = Session(user, last, [str(i["id"]) for i in recent])
            self._sessions[user] = session
            self.stats.sessions = len(self._sessions)
        return session

    async def _catch_up(self, *, behind: bool = False) -> None:
        """Replay the inbox topic from the cache's checkpoint into the cache (and sessions).

        Items past what was known to be cached were never pushed: they are published now.
        """
        self.stats.catch_ups += 1
        self._version = await self._cache.version(self.checkpoint_name)
        stored = await self._cache.checkpoint(self.checkpoint_name) or {}
        for topic in self.topics:
            stored_marks = await self._cache.checkpoint(self.watermark_name_of(topic)) or {}
            position = self._position(topic)
            for p, o in stored_marks.items():
                position[p] = max(position.get(p, 0), o)
        published_upto = dict(self._checkpoint) if behind else dict(stored)
        partitions = list(range(self._cfg.topics.inbox_partitions))
        reader = self._log.consumer(self._cfg.topics.inbox, partitions=partitions)
        await reader.start()
        try:
            for p in partitions:
                await reader.seek(p, stored.get(p, 0))
            ends = await reader.end_offsets()
            restored = 0
            while True:
                positions = await reader.positions()
                if all(positions.get(p, 0) >= ends.get(p, 0) for p in partitions):
                    break
                records = await reader.poll(max_records=self._cfg.shards.max_batch, timeout_ms=500)
                batch: list[tuple[str, Item]] = []
                unpublished: list[tuple[str, Item]] = []
                convs: list[ConversationOp] = []
                for record in records:
                    entry = unpack(record.value)
                    user, item = entry["user"], entry["item"]
                    if not self.owns(user):
                        continue
                    src = entry.get("src")
                    if src:
                        position = self._position(str(src[2]) if len(src) > 2 else self._cfg.topics.events)
                        position[src[0]] = max(position.get(src[0], 0), src[1] + 1)
                    session = self._sessions.get(user)
                    if session is None:
                        session = self._sessions[user] = Session(user, 0)
                    session.last_seq = max(session.last_seq, int(item["seq"]))
                    session.remember(str(item["id"]))
                    batch.append((user, item))
                    if record.offset >= published_upto.get(record.partition, 0):
                        unpublished.append((user, item))
                        if not behind:
                            convs.extend(self._restored_op(user, item, src))
                checkpoint = await reader.positions()
                self._checkpoint = {p: o for p, o in checkpoint.items()}
                if batch:
                    await self._write_cache(batch, (), convs)
                    await self._publish(unpublished)
                    restored += len(batch)
            if not restored:
                self._checkpoint = {p: max(ends.get(p, 0), stored.get(p, 0)) for p in partitions}
                await self._write_cache([])
            self.stats.items_restored += restored
            self.stats.sessions = len(self._sessions)
            log.info("session shard %d: catch-up restored %d items from the inbox log",
                     self.index, restored)
        finally:
            await reader.stop()

    def _restored_op(self, user: str, item: Item, src: Sequence[object] | None
                     ) -> list[ConversationOp]:
        """The conversation index's op of a message the inbox log holds and the cache never
        had (the shard died between the two): the index entry went with the cache write that
        never ran. A membership change's or a read's op cannot be made from the inbox log (a
        read is no inbox item): those of such a batch wait for `peernet replay`. After a wipe
        nothing is made here: without the markers every message would count as unread."""
        if item.get("t") != "msg" or not src or len(src) < 3 or src[2] != self._cfg.topics.messages:
            return []
        message = {k: v for k, v in item.items() if k not in ("t", "seq")}
        return [MessageOp(str(item["conv"]), int(str(src[1])), message, (user,))]

    async def _retry(self, what: str, action: Callable[[], Awaitable[T]]) -> T:
        # Retried, never skipped: the same seqs go again.
        return await until_ok(what, action, on_error=self._count_error,
                              stopping=lambda: self._stopping)

    def _count_error(self, what: str, exc: BaseException, trace: bool = False) -> None:
        self.stats.errors += 1
        self.stats.last_error = f"{what}: {exc}"
        log.warning("session shard %d: %s failed: %s", self.index, what, exc,
                    exc_info=exc if trace else None)
