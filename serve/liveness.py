"""The deadlines of a replica's connections (the hello timeout, then 2 x heartbeat of silence),
kept by one coarse timing wheel per replica instead of a timer per socket.

A connection moves its own deadline by storing when it last heard from its client (an attribute
write per frame; the replica's WebSocket server writes another per WebSocket ping, see
`HEARD_EXTENSION`); nothing is rescheduled then. The wheel files each connection under the tick
in which its deadline fell when it was filed, and a sweep once a tick asks only the connections
of the ticks that passed for their deadline now: a connection that was heard from meanwhile is
filed again further on (at most once per 2 x heartbeat for a busy one), one that was not is
expired. So a deadline is honoured between its time and one tick (plus the loop's lag) later,
never before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Protocol

from serve import metrics

log = logging.getLogger("peernet.liveness")

# The ASGI scope extension under which the replica's WebSocket server (serve/ws_server.py) puts
# an object whose `heard_at` (`time.monotonic()`) it sets on each WebSocket ping or
# unsolicited pong from the client: those never reach the app as messages.
HEARD_EXTENSION = "peernet.heard"

# With the `proxy` ingress the socket is Serve's proxy's, in another process: there the proxy's
# WebSocket server (serve/ws_server.py, ProxyHeardProtocol) tells of a ping by an ASGI
# `websocket.receive` message carrying this key and no data, relayed to the replica with the
# socket's frames. The app counts it as traffic and reads on; no client can send one.
HEARD_MESSAGE_KEY = "peernet.heard"

# The wheel's tick: a tenth of the shortest deadline, within these bounds.
MAX_TICK_S = 1.0
MIN_TICK_S = 0.02


class HeardFrom(Protocol):
    """What the WebSocket server tells of a socket: when its client last pinged
    (`time.monotonic()`, the wheel's default clock)."""

    heard_at: float


class DirectSocket(HeardFrom, Protocol):
    """The replica's WebSocket server's own socket, found under HEARD_EXTENSION when the server
    offers it (serve/ws_server.py)."""

    def write_now(self, data: bytes | str) -> bool:
        """Write one message frame now, in order after every frame written before, without
        waiting; False, with nothing written, when that cannot be done at once (the socket is
        not open, or its buffer is full): the caller then sends through ASGI, which waits."""
        ...


class Deadlined(Protocol):
    """A connection as the wheel sees it. `liveness_tick` is the wheel's own (the tick it is
    filed under, None when it is not filed)."""

    liveness_tick: int | None

    def deadline(self) -> float:
        """When the connection is dead unless it is heard from before (the wheel's clock)."""
        ...

    def expire(self) -> None:
        """The deadline passed: close the connection (4408). Called once."""
        ...


def tick_for(*deadlines_s: float) -> float:
    """The tick for connections whose deadlines are at least min(deadlines_s) away."""
    return min(MAX_TICK_S, max(MIN_TICK_S, min(deadlines_s) / 10))


class Liveness:
    """One replica's connection deadlines: `watch` when a socket opens, `forget` when it ends;
    `run` (a task, `start`) sweeps once a tick and expires every connection whose deadline
    passed."""

    def __init__(self, tick_s: float = MAX_TICK_S,
                 clock: Callable[[], float] | None = None) -> None:
        self.tick_s = tick_s
        self.now: Callable[[], float] = clock or time.monotonic
        self._buckets: dict[int, set[Deadlined]] = {}
        self._swept = math.floor(self.now() / tick_s)  # the last tick swept
        self._task: asyncio.Task[None] | None = None
        self.expired = 0

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def watch(self, conn: Deadlined) -> None:
        """Keep `conn`'s deadline (from within the event loop, which then runs the sweeps)."""
        if self._task is None:
            self.start()
        self._file(conn, conn.deadline())

    def forget(self, conn: Deadlined) -> None:
        tick = conn.liveness_tick
        if tick is None:
            return
        conn.liveness_tick = None
        bucket = self._buckets.get(tick)
        if bucket is not None:
            bucket.discard(conn)
            if not bucket:
                del self._buckets[tick]

    def _file(self, conn: Deadlined, deadline: float) -> None:
        tick = max(math.ceil(deadline / self.tick_s), self._swept + 1)
        conn.liveness_tick = tick
        bucket = self._buckets.get(tick)
        if bucket is None:
            self._buckets[tick] = bucket = set()
        bucket.add(conn)

    def sweep(self) -> int:
        """Expire the connections whose deadline passed; the number expired."""
        now = self.now()
        current = math.floor(now / self.tick_s)
        if current <= self._swept:
            return 0
        if current - self._swept <= len(self._buckets):
            due = [t for t in range(self._swept + 1, current + 1) if t in self._buckets]
        else:  # a long stall (or a test's clock): walk the buckets, not the ticks
            due = sorted(t for t in self._buckets if t <= current)
        self._swept = current
        expired = 0
        for tick in due:
            for conn in self._buckets.pop(tick):
                conn.liveness_tick = None
                try:
                    deadline = conn.deadline()
                    if deadline > now:
                        self._file(conn, deadline)  # heard from meanwhile: further on
                        continue
                    expired += 1
                    conn.expire()
                except Exception:
                    # One connection's failure must not leave the others of its tick unwatched.
                    metrics.BACKGROUND_ERRORS.labels("liveness").inc()
                    log.exception("liveness: a connection's deadline could not be handled")
        self.expired += expired
        return expired

    async def run(self) -> None:
        while True:
            await asyncio.sleep(max(0.0, (self._swept + 1) * self.tick_s - self.now()))
            try:
                self.sweep()
            except Exception:  # a bug: counted and told, and the next tick sweeps again
                metrics.BACKGROUND_ERRORS.labels("liveness").inc()
                log.exception("liveness: sweep failed")

    def start(self) -> None:
        """Sweep from now on (the first `watch` starts it too: an app driven without its
        lifespan still closes silent connections)."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="liveness")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
