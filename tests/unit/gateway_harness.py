"""The gateway's Starlette app on in-memory backends, driven in-process by Starlette's TestClient
(one event loop thread per app, shared by its HTTP calls and WebSocket sessions)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import warnings
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import msgpack

with warnings.catch_warnings():
    # Starlette asks for httpx2; httpx works as well for these tests.
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient, WebSocketTestSession

from bus.cache_memory import MemoryCache
from bus.eventlog_memory import MemoryEventLog
from bus.inbox import Item
from bus.inbox_memory import MemoryInboxCache
from bus.pubsub_memory import MemoryPubSub
from bus.store_memory import MemoryDocumentStore
from bus.topics import peernet_topics
from peernet.codec import pack
from peernet.config import PeerNetConfig
from peernet.tokens import issue_token
from serve.app import build_app
from serve.deps import GatewayDeps, HealthCheck

T = TypeVar("T")
Frame = dict[str, Any]

RECV_TIMEOUT_S = 3.0


class ServerClosed(Exception):
    """The server closed the WebSocket."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"closed {code}: {reason}")
        self.code = code
        self.reason = reason


class _NoPresenceShards:
    """Presence shards that accept every report (the gateway's presence is not under test)."""

    count = 1

    async def update(self, shard: int, replica: str, seq: int, online: list[str],
                     offline: list[str]) -> None:
        return None

    async def sync(self, shard: int, replica: str, seq: int, users: list[str]) -> None:
        return None


def _presence_parts() -> dict[str, Any]:
    """The presence dependencies, for a GatewayDeps that has them."""
    names = {f.name for f in dataclasses.fields(GatewayDeps)}
    parts: dict[str, Any] = {}
    if "presence" in names:
        parts["presence"] = importlib.import_module("bus.presence_memory").MemoryPresenceStore()
    if "presence_shards" in names:
        parts["presence_shards"] = _NoPresenceShards()
    return parts


class WS:
    """One client connection to the app."""

    def __init__(self, session: WebSocketTestSession, binary: bool) -> None:
        self.session = session
        self.binary = binary
        self.close_reason = ""

    def send(self, frame: Frame) -> None:
        if self.binary:
            self.session.send_bytes(msgpack.packb(frame))
        else:
            self.session.send_text(json.dumps(frame))

    def send_raw(self, data: bytes | str) -> None:
        if isinstance(data, bytes):
            self.session.send_bytes(data)
        else:
            self.session.send_text(data)

    def message(self, timeout: float = RECV_TIMEOUT_S) -> dict[str, Any]:
        """The next ASGI message the server sent (a frame or the close)."""
        stream = self.session._send_rx

        async def get() -> dict[str, Any]:
            with anyio.fail_after(timeout):
                return dict(await stream.receive())

        return self.session.portal.call(get)

    def recv(self, timeout: float = RECV_TIMEOUT_S) -> Frame:
        """The next frame; ServerClosed when the server closed instead."""
        message = self.message(timeout)
        if message["type"] == "websocket.close":
            raise ServerClosed(int(message.get("code", 1000)), str(message.get("reason") or ""))
        if message.get("bytes") is not None:
            assert self.binary, "a JSON connection got a binary frame"
            frame = msgpack.unpackb(message["bytes"])
        else:
            assert not self.binary, "a MessagePack connection got a text frame"
            frame = json.loads(message["text"])
        assert isinstance(frame, dict)
        return frame

    def expect(self, t: str, timeout: float = RECV_TIMEOUT_S) -> Frame:
        frame = self.recv(timeout)
        assert frame.get("t") == t, frame
        return frame

    def request(self, frame: Frame, timeout: float = RECV_TIMEOUT_S) -> Frame:
        """Send; the next frame is the reply."""
        self.send(frame)
        return self.recv(timeout)

    def closed(self, timeout: float = RECV_TIMEOUT_S) -> tuple[int, list[Frame]]:
        """Read until the server closes: the close code and the frames before it."""
        frames: list[Frame] = []
        while True:
            try:
                frames.append(self.recv(timeout))
            except ServerClosed as closed:
                self.close_reason = closed.reason
                return closed.code, frames


