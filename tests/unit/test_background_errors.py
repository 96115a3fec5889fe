"""Background loops survive a failure of one iteration: each failure is counted (the shards'
stats, the gateway's peernet_background_errors_total) and the next item is still processed.
Failures are injected as plain exceptions (bugs), not PeerNetError (a backend away), which the
loops always retried."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.websockets import WebSocketDisconnect, WebSocketState
from unit_helpers import eventually, unit_cfg

from actors.feed import FeedShard
from actors.inbox_items import RECIPIENTS_HEADER, recipients_header
from actors.presence import LeaseTiming
from actors.projector import Projector
from actors.session import SessionShard, user_channel
from bus.eventlog import Record
from bus.eventlog_memory import MemoryEventLog
from bus.feeds_memory import MemoryFeedStore
from bus.inbox_memory import MemoryInboxCache
from bus.presence_memory import MemoryPresenceStore
from bus.pubsub_memory import MemoryPubSub
from bus.store_memory import MemoryDocumentStore
from bus.topics import peernet_topics
from peernet.config import PeerNetConfig
from peernet.envelope import Event
from peernet.errors import CloseCode, unavailable
from serve import metrics
from serve.acks import AckBuffer
from serve.connection import Connection
from serve.hub import Hub
from serve.presence import ReplicaPresence, Watchers


class Bug(Exception):
    """An unexpected failure: not a PeerNetError."""


def fail_next(obj: Any, name: str, exc: BaseException, *, times: int = 1,
              after: int = 0) -> list[int]:
    """Make `obj.name` (an async method) raise `exc` `times` times, after `after` good calls.
    Returns a one-element list counting every call."""
    real: Callable[..., Awaitable[Any]] = getattr(obj, name)
    calls = [0]

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if after < calls[0] <= after + times:
            raise exc
        return await real(*args, **kwargs)

    setattr(obj, name, wrapper)
    return calls


def background_errors(loop: str) -> float:
    return metrics.REGISTRY.get_sample_value("peernet_background_errors_total",
                                             {"loop": loop}) or 0.0


async def client_of(log: MemoryEventLog) -> MemoryEventLog:
    """The log as another process reads it (each shard has its own client)."""
    client = log.client()
    await client.start()
    return client


@pytest.fixture
async def log() -> AsyncIterator[MemoryEventLog]:
    log = MemoryEventLog()
    await log.start()
    await log.ensure_topics(peernet_topics(unit_cfg()))
    yield log
    await log.stop()


async def dm(cfg: PeerNetConfig, log: MemoryEventLog, sender: str, to: str, body: str) -> Event:
    event = Event("dm", sender, {"to": to, "body": body, "conv": f"dm:{sender}:{to}"})
    await log.append(cfg.topics.events, event.encode(), key=event.data["conv"].encode(),
                     headers=(recipients_header([sender, to]),))
    return event


async def post(cfg: PeerNetConfig, log: MemoryEventLog, author: str, body: str) -> Event:
    event = Event("post", author, {"body": body})
    await log.append(cfg.topics.events, event.encode(), key=author.encode())
    return event


# -- SessionShard ------------------------------------------------------------------------------


async def session_shard(log: MemoryEventLog,
                        pubsub: MemoryPubSub) -> tuple[SessionShard, MemoryInboxCache]:
    cfg = unit_cfg()
    inbox = MemoryInboxCache(retention_items=100, retention_ms=10**9)
    await pubsub.start()
    shard = SessionShard(0, 1, cfg, await client_of(log), inbox, pubsub)
    await shard.start()
    return shard, inbox


async def bodies(inbox: MemoryInboxCache, user: str) -> list[str]:
    return [str(i["body"]) for i in await inbox.read(user, 0, 100)]


async def test_a_session_shard_poll_that_raises_is_counted_and_the_loop_goes_on(
        log: MemoryEventLog) -> None:
    cfg = unit_cfg()
    shard, inbox = await session_shard(log, MemoryPubSub())
    try:
        assert shard._loop is not None
        fail_next(shard._loop.consumer(cfg.topics.events), "poll", Bug("poll broke"))
        await eventually(lambda: shard.stats.errors == 1)
        assert shard.stats.last_error.startswith("poll")
        await dm(cfg, log, "alice", "bob", "after")
        await eventually(lambda: shard.stats.items_delivered == 2)
        assert await bodies(inbox, "bob") == ["after"]
        assert shard.stats.started
    finally:
        await shard.stop()


async def test_a_session_shard_cache_append_that_raises_is_retried_and_counted(
        log: MemoryEventLog) -> None:
    cfg = unit_cfg()
    shard, inbox = await session_shard(log, MemoryPubSub())
    try:
        fail_next(inbox, "append", Bug("cache append broke"))
        await dm(cfg, log, "alice", "bob", "first")
        await eventually(lambda: shard.stats.items_delivered == 2)
        assert shard.stats.errors == 1 and shard.stats.last_error.startswith("cache inbox")
        await dm(cfg, log, "alice", "bob", "second")
        await eventually(lambda: shard.stats.items_delivered == 4)
        assert await bodies(inbox, "bob") == ["first", "second"]
        assert [int(i["seq"]) for i in await inbox.read("bob", 0, 100)] == [1, 2]
    finally:
        await shard.stop()


async def test_a_session_shard_publish_that_raises_is_counted_and_the_loop_goes_on(
        log: MemoryEventLog) -> None:
    cfg = unit_cfg()
    pubsub = MemoryPubSub()
    shard, inbox = await session_shard(log, pubsub)
    watcher = pubsub.client()
    await watcher.start()
    pushed: list[bytes] = []
    await watcher.subscribe(user_channel("bob"), lambda _c, data: pushed.append(data))
    try:
        fail_next(pubsub, "publish_many", Bug("publish broke"))
        await dm(cfg, log, "alice", "bob", "first")
        await eventually(lambda: shard.stats.items_delivered == 2)
        assert shard.stats.errors == 1 and shard.stats.last_error.startswith("publish")
        await dm(cfg, log, "alice", "bob", "second")
        await eventually(lambda: len(pushed) == 1)  # the second one, pushed
        assert await bodies(inbox, "bob") == ["first", "second"]
    finally:
        await watcher.stop()
        await shard.stop()


async def test_a_redelivered_record_with_a_bad_header_is_skipped_not_fatal(
        log: MemoryEventLog) -> None:
    cfg = unit_cfg()
    shard, inbox = await session_shard(log, MemoryPubSub())
    try:
        await dm(cfg, log, "alice", "bob", "first")
        await eventually(lambda: shard.stats.items_delivered == 2)
        (record,) = log.records(cfg.topics.events)
        bad = Record(record.topic, record.partition, record.offset, record.key, record.value,
                     ((RECIPIENTS_HEADER, b"\xff\xfe"),), record.timestamp)
        await shard.process([bad])  # below the watermark: a redelivery, with a broken header
        assert shard.stats.records_skipped == 1 and shard.stats.errors == 1
        await dm(cfg, log, "alice", "bob", "second")
        await eventually(lambda: shard.stats.items_delivered == 4)
        assert await bodies(inbox, "bob") == ["first", "second"]
    finally:
        await shard.stop()


async def test_a_session_delivery_loop_that_still_dies_says_so(log: MemoryEventLog) -> None:
    cfg = unit_cfg()
    shard, _ = await session_shard(log, MemoryPubSub())
    fail_next(shard, "process", Bug("process broke"))
    await dm(cfg, log, "alice", "bob", "first")
    await eventually(lambda: not shard.stats.started)
    assert shard.stats.errors == 1 and "process broke" in shard.stats.last_error
    with pytest.raises(Bug):
        await shard.stop()


# -- FeedShard and Projector -------------------------------------------------------------------


async def test_a_feed_shard_poll_that_raises_is_counted_and_the_loop_goes_on(
        log: MemoryEventLog) -> None:
    cfg = unit_cfg()
    shard = FeedShard(0, 1, cfg, await client_of(log), MemoryFeedStore(cap=100))
    await shard.start()
    try:
        assert shard._loop is not None
        fail_next(shard._loop.consumer(cfg.topics.events), "poll", Bug("poll broke"))
        await eventually(lambda: shard.stats.errors == 1)
        assert shard.stats.last_error.startswith("poll")
        await post(cfg, log, "alice", "hello")
        await eventually(lambda: shard.stats.posts == 1)
    finally:
        await shard.stop()


async def test_a_projector_whose_poll_and_write_raise_counts_both_and_writes_the_batch(
        log: MemoryEventLog) -> None:
    cfg = unit_cfg()
    store = MemoryDocumentStore()
    projector = Projector(cfg, await client_of(log), store)
    await projector.start()
    try:
        assert projector._loop is not None
        fail_next(projector._loop.consumer(cfg.topics.events), "poll", Bug("poll broke"))
        await eventually(lambda: projector.stats.errors == 1)
        fail_next(store, "insert_new", Bug("insert broke"))
        event = await post(cfg, log, "alice", "hello")
        await eventually(lambda: projector.stats.written > 0)
        assert projector.stats.errors == 2 and projector.stats.last_error.startswith("write")
        docs = await store.documents("posts", [event.id])
        assert [d["body"] for d in docs] == ["hello"]
        written = projector.stats.written
        second = await post(cfg, log, "alice", "again")
        await eventually(lambda: projector.stats.written > written)
        assert [d["body"] for d in await store.documents("posts", [second.id])] == ["again"]
    finally:
        await projector.stop()


# -- the gateway -------------------------------------------------------------------------------


class NoShards:
    count = 1

    async def update(self, *args: Any) -> None:
        return None

    async def sync(self, *args: Any) -> None:
        return None


async def test_a_lease_renewal_that_raises_is_counted_and_renewals_go_on() -> None:
    store = MemoryPresenceStore()
    replica = ReplicaPresence(store, NoShards(), LeaseTiming(600), "gw")  # renews every 100 ms
    before = background_errors("presence_lease")
    calls = fail_next(store, "renew_lease", Bug("renew broke"), after=1)  # start's renewal is fine
    await replica.start()
    try:
        await eventually(lambda: calls[0] >= 4)
        assert background_errors("presence_lease") == before + 1
    finally:
        await replica.stop()


@dataclass(eq=False)
class Watching:
    user: str
    watching: set[str] = field(default_factory=set)

    def push(self, out: Any) -> None:
        pass


async def test_a_failed_recovery_of_watched_users_is_counted() -> None:
    pubsub, store = MemoryPubSub(), MemoryPresenceStore()
    await pubsub.start()
    watchers = Watchers(pubsub, store, max_watch=10)
    conn = Watching("alice")
    await watchers.watch(conn, ["bob"])
    try:
        before = background_errors("presence_watchers"), background_errors("presence_recover")
        fail_next(store, "read", Bug("read broke"))
        watchers._on_reconnect()
        await eventually(lambda: background_errors("presence_watchers") == before[0] + 1)
        fail_next(store, "read", unavailable("redis away"))
        watchers._on_reconnect()
        await eventually(lambda: background_errors("presence_recover") == before[1] + 1)
        await eventually(lambda: not watchers._background)
    finally:
        await pubsub.stop()


async def test_a_failed_unsubscribe_is_counted() -> None:
    hub = Hub(MemoryPubSub())
    before = background_errors("hub_unsubscribe")
    failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    failed.set_exception(unavailable("redis away"))
    await hub._unsubscribe(failed)  # type: ignore[arg-type]
    assert background_errors("hub_unsubscribe") == before + 1


class FakeSocket:
    """A WebSocket whose sends can fail, with the socket closed first (as Starlette does) or not."""

    def __init__(self, send_error: BaseException | None = None, *, closes: bool = False) -> None:
        self.send_error = send_error
        self.closes = closes
        self.scope: dict[str, object] = {"type": "websocket"}
        self.application_state = WebSocketState.CONNECTED
        self.sent: list[bytes] = []
        self.closed: list[int] = []

    async def send_bytes(self, data: bytes) -> None:
        if self.send_error is not None:
            if self.closes:
                self.application_state = WebSocketState.DISCONNECTED
            raise self.send_error
        self.sent.append(data)

    async def close(self, code: int, reason: str) -> None:
        self.closed.append(code)


class BrokenInbox(MemoryInboxCache):
    async def read(self, user: str, after: int, count: int) -> list[Any]:
        raise Bug("inbox read broke")


def connection(ws: FakeSocket, inbox: MemoryInboxCache | None = None) -> Connection:
    deps = SimpleNamespace(cfg=unit_cfg(), inbox=inbox, replica="unit")
    conn = Connection(ws, deps, None, {}, None, None)  # type: ignore[arg-type]
    conn.user = "alice"
    conn._early = None
    return conn


async def test_a_writer_that_fails_is_counted_and_closes_its_connection() -> None:
    ws = FakeSocket()
    conn = connection(ws, BrokenInbox(retention_items=10, retention_ms=10**9))
    before = background_errors("writer")
    conn.catch_up()
    await asyncio.wait_for(conn._writer, 5)
    assert background_errors("writer") == before + 1
    assert conn._closer is not None
    await conn._closer
    assert ws.closed == [CloseCode.GOING_AWAY]


@pytest.mark.parametrize("error", [
    RuntimeError('Cannot call "send" once a close message has been sent.'),  # after close()
    WebSocketDisconnect(1006),  # the client is gone
])
async def test_a_writer_whose_socket_closed_ends_quietly(
        error: Exception, caplog: pytest.LogCaptureFixture) -> None:
    conn = connection(FakeSocket(error, closes=True))
    before = background_errors("writer")
    conn.send({"t": "pong"})
    with caplog.at_level(logging.WARNING, logger="peernet.connection"):
        await asyncio.wait_for(conn._writer, 5)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert background_errors("writer") == before
    assert conn._closer is None  # nothing to close: the socket is closed already


async def test_a_writer_whose_socket_the_server_closed_ends_quietly(
        caplog: pytest.LogCaptureFixture) -> None:
    # A stopping replica's uvicorn closes its sockets with 1012 and refuses the app's next send;
    # the app's side of the socket still says CONNECTED.
    error = RuntimeError("Unexpected ASGI message 'websocket.send', after sending "
                         "'websocket.close' or response already completed.")
    ws = FakeSocket(error)
    conn = connection(ws)
    before = background_errors("writer")
    conn.send({"t": "pong"})
    with caplog.at_level(logging.WARNING, logger="peernet.connection"):
        await asyncio.wait_for(conn._writer, 5)
    assert ws.application_state == WebSocketState.CONNECTED
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert background_errors("writer") == before
    assert conn._closer is None


async def test_a_writer_send_that_fails_on_an_open_socket_is_counted() -> None:
    ws = FakeSocket(RuntimeError("a bug"))
    conn = connection(ws)
    before = background_errors("writer")
    conn.send({"t": "pong"})
    await asyncio.wait_for(conn._writer, 5)
    assert background_errors("writer") == before + 1
    assert conn._closer is not None
    await conn._closer
    assert ws.closed == [CloseCode.GOING_AWAY]


async def test_the_ack_buffers_failed_interval_is_counted_and_its_acks_written_later() -> None:
    inbox = MemoryInboxCache(retention_items=100, retention_ms=60_000)
    buffer = AckBuffer(inbox, flush_ms=20)
    before = background_errors("acks")
    inbox.set_down(True)
    await buffer.add("alice", 5)
    await buffer.start()
    try:
        await eventually(lambda: background_errors("acks") > before)
        assert buffer.pending() == {"alice": 5}  # kept for the next interval
        inbox.set_down(False)
        await eventually(lambda: not buffer.pending())
        assert await inbox.acked("alice") == 5
    finally:
        await buffer.stop()
