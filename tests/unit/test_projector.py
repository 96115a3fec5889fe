"""The Projector's write path (actors/projector.py): which documents reach the store of record, and
how often, on the in-memory document store."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from actors.projector import Projector, WrittenUsers
from bus.eventlog import Record
from bus.eventlog_memory import MemoryEventLog
from bus.store import Document
from bus.store_memory import MemoryDocumentStore
from peernet.config import PeerNetConfig, load_config
from peernet.envelope import Event
from peernet.errors import PeerNetError, unavailable


class CountingStore(MemoryDocumentStore):
    """Records every write as (method, collection, ids); `fail_users` makes the next inserts of
    users raise unavailable (MongoDB away)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[str, str, list[Any]]] = []
        self.fail_users = 0

    async def insert_new(self, collection: str, docs: Sequence[Document]) -> None:
        if collection == "users" and self.fail_users:
            self.fail_users -= 1
            raise unavailable("mongo away")
        self.writes.append(("insert_new", collection, [d["_id"] for d in docs]))
        await super().insert_new(collection, docs)

    async def upsert_many(self, collection: str, docs: Sequence[Document]) -> None:
        self.writes.append(("upsert_many", collection, [d["_id"] for d in docs]))
        await super().upsert_many(collection, docs)

    def written(self, collection: str) -> list[Any]:
        return [i for _, c, ids in self.writes if c == collection for i in ids]


@pytest.fixture
def cfg() -> PeerNetConfig:
    return load_config({})


class Log:
    """Records as the events topic would hold them, one partition, offsets from 0."""

    def __init__(self) -> None:
        self.offset = 0

    def record(self, event: Event, *, offset: int | None = None) -> Record:
        if offset is None:
            offset, self.offset = self.offset, self.offset + 1
        return Record("events", 0, offset, None, event.encode(), (), event.ts)

    def dm(self, a: str, b: str, body: str = "hi") -> Record:
        conv = f"dm:{min(a, b)}:{max(a, b)}"
        return self.record(Event("dm", a, {"to": b, "body": body, "conv": conv}))

    def follow(self, a: str, b: str, on: bool = True) -> Record:
        return self.record(Event("follow" if on else "unfollow", a, {"user": b}))


def projector(cfg: PeerNetConfig, store: MemoryDocumentStore, **kw: Any) -> Projector:
    return Projector(cfg, MemoryEventLog(), store, **kw)


async def test_users_are_written_once_per_projector_not_per_event(cfg: PeerNetConfig) -> None:
    store, log = CountingStore(), Log()
    p = projector(cfg, store)
    await p.apply([log.dm("a", "b"), log.dm("b", "a"), log.dm("a", "c")])
    await p.apply([log.dm("a", "b"), log.dm("c", "a"), log.follow("b", "c")])
    assert sorted(store.written("users")) == ["a", "b", "c"]
    assert len(store.written("messages")) == 5
    # Messages, notes and users are inserted; only follows (and likes) are upserts.
    assert {(m, c) for m, c, _ in store.writes} == {
        ("insert_new", "users"), ("insert_new", "messages"), ("insert_new", "notes"),
        ("upsert_many", "follows")}
    # A new projector (a restart) writes them again, which leaves the store as it was.
    before = await store.documents("users")
    await projector(cfg, store).apply([log.dm("a", "b")])
    assert sorted(store.written("users")) == ["a", "a", "b", "b", "c"]
    assert await store.documents("users") == before


async def test_users_of_a_failed_write_are_written_when_the_batch_is_retried(
        cfg: PeerNetConfig) -> None:
    store, log = CountingStore(), Log()
    p = projector(cfg, store)
    batch = [log.dm("a", "b")]
    store.fail_users = 1
    with pytest.raises(PeerNetError):
        await p.apply(batch)
    await p.apply(batch)  # the projector's retry of the whole batch
    assert [d["_id"] for d in await store.documents("users")] == ["a", "b"]
    await p.apply([log.dm("b", "a")])
    assert sorted(store.written("users")) == ["a", "b"]


async def test_remembered_users_are_bounded_and_a_forgotten_one_is_written_again(
        cfg: PeerNetConfig) -> None:
    store, log = CountingStore(), Log()
    p = projector(cfg, store, remembered_users=2)
    await p.apply([log.dm("a", "b")])
    await p.apply([log.dm("c", "d")])  # a and b forgotten
    await p.apply([log.dm("c", "a")])  # c still known
    assert store.written("users") == ["a", "b", "c", "d", "a"]
    assert len(await store.documents("users")) == 4


def test_written_users_keep_the_most_recently_seen() -> None:
    users = WrittenUsers(2)
    users.add(["a", "b"])
    assert users.seen("a")  # now the most recent
    users.add(["c"])
    assert users.seen("a") and users.seen("c") and not users.seen("b")
    assert len(users) == 2
    none = WrittenUsers(0)
    none.add(["a"])
    assert not none.seen("a")


async def test_follow_and_unfollow_in_one_batch_end_as_the_last_one_says(
        cfg: PeerNetConfig) -> None:
    store, log = CountingStore(), Log()
    p = projector(cfg, store)
    await p.apply([log.follow("a", "b"), log.follow("c", "d")])
    await p.apply([log.follow("a", "b", on=False), log.follow("a", "b"),
                   log.follow("a", "b", on=False),
                   log.follow("c", "d", on=False), log.follow("c", "d"),
                   log.follow("e", "f"), log.follow("e", "f", on=False)])
    assert [d["_id"] for d in await store.documents("follows")] == ["c:d"]
    # every follow noted the followed, unfollowed since or not
    assert len(await store.documents("notes")) == 5


async def test_a_record_the_log_holds_twice_keeps_its_first_position(
        cfg: PeerNetConfig) -> None:
    """Replaying the log changes nothing, and an event the log holds twice (a producer's retry)
    keeps its first offset as `pos` whether both copies are in one batch or not."""
    conv = "dm:a:b"
    event = Event("dm", "a", {"to": "b", "body": "once", "conv": conv})
    log = Log()
    first, again = log.record(event, offset=5), log.record(event, offset=9)
    for batches in ([[first, again]], [[first], [again]]):
        store = CountingStore()
        p = projector(cfg, store)
        for batch in batches:
            await p.apply(batch)
        (doc,) = await store.documents("messages")
        assert doc["pos"] == 5
        await projector(cfg, store).apply([first, again])  # a replay from offset 0
        assert await store.documents("messages") == [doc]
