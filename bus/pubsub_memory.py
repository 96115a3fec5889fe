"""PubSub in memory, for unit tests, behaving like Redis pub/sub on the wire: payloads are
copied bytes, handlers run in each client's reader task, a slow subscriber is dropped as Redis's
output-buffer limit would, and `set_down` makes publish and subscribe PeerNetError(unavailable).

Each MemoryPubSub is one process with one connection to a shared server; `client()` returns
another process on the same server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from bus.lifecycle import Lifecycle, cancelled
from bus.memory_wire import as_bytes
from bus.pubsub import Handler, LocalSubscription, deliver, reconnected
from peernet.errors import unavailable

log = logging.getLogger(__name__)


class _PubSubServer:
    def __init__(self) -> None:
        self.channels: dict[str, set[MemoryPubSub]] = {}
        self.down = False


class MemoryPubSub(Lifecycle):
    """PubSub in memory: each instance is one process with one connection to a shared server.

    `publish` returns the number of instances subscribed to the channel; each gets a copy of the
    payload on its bounded queue and calls handlers from its own reader task, never inside
    `publish`. A full queue (a slow subscriber) drops that instance's connection as Redis's
    output-buffer limit would: what was queued is lost and `on_reconnect` callbacks run.
    """

    def __init__(self, _server: _PubSubServer | None = None, *, queue_capacity: int = 10_000
                 ) -> None:
        self._server = _server or _PubSubServer()
        self._capacity = queue_capacity
        self._handlers: dict[str, list[LocalSubscription]] = {}
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(queue_capacity)
        self._reader: asyncio.Task[None] | None = None
        self._reconnect_callbacks: list[Callable[[], None]] = []
        self._reconnect_scheduled = False
        self.reconnects = 0
        self.handler_errors = 0
        self.dropped = 0

    def client(self) -> MemoryPubSub:
        """Another process on the same pub/sub server."""
        return MemoryPubSub(self._server, queue_capacity=self._capacity)

    def set_down(self, down: bool) -> None:
        """Down: publish and subscribe raise PeerNetError(unavailable). Coming back up is a
        reconnect for every instance (their on_reconnect callbacks run)."""
        was_down, self._server.down = self._server.down, down
        if was_down and not down:
            for inst in {i for subs in self._server.channels.values() for i in subs}:
                inst.drop_connection()

    async def start(self) -> None:
        if self._server.down:
            raise unavailable("memory pub/sub is down")
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_forever())

    async def stop(self) -> None:
        for channel in list(self._handlers):
            self._server.channels.get(channel, set()).discard(self)
        self._handlers.clear()
        reader, self._reader = self._reader, None
        await cancelled(reader)

    async def publish(self, channel: str, payload: bytes) -> int:
        if self._reader is None:
            raise RuntimeError("MemoryPubSub is not started")
        if self._server.down:
            raise unavailable("memory pub/sub is down")
        data = as_bytes(payload, "payload")
        receivers = list(self._server.channels.get(channel, ()))
        for inst in receivers:
            inst._deliver(channel, data)
        return len(receivers)

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> None:
        for channel, payload in messages:
            await self.publish(channel, payload)

    def _deliver(self, channel: str, data: bytes) -> None:
        try:
            self._queue.put_nowait((channel, data))
        except asyncio.QueueFull:
            self.dropped += 1
            self.drop_connection()

    async def subscribe(self, channel: str, handler: Handler) -> LocalSubscription:
        if self._reader is None:
            raise RuntimeError("MemoryPubSub is not started")
        if self._server.down:
            raise unavailable("memory pub/sub is down")
        sub = LocalSubscription(channel, handler, self._remove)
        self._handlers.setdefault(channel, []).append(sub)
        self._server.channels.setdefault(channel, set()).add(self)
        return sub

    async def _remove(self, sub: LocalSubscription) -> None:
        handlers = self._handlers.get(sub.channel)
        if handlers is None or sub not in handlers:
            return
        handlers.remove(sub)
        if not handlers:
            del self._handlers[sub.channel]
            subscribers = self._server.channels.get(sub.channel)
            if subscribers is not None:
                subscribers.discard(self)
                if not subscribers:
                    del self._server.channels[sub.channel]

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        self._reconnect_callbacks.append(callback)

    def channels(self) -> list[str]:
        """The channels this instance is subscribed to on the server."""
        return sorted(self._handlers)

    def subscriber_count(self, channel: str) -> int:
        """PUBSUB NUMSUB: how many instances are subscribed to `channel`."""
        return len(self._server.channels.get(channel, ()))

    def drop_connection(self) -> None:
        """Simulate a dropped connection: queued messages are lost; after the (immediate)
        reconnect the reader runs the on_reconnect callbacks."""
        while not self._queue.empty():
            self._queue.get_nowait()
            self.dropped += 1
        if not self._reconnect_scheduled:
            self._reconnect_scheduled = True
            self._queue.put_nowait(("", b""))  # a marker; channel names are never empty here

    async def _read_forever(self) -> None:
        while True:
            channel, data = await self._queue.get()
            if channel == "" and self._reconnect_scheduled:
                self._reconnect_scheduled = False
                self.reconnects += 1
                self.handler_errors += reconnected(self._reconnect_callbacks, log)
                continue
            self.handler_errors += deliver(self._handlers.get(channel, ()), channel, data, log)


__all__ = ["MemoryPubSub"]
