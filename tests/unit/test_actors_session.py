"""Per-user sessions and their shards (actors/session.py) on the in-memory event log, pub/sub
and inbox cache: seq assignment, ownership, ordering, the log -> cache -> publish path,
redelivery, restarts, a wiped cache and a crash between the log and the cache."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from unit_helpers import eventually, unit_cfg, users_of_shard

from actors.consuming import group_name
from actors.inbox_items import recipients_header
from actors.session import RECENT_IDS, Session, SessionShard, user_channel
from bus.cache_memory import MemoryCache
from bus.eventlog import Record
from bus.eventlog_memory import MemoryEventLog
from bus.inbox import Item
from bus.inbox_memory import MemoryInboxCache
from bus.pubsub_memory import MemoryPubSub
from bus.topics import peernet_topics
from peernet.codec import unpack
from peernet.config import PeerNetConfig
from peernet.envelope import Event
from serve.messaging import Messenger, Sent


class Crash(Exception):
    """The process dies here (not a PeerNetError: nothing retries it)."""


class CrashingInbox(MemoryInboxCache):
    """An inbox cache whose appends can be made to crash the caller."""

    crash = False

    async def append(self, items: Sequence[tuple[str, Item]], *, checkpoint_name: str,
                     checkpoint: Mapping[int, int], **kw: Any) -> int:
        if self.crash and items:
            raise Crash("killed between the inbox log append and the cache append")
        return await super().append(items, checkpoint_name=checkpoint_name, checkpoint=checkpoint,
                                    **kw)


@dataclass
class Rig:
    cfg: PeerNetConfig
    log: MemoryEventLog
    inbox: CrashingInbox
    pubsub: MemoryPubSub
    messenger: Messenger
    shards: list[SessionShard] = field(default_factory=list)
    clients: list[MemoryPubSub] = field(default_factory=list)
    watchers: list[MemoryPubSub] = field(default_factory=list)
    # (user, item) in the order pub/sub delivered them to the watcher.
    pushed: list[tuple[str, Item]] = field(default_factory=list)

    async def dm(self, sender: str, to: str, body: str = "hi") -> Sent:
        return await self.messenger.send_dm(sender, to, body, None)

    def events(self) -> list[Record]:
        """The records of the logs a shard reads: the social events', then the messages'."""
        return self.log.records(self.cfg.topics.events) + self.log.records(self.cfg.topics.messages)

    def inbox_log(self) -> list[tuple[str, Item]]:
        out = []
        for record in self.log.records(self.cfg.topics.inbox):
            entry = unpack(record.value)
            out.append((entry["user"], entry["item"]))
        return out

    async def items(self, user: str) -> list[Item]:
        return await self.inbox.read(user, 0, 100_000)

    async def pubsub_client(self) -> MemoryPubSub:
        client = self.pubsub.client()
        await client.start()
        self.clients.append(client)
        return client

    async def shard(self, index: int = 0, count: int = 1, *, start: bool = False,
                    inbox: MemoryInboxCache | None = None) -> SessionShard:
        log = self.log.client()  # each shard process has its own clients
        await log.start()
        shard = SessionShard(index, count, self.cfg, log, inbox or self.inbox.client(),
                             await self.pubsub_client())
        self.shards.append(shard)
        if start:
            await shard.start()
        return shard

    async def watch(self, *users: str) -> None:
        client = await self.pubsub_client()
        self.watchers.append(client)
        for user in users:
            await client.subscribe(user_channel(user),
                                   lambda channel, data: self.pushed.append((channel[2:], unpack(data))))

    async def settle(self) -> None:
        """Return once everything published so far has reached the watchers: a marker published
        now arrives after it on each watcher's connection, which keeps the order of publishes.
        (So "nothing more came" is checked, not guessed after a sleep.)"""
        marker = f"settle:{len(self.clients)}"
        arrived: list[str] = []
        for watcher in self.watchers:
            await watcher.subscribe(marker, lambda channel, data: arrived.append(channel))
        publisher = await self.pubsub_client()
        await publisher.publish(marker, b"")
        await eventually(lambda: len(arrived) == len(self.watchers))

    def committed_all(self, shard: SessionShard) -> bool:
        """Whether `shard`'s groups have committed every record of the logs it reads (read from
        the in-memory log's own table of commits: the seam has no such question)."""
        server = self.log._server
        for topic in shard.topics:
            group = group_name(f"peernet.sessions.{shard.index}-of-{shard.count}", topic)
            ends = {p: len(part) for p, part in enumerate(server.topics[topic]) if part}
            committed = server.committed.get((group, topic), {})
            if {p: committed.get(p) for p in ends} != ends:
                return False
        return True

    def pushed_to(self, user: str) -> list[Item]:
        return [item for u, item in self.pushed if u == user]


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    cfg = unit_cfg()
    log = MemoryEventLog()
    await log.start()
    await log.ensure_topics(peernet_topics(cfg))
    inbox = CrashingInbox(retention_items=cfg.shards.inbox_retention_items,
                          retention_ms=cfg.shards.inbox_retention_ms)
    gateway_log = log.client()  # the gateway's own client of the log
    await gateway_log.start()
    r = Rig(cfg, log, inbox, MemoryPubSub(), Messenger(cfg, gateway_log, MemoryCache()))
    yield r
    for shard in r.shards:
        with contextlib.suppress(Exception):
            await shard.stop()
    for client in r.clients:
        await client.stop()


