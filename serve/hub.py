"""Hub: the connections this replica holds, by user, and their one pub/sub subscription each.

A user's channel `u:{user}` is subscribed while this replica holds at least one of the user's
connections, so deliveries reach only the replicas that hold the user.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from bus.pubsub import PubSub, Subscription
from peernet.codec import encode_frame, unpack
from peernet.wire import INBOX_FRAME_TYPES, user_channel
from serve import metrics

log = logging.getLogger("peernet.hub")


class Outgoing:
    """One frame on its way to one or many connections, encoded at most once per encoding."""

    __slots__ = ("_encoded", "frame", "seq")

    def __init__(self, frame: dict[str, Any], *, packed: bytes | None = None) -> None:
        """`packed`: the frame's MessagePack bytes when the caller has them (a pub/sub push is
        the frame as published), so binary connections are sent them as they came."""
        self.frame = frame
        # Only inbox items are sequenced; other frames (welcome) may carry a `seq` field too.
        seq = frame.get("seq") if frame.get("t") in INBOX_FRAME_TYPES else None
        self.seq: int | None = seq if isinstance(seq, int) else None
        self._encoded: dict[bool, bytes | str] = {} if packed is None else {True: packed}

    def encoded(self, binary: bool) -> bytes | str:
        data = self._encoded.get(binary)
        if data is None:
            data = self._encoded[binary] = encode_frame(self.frame, binary)
        return data


class Receiver(Protocol):
    user: str

    def push(self, out: Outgoing) -> None:
        """Queue a frame without blocking (a full queue closes the connection)."""

    def catch_up(self) -> None:
        """Read the inbox for anything pushed while pub/sub was disconnected."""


class Hub:
    def __init__(self, pubsub: PubSub) -> None:
        self._pubsub = pubsub
        self._conns: dict[str, set[Receiver]] = {}
        # Each held user's subscription: the task that makes it, then (once it is made) the
        # subscription itself, so no finished task (~0.4 KiB with its context) stays per user.
        self._subs: dict[str, asyncio.Future[Subscription] | Subscription] = {}
        self._unsubscribing: set[asyncio.Future[None]] = set()
        # Messages published while the broker connection was down are lost for good: every
        # connection reads what it missed from the inbox cache.
        pubsub.on_reconnect(self._on_reconnect)

    @property
    def connections(self) -> int:
        return sum(len(c) for c in self._conns.values())

    def users(self) -> int:
        return len(self._conns)

    def local(self, user: str) -> set[Receiver]:
        return self._conns.get(user, set())

    async def attach(self, conn: Receiver) -> None:
        """Hold `conn`; returns once its user's channel is subscribed on this replica."""
        self._conns.setdefault(conn.user, set()).add(conn)
        sub = self._subs.get(conn.user)
        if sub is None:
            sub = self._subs[conn.user] = asyncio.ensure_future(
                self._pubsub.subscribe(user_channel(conn.user), self._dispatch))
        if not isinstance(sub, asyncio.Future):
            return
        task = sub
        try:
            made = await asyncio.shield(task)
        except Exception:
            if self._subs.get(conn.user) is task:
                del self._subs[conn.user]
            self.detach_now(conn)
            raise
        if self._subs.get(conn.user) is task:
            self._subs[conn.user] = made

    def detach_now(self, conn: Receiver) -> None:
        conns = self._conns.get(conn.user)
        if conns is None:
            return
        conns.discard(conn)
        if not conns:
            del self._conns[conn.user]
            sub = self._subs.pop(conn.user, None)
            if sub is not None:
                pending = asyncio.ensure_future(self._unsubscribe(sub))
                self._unsubscribing.add(pending)
                pending.add_done_callback(self._unsubscribing.discard)

    async def _unsubscribe(self, sub: asyncio.Future[Subscription] | Subscription) -> None:
        try:
            if isinstance(sub, asyncio.Future):
                sub = await sub
            await sub.unsubscribe()
        except Exception as exc:  # the subscription failed or the broker is gone: nothing to undo
            metrics.BACKGROUND_ERRORS.labels("hub_unsubscribe").inc()
            log.debug("unsubscribe failed: %s", exc)

    def _on_reconnect(self) -> None:
        log.info("pub/sub reconnected: %d connections catch up from the inbox", self.connections)
        for conns in list(self._conns.values()):
            for conn in list(conns):
                conn.catch_up()

    def _dispatch(self, channel: str, payload: bytes) -> None:
        user = channel[2:]
        conns = self._conns.get(user)
        if not conns:
            return
        try:
            frame = unpack(payload)
        except Exception:
            log.error("undecodable push on %s dropped", channel)
            return
        # The payload is the frame packed by peernet.codec.pack, which is encode_frame's binary
        # form: MessagePack connections get these bytes, not a second packing of them.
        out = Outgoing(frame, packed=payload)
        for conn in list(conns):
            conn.push(out)
