"""PubSub: fan-out of transient messages between processes (Redis pub/sub)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol

Handler = Callable[[str, bytes], None]


class Subscription(Protocol):
    async def unsubscribe(self) -> None:
        """Stop this handler; the process drops its upstream subscription with the last one."""


class PubSub(Protocol):
    """At-most-once fan-out: a message published on a channel reaches every process subscribed to
    it at that moment, in publish order per publisher; nothing is stored and nothing is replayed
    (durability lives in the EventLog and the inbox). Each process keeps ONE upstream
    subscription per channel however many local handlers it has, and calls each handler in the
    reader task: handlers must not block (put the payload on a bounded queue and return).

    When the connection to the broker drops, the implementation reconnects and re-subscribes by
    itself, and calls `on_reconnect` handlers so that callers can recover what they missed.
    """

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def publish(self, channel: str, payload: bytes) -> int:
        """Publish; returns how many processes received it (on a Redis Cluster: how many of
        those connected to the node that took it, so only a lower bound)."""

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Publish (channel, payload) messages in one round trip, in their order."""

    async def subscribe(self, channel: str, handler: Handler) -> Subscription:
        """Add a local handler. Returns once the process's subscription to `channel` is active
        (a message published after it returns is delivered), or raises PeerNetError(unavailable)
        and adds nothing."""

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        """Call `callback` (in the reader task) after every reconnect, once every channel is
        subscribed again: what was published during the gap is lost, what is published from
        then on is delivered."""


class LocalSubscription:
    """One local handler of a channel, as a PubSub implementation keeps it: the first
    `unsubscribe` hands it to the implementation's `remove`, later ones do nothing."""

    def __init__(self, channel: str, handler: Handler,
                 remove: Callable[[LocalSubscription], Awaitable[None]]) -> None:
        self.channel = channel
        self.handler = handler
        self._remove = remove
        self._active = True

    async def unsubscribe(self) -> None:
        if self._active:
            self._active = False
            await self._remove(self)


def deliver(subs: Iterable[LocalSubscription], channel: str, payload: bytes,
            log: logging.Logger) -> int:
    """Call each handler with a message (in the reader task): a handler's exception is logged,
    never let out into the reader; returns how many raised, for the `handler_errors` count."""
    failed = 0
    for sub in list(subs):
        try:
            sub.handler(channel, payload)
        except Exception:
            failed += 1
            log.exception("pub/sub handler for %r failed", channel)
    return failed


def reconnected(callbacks: Iterable[Callable[[], None]], log: logging.Logger) -> int:
    """Call the `on_reconnect` callbacks as `deliver` calls handlers; how many raised."""
    failed = 0
    for callback in list(callbacks):
        try:
            callback()
        except Exception:
            failed += 1
            log.exception("pub/sub on_reconnect callback failed")
    return failed