def seqs(items: Sequence[Item]) -> list[int]:
    return [int(i["seq"]) for i in items]


def ids(items: Sequence[Item]) -> list[str]:
    return [str(i["id"]) for i in items]


# -- Session -----------------------------------------------------------------------------------


def test_admit_assigns_gap_free_seqs_after_the_last() -> None:
    session = Session("alice", 7)
    assert [session.admit(f"id{i}") for i in range(5)] == [8, 9, 10, 11, 12]
    assert session.last_seq == 12


def test_admit_drops_an_id_already_in_the_inbox() -> None:
    session = Session("alice", 0, ["old"])
    assert session.admit("old") is None
    assert session.admit("new") == 1
    assert session.admit("new") is None
    assert session.last_seq == 1


def test_admit_remembers_a_bounded_number_of_recent_ids() -> None:
    session = Session("alice", 0)
    for i in range(RECENT_IDS + 10):
        session.admit(f"id{i}")
    assert len(session.recent) == RECENT_IDS
    assert session.admit(f"id{RECENT_IDS + 9}") is None  # recent: still known
    assert session.admit("id0") == RECENT_IDS + 11  # forgotten: admitted again


# -- SessionShard.process ----------------------------------------------------------------------


async def test_a_shard_delivers_only_to_the_users_it_owns(rig: Rig) -> None:
    (mine,) = users_of_shard(0, 2, 1, "own")
    (theirs,) = users_of_shard(1, 2, 1, "other")
    await rig.watch(mine, theirs)
    await rig.dm(mine, theirs)
    await rig.dm(theirs, mine)
    shard = await rig.shard(0, 2)
    await shard.process(rig.events())
    assert [i["body"] for i in await rig.items(mine)] == ["hi", "hi"]
    assert await rig.items(theirs) == []
    assert {u for u, _ in rig.inbox_log()} == {mine}
    await eventually(lambda: len(rig.pushed) == 2)
    await rig.settle()
    assert len(rig.pushed) == 2 and {u for u, _ in rig.pushed} == {mine}
    assert shard.stats.events_seen == 2 and shard.stats.items_delivered == 2


async def test_the_recipients_header_decides_without_decoding(rig: Rig) -> None:
    shard = await rig.shard()
    # Not an event at all, but for nobody: skipped without an error.
    await rig.log.append(rig.cfg.topics.events, b"\xc1", key=b"k", headers=())
    await rig.log.append(rig.cfg.topics.events, b"\xc1", key=b"k",
                         headers=(recipients_header([]),))
    await shard.process(rig.events())
    assert shard.stats.errors == 0 and rig.inbox_log() == []


