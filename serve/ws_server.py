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
connection for a queue that one reader drains (docs/benchmarks.md, memory per idle connection).

docs/architecture.md, "The ingress", has the measurement. With the `proxy` ingress the sockets
are Serve's proxy's, which this does not reach.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Generic, TypeVar

import uvicorn
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from peernet.config import GatewayConfig

T = TypeVar("T")


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
    """uvicorn's websockets-sansio protocol with its receive queue in a LeanQueue."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = LeanQueue()  # type: ignore[assignment]


def use_server_settings(cfg: GatewayConfig) -> None:
    """Make `uvicorn.Config` in this process default to `cfg`'s WebSocket settings."""
    base: type[uvicorn.Config] = getattr(uvicorn.Config, "peernet_base", uvicorn.Config)
    defaults: dict[str, Any] = {"ws_per_message_deflate": cfg.ws_compression,
                                "ws": LeanWebSocketProtocol}

    class Config(base):  # type: ignore[misc, valid-type]
        peernet_base = base

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**defaults, **kwargs})

    uvicorn.Config = Config  # type: ignore[misc]