@dataclass
class Gateway:
    cfg: PeerNetConfig
    client: TestClient
    deps: GatewayDeps
    log: MemoryEventLog
    cache: MemoryCache
    inbox: MemoryInboxCache
    pubsub: MemoryPubSub
    # Another process on the same pub/sub server: what a session shard publishes with.
    publisher: MemoryPubSub
    store: MemoryDocumentStore
    extra: dict[str, Any] = field(default_factory=dict)

    def token(self, user: str) -> str:
        return issue_token(user, self.cfg.gateway)

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run `fn(*args)` in the app's event loop."""
        return self.client.portal.call(fn, *args)  # type: ignore[union-attr]

    @contextmanager
    def open(self, *, binary: bool = True,
             headers: dict[str, str] | None = None) -> Iterator[WS]:
        """A connection that has sent nothing yet."""
        with self.client.websocket_connect("/v1/ws", headers=dict(headers or {})) as session:
            yield WS(session, binary)

    @contextmanager
    def connect(self, user: str, *, binary: bool = True, resume: Any = None,
                headers: dict[str, str] | None = None, **hello: Any) -> Iterator[tuple[WS, Frame]]:
        """A connection past its hello: the client and the welcome."""
        with self.open(binary=binary, headers=headers) as ws:
            frame: Frame = {"t": "hello", "token": self.token(user), **hello}
            if resume is not None:
                frame["resume"] = resume
            ws.send(frame)
            yield ws, ws.expect("welcome")

    def put_items(self, user: str, items: list[Item]) -> None:
        """Store items in the user's inbox, as a session shard does."""
        self.run(lambda: self.inbox.append([(user, i) for i in items], checkpoint_name="unit",
                                           checkpoint={0: 1}))

    def publish(self, user: str, frames: list[Frame]) -> None:
        """Publish frames on the user's channel in one go, as a session shard does."""

        async def go() -> None:
            for frame in frames:
                await self.publisher.publish(f"u:{user}", pack(frame))

        self.run(go)


@contextmanager
def gateway(env: dict[str, str] | None = None, *,
            checks: dict[str, HealthCheck] | None = None,
            inbox: MemoryInboxCache | None = None,
            peer: tuple[str, int] = ("testclient", 50000),
            direct_url: Callable[[], str | None] | None = None) -> Iterator[Gateway]:
    """The app on fresh in-memory backends, started (lifespan) and stopped around the block.
    Every connection comes from `peer` (the client address the server sees)."""
    from unit_helpers import unit_cfg

    cfg = unit_cfg(env)
    log, cache, store = MemoryEventLog(), MemoryCache(), MemoryDocumentStore()
    pubsub = MemoryPubSub()
    publisher = pubsub.client()
    inbox = inbox or MemoryInboxCache(retention_items=cfg.shards.inbox_retention_items,
                                      retention_ms=cfg.shards.inbox_retention_ms)

    async def start() -> None:
        await log.start()
        await log.ensure_topics(peernet_topics(cfg))
        await pubsub.start()
        await publisher.start()

    async def stop() -> None:
        await publisher.stop()
        await pubsub.stop()
        await log.stop()

    deps = GatewayDeps(cfg=cfg, log=log, cache=cache, inbox=inbox, pubsub=pubsub, store=store,
                       conversations=inbox.conversations(),
                       checks=dict(checks or {}), replica="unit", on_startup=[start],
                       on_shutdown=[stop], direct_url=direct_url, **_presence_parts())
    with TestClient(build_app(deps), client=peer) as client:
        yield Gateway(cfg, client, deps, log, cache, inbox, pubsub, publisher, store)
