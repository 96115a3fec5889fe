"""The replica's WebSocket server: a setting of uvicorn that Ray Serve does not expose.

With the `haproxy` ingress each gateway replica serves its own sockets with uvicorn, which Serve
creates with `uvicorn.Config` and only its host, port and timeouts. uvicorn agrees to
permessage-deflate whenever a client offers it, as browsers do; the compression state then costs
memory on every connection for frames (small msgpack) that gain little from it.
`use_server_settings` makes `uvicorn.Config` in the replica default to PEERNET_WS_COMPRESSION
(an argument Serve passes itself still wins). It must run in the replica before Serve starts the
server, which Serve does after the deployment's constructor returns.

It also makes uvicorn's WebSocket protocol (websockets-sansio, what uvicorn's "auto" picks) hold
its received messages in a LeanQueue rather than an asyncio.Queue: four deques (~3 KiB) on every
connection for a queue that one reader drains (docs/benchmarks.md, memory per idle connection),
keep neither the upgrade request's headers nor the 101 response once the socket is open, and
tell the app when the client last sent a WebSocket ping (LeanWebSocketProtocol).

And it turns off uvicorn's own keepalive pings (every 20 s by default): two timers per socket
rescheduled each time and a ping and pong on the wire, per idle connection, to find dead peers
that the heartbeat (2 x heartbeat without a word: 4408, serve/liveness.py) finds anyway.

docs/architecture.md, "The ingress", has the measurement. With the `proxy` ingress the sockets
are Serve's proxy's, in another process. Serve calls `in_serve_proxy` there as it starts
(RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH, set by serve/ray_env.py), which gives the proxy's
uvicorn ProxyHeardProtocol: the same settings, and a ping relayed to the replica as a message
(docs/protocol.md, "Heartbeat").
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any, Generic, TypeVar

import uvicorn
from uvicorn._types import ASGISendEvent
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState
from websockets.frames import Frame
from websockets.http11 import Request

from peernet.config import GatewayConfig, load_config
from serve.liveness import HEARD_EXTENSION, HEARD_MESSAGE_KEY

T = TypeVar("T")


# Serve's header (ray.serve._private.constants.SERVE_HTTP_REQUEST_DISCONNECT_DISABLED_HEADER) that
# asks the replica not to watch the request for the client's disconnect.
DISCONNECT_WATCH_OFF = (b"x-request-disconnect-disabled", b"?1")


class LeanQueue(Generic[T]):
    """The part of asyncio.Queue uvicorn's WebSocket protocol uses (`put_nowait`, `get`,
    `empty`, `qsize`), unbounded: items come out in the order they were put, each to one `get`,
    and waiting getters are served first come, first served. A cancelled `get` takes nothing.

    An idle socket's queue is empty with its one reader waiting, so it holds that reader's
    future in a slot and no deque at all (a deque is ~760 bytes): the items' deque exists only
    while items wait, and a second deque only while more than one getter waits."""

    __slots__ = ("_first", "_items", "_more")

    def __init__(self) -> None:
        self._items: deque[T] | None = None
        self._first: asyncio.Future[None] | None = None  # the getter waiting longest
        self._more: deque[asyncio.Future[None]] | None = None  # the getters after it

    def put_nowait(self, item: T) -> None:
        items = self._items
        if items is None:
            items = self._items = deque()
        items.append(item)
        self._wake_one()

    def _wake_one(self) -> None:
        while (getter := self._next_getter()) is not None:
            if not getter.done():
                getter.set_result(None)
                return

    def _next_getter(self) -> asyncio.Future[None] | None:
        getter, more = self._first, self._more
        self._first = more.popleft() if more else None
        if not more:
            self._more = None
        return getter

    def _wait_behind(self, getter: asyncio.Future[None]) -> None:
        if self._first is None:
            self._first = getter
            return
        if self._more is None:
            self._more = deque()
        self._more.append(getter)

    def _stop_waiting(self, getter: asyncio.Future[None]) -> bool:
        """Take `getter` out of the line; False when it was not in it (it had been woken)."""
        if self._first is getter:
            self._next_getter()
            return True
        if self._more and getter in self._more:
            self._more.remove(getter)
            if not self._more:
                self._more = None
            return True
        return False

    async def get(self) -> T:
        while not self._items:
            getter = asyncio.get_running_loop().create_future()
            self._wait_behind(getter)
            try:
                await getter
            except BaseException:
                getter.cancel()
                if not self._stop_waiting(getter) and self._items:
                    self._wake_one()  # it was woken for an item it will not take
                raise
        items = self._items
        item = items.popleft()
        if not items:
            self._items = None
        return item

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items) if self._items else 0


class LeanEvent:
    """asyncio.Event (`set`, `clear`, `is_set`, `wait`) with its list of waiters made only while
    one waits: uvicorn's protocol keeps one per socket (`writable`), waited on only when the
    transport's buffer is full, and asyncio.Event makes a deque (~760 bytes) for each."""

    __slots__ = ("_value", "_waiters")

    def __init__(self) -> None:
        self._value = False
        self._waiters: list[asyncio.Future[bool]] | None = None

    def is_set(self) -> bool:
        return self._value

    def set(self) -> None:
        if self._value:
            return
        self._value = True
        for waiter in self._waiters or ():
            if not waiter.done():
                waiter.set_result(True)

    def clear(self) -> None:
        self._value = False

    async def wait(self) -> bool:
        if self._value:
            return True
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
            return True
        finally:
            self._waiters.remove(waiter)
            if not self._waiters:
                self._waiters = None


class LeanWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol with its receive queue in a LeanQueue, which tells the
    app when the client last sent a WebSocket ping.

    uvicorn answers a ping itself and the app never hears of it, yet the contract counts pings
    as traffic. So the protocol notes the time of each ping in `heard_at` and puts itself in the
    socket's ASGI scope under HEARD_EXTENSION, where the connection's deadline reads it
    (serve/liveness.py): an attribute write per ping, no message, no task woken. An unsolicited
    pong (RFC 6455 5.5.3: a one-way heartbeat) counts too; a pong that answers uvicorn's own
    keepalive ping does not, since any client's WebSocket library sends that one by itself."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = LeanQueue()  # type: ignore[assignment]
        self.writable = LeanEvent()  # type: ignore[assignment]
        self.writable.set()
        self.heard_at = 0.0

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        # The parsed upgrade request's headers (a dict and a list of them, ~2.2 KiB) are read by
        # nothing once the scope holds its own copy, yet uvicorn (`request`) and websockets'
        # parser (a local of its generator) would keep them for the socket's life.
        event.headers.clear()
        self.request = None  # type: ignore[assignment]
        # The scope exists once the upgrade is accepted; the app's task has not run yet.
        scope = getattr(self, "scope", None)
        if scope is not None:
            extensions = scope.get("extensions")
            if extensions is None:
                scope["extensions"] = extensions = {}
            extensions[HEARD_EXTENSION] = self
            # Serve's replica otherwise runs a task per socket that moves every received
            # message from this protocol's queue into a second queue, only to cancel the app
            # when the client leaves; the app sees the disconnect itself (serve/connection.py).
            scope["headers"].append(DISCONNECT_WATCH_OFF)

    async def send(self, message: ASGISendEvent) -> None:
        await super().send(message)
        if self.handshake_complete:
            # The 101 response (~1.8 KiB with its headers) is only read until it is sent.
            self.response = None  # type: ignore[assignment]

    def write_now(self, data: bytes | str) -> bool:
        """Write one message frame now, in order after every frame written before, without
        waiting; False, with nothing written, when that cannot be done at once (the handshake
        is not complete, the socket is closing or closed, or the transport's buffer is full:
        the caller then sends through ASGI, which waits for the buffer)."""
        if (not self.handshake_complete or self.close_sent or self.disconnected
                or self.initial_response is not None or not self.writable.is_set()
                or self.transport.is_closing()):
            return False
        try:
            if isinstance(data, bytes):
                self.conn.send_binary(data)
            else:
                self.conn.send_text(data.encode())
        except InvalidState:
            return False
        out = self.conn.data_to_send()
        self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        return True

    def handle_ping(self) -> None:
        self.heard_at = time.monotonic()
        super().handle_ping()

    def handle_pong(self, event: Frame) -> None:
        expected = self.pending_ping_payload
        if expected is None or bytes(event.data) != expected:
            self.heard_at = time.monotonic()
        super().handle_pong(event)


class ProxyHeardProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol for Serve's proxy (the `proxy` ingress), which holds
    the socket while the app runs in a replica and sees only the ASGI messages the proxy relays.

    uvicorn answers a ping itself, so the app would never hear of it. Here a ping, or an
    unsolicited pong (as LeanWebSocketProtocol counts them), puts a `websocket.receive` message
    with HEARD_MESSAGE_KEY and no data in the receive queue, which Serve relays like a frame;
    the app counts it as traffic (serve/connection.py). At most one per `relay_every_s`, so a
    client that pings in a loop costs the replica a few messages per heartbeat, not one per
    ping (`proxy_protocol` sets it for a heartbeat); only once the app has accepted the socket."""

    relay_every_s = 1.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.relayed_at = float("-inf")

    def _heard(self) -> None:
        now = time.monotonic()
        if (self.handshake_complete and not self.close_sent and not self.disconnected
                and now - self.relayed_at >= self.relay_every_s):
            self.relayed_at = now
            self.queue.put_nowait({"type": "websocket.receive",  # type: ignore[arg-type]
                                   HEARD_MESSAGE_KEY: True})

    def handle_ping(self) -> None:
        self._heard()
        super().handle_ping()

    def handle_pong(self, event: Frame) -> None:
        expected = self.pending_ping_payload
        if expected is None or bytes(event.data) != expected:
            self._heard()
        super().handle_pong(event)


def proxy_protocol(cfg: GatewayConfig) -> type[ProxyHeardProtocol]:
    """ProxyHeardProtocol relaying a ping at most four times per heartbeat (and once a second):
    a ping every half heartbeat, as clients send them, is relayed every time."""

    class Protocol(ProxyHeardProtocol):
        relay_every_s = min(1.0, cfg.heartbeat_ms / 4000)

    return Protocol


def in_serve_proxy() -> list[Any]:
    """Serve's proxy callback (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH): run in the proxy's
    process before its server starts, it gives that server the replica's WebSocket settings with
    ProxyHeardProtocol. Returns the middlewares Serve asks for: none."""
    cfg = load_config().gateway
    use_server_settings(cfg, protocol=proxy_protocol(cfg))
    return []


def use_server_settings(cfg: GatewayConfig,
                        protocol: type[WebSocketsSansIOProtocol] = LeanWebSocketProtocol) -> None:
    """Make `uvicorn.Config` in this process default to `cfg`'s WebSocket settings, its sockets
    served by `protocol`."""
    base: type[uvicorn.Config] = getattr(uvicorn.Config, "peernet_base", uvicorn.Config)
    defaults: dict[str, Any] = {"ws_per_message_deflate": cfg.ws_compression,
                                "ws": protocol, "ws_ping_interval": None}

    class Config(base):  # type: ignore[misc, valid-type]
        peernet_base = base

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**defaults, **kwargs})

    uvicorn.Config = Config  # type: ignore[misc]
