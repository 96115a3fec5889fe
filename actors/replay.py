"""`peernet replay`: rebuild the Redis feeds, graph and like sets, the groups' membership, the
conversation index (every user's conversations, last messages, unread messages and read
markers) and the MongoDB projections from the logs, offset 0 to the end as of the start, by the same code the
FeedShards and the Projector run live (without live pushes); each group's state is written as
its membership changes leave it (bus/groups.py: a newer state is never overwritten by an older).

Every write is idempotent, so replaying twice, or while the server runs, leaves the same state.
`--wipe` first empties the feed keyspace and the projection collections, for a rebuild into empty
stores. Inbox caches are not touched: the SessionShards rebuild them from the inbox topic.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TextIO

from actors.conversations import ConversationRebuild
from actors.feed import FeedShard
from actors.groups import group_state, is_group_record
from actors.projector import PROJECTIONS, Projector
from bus.conversations import ConversationIndex
from bus.eventlog import EventLog, Record
from bus.feeds import FeedFanout
from bus.groups import Group, GroupStore
from bus.store import DocumentStore
from peernet.config import PeerNetConfig
from peernet.envelope import EnvelopeError, Event

BATCH = 1_000


@dataclass
class ReplayResult:
    records: int = 0
    social_events: int = 0
    group_changes: int = 0
    conversation_ops: int = 0
    feed_inserts: int = 0
    keys_wiped: int = 0
    documents_wiped: int = 0
    seconds: float = 0.0


class Progress:
    """A progress bar on a terminal, a line every few seconds otherwise."""

    def __init__(self, total: int, out: TextIO, *, every_s: float = 2.0) -> None:
        self.total = total
        self.out = out
        self.tty = out.isatty()
        self.every_s = every_s
        self.started = self._last = time.monotonic()

    def update(self, done: int, *, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last < (0.1 if self.tty else self.every_s):
            return
        self._last = now
        frac = done / self.total if self.total else 1.0
        rate = done / max(now - self.started, 1e-9)
        bar = "#" * int(frac * 30)
        line = (f"replay [{bar:<30}] {done:,}/{self.total:,} records ({frac:.0%}) "
                f"{rate:,.0f}/s")
        if self.tty:
            self.out.write("\r" + line + ("\n" if final else ""))
        else:
            self.out.write(line + "\n")
        self.out.flush()


def group_changes(records: Sequence[Record]) -> list[Group]:
    """The states that the membership changes among `records` leave, in log order."""
    states = []
    for record in records:
        if not is_group_record(record.key):
            continue
        try:
            state = group_state(Event.decode(record.value))
        except (EnvelopeError, KeyError, TypeError, ValueError):
            continue  # the projector counts it
        if state is not None:
            states.append(state)
    return states


async def replay(cfg: PeerNetConfig, log_: EventLog, feeds: FeedFanout, store: DocumentStore, *,
                 groups: GroupStore | None = None,
                 conversations: ConversationIndex | None = None, wipe: bool = False,
                 out: TextIO | None = None,
                 on_batch: Callable[[int], None] | None = None) -> ReplayResult:
    """Rebuild feeds and projections from the event log, and projections and (given `groups`)
    the groups' membership and (given `conversations`) the conversation index from the messages
    log (see the module docstring). With `wipe`, the groups go with the feed keyspace they share
    (bus/groups_redis.py); the conversation index is not wiped: its writes only merge (a marker
    forward, activity up, a state by version), so writing it again converges."""
    started = time.monotonic()
    result = ReplayResult()
    if wipe:
        result.keys_wiped = await feeds.clear()
        for collection in PROJECTIONS:
            result.documents_wiped += await store.clear(collection)
    shard = FeedShard(0, 1, cfg, log_, feeds, push=False)
    rebuild = ConversationRebuild()
    projector = Projector(cfg, log_, store)
    await projector.ensure_indexes()
    # The event log rebuilds feeds and projections; the messages log (DMs), projections only.
    logs = [(cfg.topics.events, cfg.topics.events_partitions, True)]
    if cfg.topics.messages != cfg.topics.events:
        logs.append((cfg.topics.messages, cfg.topics.messages_partitions, False))
    readers = []
    try:
        for topic, count, social in logs:
            partitions = list(range(count))
            reader = log_.consumer(topic, partitions=partitions)
            await reader.start()
            readers.append((reader, social))
            for p in partitions:
                await reader.seek(p, 0)
        ends = [await reader.end_offsets() for reader, _ in readers]
        progress = Progress(sum(sum(e.values()) for e in ends), out or sys.stderr)
        for (reader, social), end in zip(readers, ends, strict=True):
            while True:
                positions = await reader.positions()
                if all(positions.get(p, 0) >= end.get(p, 0) for p in end):
                    break
                records = await reader.poll(max_records=BATCH, timeout_ms=500)
                # Only up to the end as of the start: later records are the live consumers' own.
                records = [r for r in records if r.offset < end.get(r.partition, 0)]
                if not records:
                    continue
                if social:
                    result.social_events += await shard.process(records)
                if groups is not None:
                    states = group_changes(records)
                    await groups.put_many(states)
                    result.group_changes += len(states)
                if conversations is not None and (not social or cfg.topics.messages == cfg.topics.events):
                    ops = rebuild.ops(records)
                    await conversations.apply(ops)
                    result.conversation_ops += len(ops)
                await projector.apply(records)
                result.records += len(records)
                progress.update(result.records)
                if on_batch is not None:
                    on_batch(result.records)
        progress.update(result.records, final=True)
    finally:
        for reader, _ in readers:
            await reader.stop()
    result.feed_inserts = shard.stats.feed_inserts
    result.seconds = time.monotonic() - started
    return result


def run(cfg: PeerNetConfig, *, wipe: bool) -> int:
    """The `peernet replay` command."""
    from bus.backends import backends

    async def main() -> ReplayResult:
        b = backends(cfg, client_id="peernet-replay")
        await b.log.start()
        await b.store.start()
        try:
            return await replay(cfg, b.log, b.feeds, b.store, groups=b.groups,
                                conversations=b.conversations, wipe=wipe)
        finally:
            await b.log.stop()
            await b.store.stop()
            await b.feeds.close()
            await b.groups.close()

    from peernet.errors import PeerNetError

    try:
        r = asyncio.run(main())
    except PeerNetError as exc:
        print(f"peernet replay: {exc.message} (nothing is lost: run it again)", file=sys.stderr)
        return 1
    wiped = (f"; wiped {r.keys_wiped:,} keys and {r.documents_wiped:,} documents first"
             if wipe else "")
    print(f"peernet replay: {r.records:,} records ({r.social_events:,} social events, "
          f"{r.feed_inserts:,} feed entries, {r.group_changes:,} group changes, "
          f"{r.conversation_ops:,} conversation updates) "
          f"from {cfg.topics.events} and {cfg.topics.messages} "
          f"in {r.seconds:.1f}s{wiped}")
    return 0
