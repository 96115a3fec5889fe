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
and tell the app when the client last sent a WebSocket ping (LeanWebSocketProtocol).

And it turns off uvicorn's own keepalive pings (every 20 s by default): two timers per socket
rescheduled each time and a ping and pong on the wire, per idle connection, to find dead peers
that the heartbeat (2 x heartbeat without a word: 4408, serve/liveness.py) finds anyway.

docs/architecture.md, "The ingress", has the measurement. With the `proxy` ingress the sockets
are Serve's proxy's, which this does not reach (docs/protocol.md, "Heartbeat").
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any, Generic, TypeVar

import uvicorn
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState
from websockets.frames import Frame
from websockets.http11 import Request

from peernet.config import GatewayConfig
from serve.liveness import HEARD_EXTENSION

T = TypeVar("T")


# Serve's header (ray.serve._private.constants.SERVE_HTTP_REQUEST_DISCONNECT_DISABLED_HEADER) that
# asks the replica not to watch the request for the client's disconnect.
DISCONNECT_WATCH_OFF = (b"x-request-disconnect-disabled", b"?1")


class LeanQueue(Generic[T]):
    """The part of asyncio.Queue uvicorn's WebSocket protocol uses (`put_nowait`, `get`,
    `empty`, `qsize`), unbounded, in one deque: items come out in the order they were put, each
    to one `get`, and waiting getters are served first come, first served. A cancelled `get`
    takes nothing."""

    __slots__ = ("_getters", "_items")

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._getters: deque[asyncio.Future[None]] | None = None  # made when one waits

    def put_nowait(self, item: T) -> None:
        self._items.append(item)
        self._wake_one()

    def _wake_one(self) -> None:
        getters = self._getters
        while getters:
            getter = getters.popleft()
            if not getter.done():
                getter.set_result(None)
                return

    async def get(self) -> T:
        while not self._items:
            if self._getters is None:
                self._getters = deque()
            getter = asyncio.get_running_loop().create_future()
            self._getters.append(getter)
            try:
                await getter
            except BaseException:
                getter.cancel()
                with_items = bool(self._items)
                if getter in self._getters:
                    self._getters.remove(getter)
                elif with_items:
                    self._wake_one()  # it was woken for an item it will not take
                raise
        return self._items.popleft()

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)


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
        self.heard_at = 0.0

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
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


def use_server_settings(cfg: GatewayConfig) -> None:
    """Make `uvicorn.Config` in this process default to `cfg`'s WebSocket settings."""
    base: type[uvicorn.Config] = getattr(uvicorn.Config, "peernet_base", uvicorn.Config)
    defaults: dict[str, Any] = {"ws_per_message_deflate": cfg.ws_compression,
                                "ws": LeanWebSocketProtocol, "ws_ping_interval": None}

    class Config(base):  # type: ignore[misc, valid-type]
        peernet_base = base

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**defaults, **kwargs})

    uvicorn.Config = Config  # type: ignore[misc]