async def test_an_undecodable_event_is_counted_and_skipped(rig: Rig) -> None:
    shard = await rig.shard()
    await rig.log.append(rig.cfg.topics.events, b"\xc1", key=b"k",
                         headers=(recipients_header(["alice"]),))
    await rig.dm("bob", "alice", "after")
    await shard.process(rig.events())
    assert shard.stats.errors == 1
    assert [i["body"] for i in await rig.items("alice")] == ["after"]


async def test_seqs_are_gap_free_per_user(rig: Rig) -> None:
    users = ["ann", "ben", "cat"]
    for i in range(30):  # every pair, both ways, in a mixed order
        await rig.dm(users[i % 3], users[(i + 1 + (i // 3) % 2) % 3], f"m{i}")
    shard = await rig.shard()
    events = rig.events()
    for start in range(0, len(events), 7):  # in several batches
        await shard.process(events[start:start + 7])
    for user in users:
        items = await rig.items(user)
        assert seqs(items) == list(range(1, len(items) + 1)), user
        assert len(set(ids(items))) == len(items)
    assert sum([len(await rig.items(u)) for u in users]) == 60


async def test_one_conversation_has_the_same_order_in_both_inboxes(rig: Rig) -> None:
    for i in range(20):
        await rig.dm("alice" if i % 3 else "bob", "bob" if i % 3 else "alice", f"m{i}")
        await rig.dm("alice", "carol", f"other{i}")  # another conversation in between
    shard = await rig.shard()
    await shard.process(rig.events())
    alice = [i for i in await rig.items("alice") if i["conv"] == "dm:alice:bob"]
    bob = await rig.items("bob")
    assert len(bob) == 20
    assert ids(alice) == ids(bob)
    assert [i["body"] for i in bob] == [f"m{i}" for i in range(20)]


async def test_an_item_is_a_msg_frame_with_seq(rig: Rig) -> None:
    sent = await rig.dm("alice", "bob", "hello")
    shard = await rig.shard()
    await shard.process(rig.events())
    (item,) = await rig.items("bob")
    assert item == {"t": "msg", "seq": 1, "id": sent.id, "conv": "dm:alice:bob", "from": "alice",
                    "to": "bob", "body": "hello", "ts": sent.ts}
    assert await rig.items("alice") == [item]  # the sender's other devices stay in sync


async def test_follow_and_like_events_become_notes(rig: Rig) -> None:
    follow = Event("follow", "alice", {"user": "bob"})
    like = Event("like", "carol", {"post": "p1"})
    other = Event("post", "bob", {"body": "not an inbox item"})
    for event in (follow, like, other):
        await rig.log.append(rig.cfg.topics.events, event.encode(), key=b"k",
                             headers=(recipients_header(["bob"]),))
    shard = await rig.shard()
    await shard.process(rig.events())
    assert await rig.items("bob") == [
        {"t": "note", "seq": 1, "id": follow.id, "kind": "follow", "from": "alice", "ts": follow.ts},
        {"t": "note", "seq": 2, "id": like.id, "kind": "like", "from": "carol", "ts": like.ts,
         "post": "p1"},
    ]


class CheckingInbox(CrashingInbox):
    """Records a violation when an item reaches the cache before the inbox log."""

    log: MemoryEventLog
    topic: str
    trail: list[str]

    async def append(self, items: Sequence[tuple[str, Item]], *, checkpoint_name: str,
                     checkpoint: Mapping[int, int], **kw: Any) -> int:
        logged = set()
        for record in self.log.records(self.topic):
            entry = unpack(record.value)
            logged.add((entry["user"], entry["item"]["id"], entry["item"]["seq"]))
        for user, item in items:
            self.trail.append("cache" if (user, item["id"], item["seq"]) in logged
                              else f"cache-before-log:{user}:{item['seq']}")
        return await super().append(items, checkpoint_name=checkpoint_name,
                                    checkpoint=checkpoint, **kw)


class CheckingPubSub(MemoryPubSub):
    """Records a violation when an item is published before it is in the cache."""

    inbox: MemoryInboxCache
    trail: list[str]

    async def publish(self, channel: str, payload: bytes) -> int:
        item = unpack(payload)
        cached = await self.inbox.read(channel[2:], int(item["seq"]) - 1, 1)
        self.trail.append("publish" if cached == [item]
                          else f"publish-before-cache:{channel}:{item['seq']}")
        return await super().publish(channel, payload)


async def test_items_go_to_the_inbox_log_then_the_cache_then_pubsub(rig: Rig) -> None:
    trail: list[str] = []
    inbox = CheckingInbox(retention_items=100, retention_ms=10**9)
    inbox.log, inbox.topic, inbox.trail = rig.log, rig.cfg.topics.inbox, trail
    pubsub = CheckingPubSub()
    pubsub.inbox, pubsub.trail = inbox, trail
    await pubsub.start()
    rig.clients.append(pubsub)
    for i in range(5):
        await rig.dm("alice", "bob", f"m{i}")
    shard = SessionShard(0, 1, rig.cfg, rig.log, inbox, pubsub)
    await shard.process(rig.events())
    assert trail and all(step in ("cache", "publish") for step in trail), trail
    assert trail.count("publish") == 10
    assert trail.index("publish") > max(i for i, s in enumerate(trail) if s == "cache")
    assert len(rig.inbox_log()) == 10


async def test_items_are_published_on_the_users_channel(rig: Rig) -> None:
    await rig.watch("alice", "bob")
    sent = await rig.dm("alice", "bob")
    shard = await rig.shard()
    await shard.process(rig.events())
    await eventually(lambda: len(rig.pushed) == 2)
    assert sorted(u for u, _ in rig.pushed) == ["alice", "bob"]
    assert all(item["id"] == sent.id and item["seq"] == 1 for _, item in rig.pushed)


async def test_a_cache_that_publishes_stores_and_pushes_a_batch_in_one_call(rig: Rig) -> None:
    """With an inbox cache on the pub/sub's server (Redis in production), a batch's items,
    checkpoints and pushes are one append call: the shard publishes nothing itself."""
    await rig.watch("alice", "bob", "carol")
    for to in ("bob", "carol"):
        await rig.dm("alice", to)
    calls: list[int] = []

    class Counting(MemoryInboxCache):
        async def append(self, items, **kw):  # type: ignore[no-untyped-def]
            calls.append(len(kw.get("publish", ())))
            return await super().append(items, **kw)

    publisher = await rig.pubsub_client()
    own_pubsub = await rig.pubsub_client()
    cache = Counting(retention_items=100, retention_ms=10**9, pubsub=publisher)
    log = rig.log.client()
    await log.start()
    shard = SessionShard(0, 1, rig.cfg, log, cache, own_pubsub)
    await shard.process(rig.events())
    assert calls == [4]  # alice twice, bob and carol: one call with four pushes
    await eventually(lambda: len(rig.pushed) == 4)
    await rig.settle()  # nothing more comes: the shard did not publish them again
    assert sorted(u for u, _ in rig.pushed) == ["alice", "alice", "bob", "carol"]
    assert [i["seq"] for i in await cache.read("alice", 0, 10)] == [1, 2]


async def test_a_redelivered_batch_adds_no_duplicate(rig: Rig) -> None:
    await rig.watch("alice", "bob")
    for i in range(5):
        await rig.dm("alice", "bob", f"m{i}")
    shard = await rig.shard()
    await shard.process(rig.events())
    before = await rig.items("bob")
    await shard.process(rig.events())
    assert await rig.items("bob") == before
    assert len(rig.inbox_log()) == 10
    assert shard.stats.duplicates_dropped == 10
    await rig.settle()
    assert len(rig.pushed) == 10


async def test_a_redelivered_batch_after_a_restart_adds_no_duplicate(rig: Rig) -> None:
    for i in range(5):
        await rig.dm("alice", "bob", f"m{i}")
    first = await rig.shard(start=True)
    await eventually(lambda: first.stats.items_delivered == 10)
    await first.stop()
    again = await rig.shard()  # a new process; the sessions come from the cache
    await again.process(rig.events())
    assert seqs(await rig.items("bob")) == [1, 2, 3, 4, 5]
    assert again.stats.duplicates_dropped == 10
    assert len(rig.inbox_log()) == 10


async def test_dms_of_the_event_log_and_of_the_messages_log_share_one_inbox_and_each_watermark(
        rig: Rig) -> None:
    """DMs written before the messages log existed are in the event log: a shard reads both,
    numbers them in one inbox, and after a restart skips what it delivered from either log."""
    old = Event("dm", "alice", {"to": "bob", "body": "old", "conv": "dm:alice:bob"})
    await rig.log.append(rig.cfg.topics.events, old.encode(), key=b"dm:alice:bob",
                         headers=(recipients_header(["alice", "bob"]),))
    first = await rig.shard(start=True)
    await eventually(lambda: first.stats.items_delivered == 2)
    await rig.dm("alice", "bob", "new")
    await eventually(lambda: first.stats.items_delivered == 4)
    assert [i["body"] for i in await rig.items("bob")] == ["old", "new"]
    assert seqs(await rig.items("bob")) == [1, 2]
    sources = [unpack(r.value)["src"] for r in rig.log.records(rig.cfg.topics.inbox)]
    assert sorted(len(src) for src in sources) == [2, 2, 3, 3]  # the messages log is named
    assert {src[2] for src in sources if len(src) > 2} == {rig.cfg.topics.messages}
    await first.stop()
    again = await rig.shard()  # a new process: the watermarks come from the cache
    await again.recover()
    await again.process(rig.events())
    assert again.stats.duplicates_dropped == 4
    assert seqs(await rig.items("bob")) == [1, 2]


async def test_a_failing_cache_append_is_retried_until_it_succeeds(rig: Rig) -> None:
    await rig.dm("alice", "bob")
    shard = await rig.shard()
    rig.inbox.set_down(True)
    task = asyncio.create_task(shard.process(rig.events()))
    await eventually(lambda: shard.stats.errors >= 2)
    assert not task.done()
    rig.inbox.set_down(False)
    await asyncio.wait_for(task, 5)
    assert seqs(await rig.items("bob")) == [1]
    assert len(rig.inbox_log()) == 2  # the log append was not repeated


# -- restarts, a wiped cache, a crash ----------------------------------------------------------


async def test_a_restarted_shard_continues_seqs_without_gaps(rig: Rig) -> None:
    first = await rig.shard(start=True)
    for i in range(4):
        await rig.dm("alice", "bob", f"a{i}")
    await eventually(lambda: first.stats.items_delivered == 8)
    await first.stop()
    for i in range(3):
        await rig.dm("bob", "alice", f"b{i}")
    second = await rig.shard(start=True)
    await eventually(lambda: second.stats.items_delivered == 6)
    for user in ("alice", "bob"):
        items = await rig.items(user)
        assert seqs(items) == list(range(1, 8)), user
        assert len(set(ids(items))) == 7
    assert second.stats.duplicates_dropped == 0


async def test_a_wiped_cache_is_rebuilt_from_the_inbox_log(rig: Rig) -> None:
    await rig.watch("alice", "bob")
    for i in range(3):
        await rig.dm("alice", "bob", f"m{i}")
    shard = await rig.shard()
    await shard.process(rig.events())
    rig.inbox.wipe()
    await rig.dm("bob", "alice", "after the wipe")
    await shard.process(rig.events()[-1:])
    for user in ("alice", "bob"):
        items = await rig.items(user)
        assert seqs(items) == [1, 2, 3, 4], user
        assert items[-1]["body"] == "after the wipe"
    assert await rig.inbox.checkpoint(shard.checkpoint_name) is not None
    await eventually(lambda: len(rig.pushed) == 8)
    await rig.settle()
    assert len(rig.pushed) == 8  # the rebuild re-published nothing


async def test_a_shard_started_on_a_wiped_cache_rebuilds_it_and_continues_the_seq(rig: Rig) -> None:
    for i in range(3):
        await rig.dm("alice", "bob", f"m{i}")
    first = await rig.shard(start=True)
    await eventually(lambda: first.stats.items_delivered == 6)
    await first.stop()
    rig.inbox.wipe()
    second = await rig.shard(start=True)
    assert seqs(await rig.items("bob")) == [1, 2, 3]
    assert second.stats.items_restored == 6
    await rig.dm("bob", "alice", "next")
    await eventually(lambda: second.stats.items_delivered == 2)
    assert seqs(await rig.items("alice")) == [1, 2, 3, 4]
    assert seqs(await rig.items("bob")) == [1, 2, 3, 4]


async def test_items_in_the_log_but_not_the_cache_are_restored_and_published_on_start(
        rig: Rig) -> None:
    await rig.watch("alice", "bob")
    first = await rig.shard(start=True, inbox=rig.inbox)
    await rig.dm("alice", "bob", "before")
    await eventually(lambda: first.stats.items_delivered == 2)
    rig.inbox.crash = True
    lost = [await rig.dm("bob", "alice", f"lost{i}") for i in range(3)]
    await eventually(lambda: len(rig.inbox_log()) == 8)  # durable in the inbox log ...
    # ... the cache append was tried and crashed (the shard retries it until stopped) ...
    await eventually(lambda: first.stats.last_error.startswith("cache inbox"))
    assert seqs(await rig.items("alice")) == [1]  # ... but not in the cache
    with contextlib.suppress(Crash):
        await first.stop()
    rig.inbox.crash = False

    second = await rig.shard(start=True)
    assert second.stats.items_restored == 6
    for user in ("alice", "bob"):
        items = await rig.items(user)
        assert seqs(items) == [1, 2, 3, 4], user
        assert ids(items)[1:] == [s.id for s in lost]
    # The conversation index gets the restored messages too (written with the items).
    for user, unread in (("alice", 3), ("bob", 1)):
        (entry,) = (await rig.inbox.conversations().page(user, 5, None)).items
        assert entry.last is not None and entry.last["id"] == lost[-1].id
        assert entry.unread == unread, user
    # The restored items are pushed once; the redelivered events add nothing.
    await eventually(lambda: len(rig.pushed) == 8)
    await rig.dm("alice", "bob", "next")
    await eventually(lambda: len(rig.pushed) == 10)
    for user in ("alice", "bob"):
        assert seqs(rig.pushed_to(user)) == [1, 2, 3, 4, 5], user
    assert second.stats.duplicates_dropped == 6


# -- failures that once were bugs ---------------------------------------------------------------


async def test_a_malformed_event_does_not_stop_delivery(rig: Rig) -> None:
    poison = Event("dm", "bob", {"to": "alice", "conv": "dm:alice:bob"})  # no body
    await rig.log.append(rig.cfg.topics.events, poison.encode(), key=b"dm:alice:bob",
                         headers=(recipients_header(["alice", "bob"]),))
    await rig.dm("bob", "alice", "good")
    shard = SessionShard(0, 1, rig.cfg, rig.log, rig.inbox, await rig.pubsub_client())
    await shard.start()
    try:
        await eventually(lambda: shard.stats.items_delivered == 2, within_s=0.5)
        assert [i["body"] for i in await rig.items("alice")] == ["good"]
    finally:
        with contextlib.suppress(Exception):
            await shard.stop()


async def test_a_wipe_between_periodic_checks_is_noticed_by_the_next_append(rig: Rig) -> None:
    for i in range(3):
        await rig.dm("alice", "bob", f"m{i}")
    shard = await rig.shard()
    await shard.process(rig.events())
    rig.inbox.wipe()  # e.g. Redis restarted without persistence; redis-py reconnects silently
    await rig.dm("alice", "bob", "after")
    await shard.process(rig.events()[-1:])
    assert seqs(await rig.items("bob")) == [1, 2, 3, 4]


async def test_seqs_stay_unique_after_an_unnoticed_wipe_and_a_restart(rig: Rig) -> None:
    first = await rig.shard(start=True)
    for i in range(3):
        await rig.dm("bob", "carol", f"m{i}")
    await eventually(lambda: first.stats.items_delivered == 6)
    rig.inbox.wipe()
    await rig.dm("alice", "dave", "someone else, right after the wipe")
    await eventually(lambda: first.stats.items_delivered == 8)
    await eventually(lambda: rig.committed_all(first))
    await first.stop()
    second = await rig.shard(start=True)
    await rig.dm("bob", "carol", "next")
    await eventually(lambda: second.stats.items_delivered >= 2)
    assert seqs(await rig.items("carol"))[-1] == 4


async def test_a_redelivered_batch_larger_than_the_remembered_ids_adds_no_duplicate(rig: Rig
                                                                                     ) -> None:
    assert RECENT_IDS < rig.cfg.shards.max_batch
    for i in range(300):
        await rig.dm("bob", "alice", f"m{i}")
    first = await rig.shard()
    await first.process(rig.events())  # cached, then the process died before its commit
    again = await rig.shard()
    await again.recover()  # what a restarted shard does first
    await again.process(rig.events())  # the uncommitted batch comes again
    assert len(await rig.items("alice")) == 300


async def test_a_second_copy_of_an_event_in_the_log_is_one_inbox_item(rig: Rig) -> None:
    """The lost-ack case: an append reported `unavailable` landed all the same, and the cid
    retry wrote the same event (same id) again at a later offset. Each inbox holds it once,
    also when the shard restarted between the two copies."""
    await rig.dm("alice", "bob", "first")
    (original,) = rig.events()
    first = await rig.shard()
    await first.process(rig.events())
    await rig.dm("alice", "bob", "between")
    await rig.log.append(rig.cfg.topics.events, original.value, key=original.key,
                         headers=original.headers)
    again = await rig.shard()  # a restarted shard: its sessions come back from the cache
    await again.process(rig.events())
    for user in ("alice", "bob"):
        items = await rig.items(user)
        assert [i["body"] for i in items] == ["first", "between"], user
        assert seqs(items) == [1, 2]
    assert again.stats.duplicates_dropped >= 2


class GatedInbox(CrashingInbox):
    """An inbox cache whose appends wait until `gate` is set (a slow Redis)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.gate = asyncio.Event()
        self.waiting = 0

    async def append(self, items: Sequence[tuple[str, Item]], *, checkpoint_name: str,
                     checkpoint: Mapping[int, int], **kw: Any) -> int:
        if items:
            self.waiting += 1
            await self.gate.wait()
        return await super().append(items, checkpoint_name=checkpoint_name, checkpoint=checkpoint,
                                    **kw)


async def test_the_queue_depth_counts_the_records_held_until_their_items_are_delivered(
        rig: Rig) -> None:
    mine = users_of_shard(0, 2, 2, "own")
    theirs = users_of_shard(1, 2, 2, "other")
    await rig.dm(mine[0], mine[1], "held")
    await rig.dm(theirs[0], theirs[1], "not for shard 0")
    await rig.dm(theirs[0], mine[0], "held too")
    await rig.dm(theirs[1], theirs[0], "not for shard 0 either")
    inbox = GatedInbox(retention_items=100, retention_ms=10**9)
    shard = await rig.shard(0, 2, inbox=inbox)
    assert shard.queue_depth() == 0
    processing = asyncio.create_task(shard.process(rig.events()))
    await eventually(lambda: inbox.waiting)
    # The records for nobody here were handled once examined; the two with items wait for the
    # batch's cache append.
    assert shard.queue_depth() == 2
    inbox.gate.set()
    await processing
    assert shard.queue_depth() == 0
    assert [i["body"] for i in await inbox.read(mine[0], 0, 10)] == ["held", "held too"]
    # A redelivered batch is handled record by record, without holding anything.
    await shard.process(rig.events())
    assert shard.queue_depth() == 0


async def test_the_queue_depth_of_a_running_shard_goes_back_to_zero(rig: Rig) -> None:
    inbox = GatedInbox(retention_items=100, retention_ms=10**9)
    shard = await rig.shard(inbox=inbox, start=True)
    for i in range(3):
        await rig.dm("alice", "bob", f"m{i}")
    await eventually(lambda: inbox.waiting)
    assert 1 <= shard.queue_depth() <= 3  # the poll may have taken the first DM alone
    inbox.gate.set()
    await eventually(lambda: shard.stats.items_delivered == 6)
    await eventually(lambda: shard.queue_depth() == 0)
