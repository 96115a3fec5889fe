"""PubSub on Redis: one connection per process carries every SUBSCRIBE, read by a single task
that reconnects by itself and parses every reply a read of the socket brought (hiredis); a
publisher client beside it (a pipeline, or a script on a Redis Cluster)."""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import hiredis
from redis.asyncio.connection import Connection, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bus.lifecycle import Lifecycle, cancelled
from bus.pubsub import Handler, LocalSubscription, deliver, reconnected
from bus.redis import (
    _POOL_OPTIONS,
    _WIRE_ERRORS,
    RedisClient,
    _redacted,
    _unavailable,
    redis_client,
    redis_target,
)
from peernet.errors import unavailable

log = logging.getLogger(__name__)


# ARGV: channel, payload, channel, payload, ...
_PUBLISH_MANY = """
for i = 1, #ARGV, 2 do redis.call('PUBLISH', ARGV[i], ARGV[i + 1]) end
return #ARGV / 2
"""
# Messages per script call: bounds how long one call holds a node.
_PUBLISH_CHUNK = 500
# Bytes the pub/sub reader asks its socket for at once: a burst of pushes arrives in one read.
_READ_CHUNK = 256 * 1024


class RedisPubSub(Lifecycle):
    """PubSub on Redis.

    One dedicated connection per instance (use one instance per process) carries every
    SUBSCRIBE: a channel is subscribed upstream once however many local handlers it has. A single
    reader task reads that connection and calls handlers in order. When the connection drops it
    reconnects with exponential backoff, re-subscribes every channel, and once Redis has confirmed
    them calls the `on_reconnect` callbacks: messages published during the gap are lost (pub/sub
    is at most once) and the callbacks are how callers recover them. Errors are logged and
    counted in `reconnects`, `connection_errors` and `handler_errors`, never swallowed silently.

    On a Redis Cluster this is the cluster's classic pub/sub: the connection goes to one node of
    the URL's list (the next one after each failure), and every node carries every message.
    """

    def __init__(self, url: str, *, subscribe_timeout_s: float = 5.0,
                 ping_interval_s: float = 5.0, max_backoff_s: float = 2.0,
                 name: str | None = None) -> None:
        self._url = url
        self._subscribe_timeout_s = subscribe_timeout_s
        self._ping_interval_s = ping_interval_s
        self._max_backoff_s = max_backoff_s
        # Named so that operators (and tests) can find this connection in CLIENT LIST.
        self.connection_name = name or f"peernet-pubsub-{uuid.uuid4().hex[:12]}"
        self._target = redis_target(url)
        self._publisher: RedisClient | None = None
        self._publish_script: Any = None
        self._conn: Connection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._handlers: dict[str, list[LocalSubscription]] = {}
        # channel -> future done when Redis has confirmed the current subscription
        self._confirmed: dict[str, asyncio.Future[None]] = {}
        self._unsub_waiters: dict[str, deque[asyncio.Future[None]]] = {}
        self._connected = asyncio.Event()
        self._resubscribing: set[str] = set()
        self._reconnect_pending = False
        self._reconnect_callbacks: list[Callable[[], None]] = []
        self._ping_outstanding = False
        self.reconnects = 0
        self.connection_errors = 0
        # Why the last connection attempt failed (a refused certificate, say): start's error says.
        self._last_error: BaseException | None = None
        self.handler_errors = 0

    async def start(self) -> None:
        """Start the reader; PeerNetError(unavailable) if Redis does not answer in time."""
        if self._reader is not None:
            return
        self._publisher = redis_client(self._url)
        self._reader = asyncio.create_task(self._read_forever(), name=self.connection_name)
        try:
            await asyncio.wait_for(self._connected.wait(), self._subscribe_timeout_s)
        except TimeoutError:
            await self.stop()
            why = f": {type(self._last_error).__name__}: {self._last_error}" if self._last_error else ""
            raise unavailable(f"redis: pub/sub cannot connect to {_redacted(self._url)}{why}") from None

    async def stop(self) -> None:
        reader, self._reader = self._reader, None
        await cancelled(reader)
        await self._drop_connection()
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            await publisher.aclose()
        for fut in self._confirmed.values():
            if not fut.done():
                fut.cancel()

    async def publish(self, channel: str, payload: bytes) -> int:
        if self._publisher is None:
            raise RuntimeError("RedisPubSub is not started")
        try:
            return int(await self._publisher.publish(channel, payload))
        except _WIRE_ERRORS as exc:
            raise _unavailable("publish", exc) from exc

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> None:
        if self._publisher is None:
            raise RuntimeError("RedisPubSub is not started")
        if not messages:
            return
        try:
            if self._target.cluster:
                # A cluster pipeline refuses PUBLISH; a keyless script runs on any node, and a
                # PUBLISH there reaches every node's subscribers.
                if self._publish_script is None:
                    self._publish_script = self._publisher.register_script(_PUBLISH_MANY)
                for i in range(0, len(messages), _PUBLISH_CHUNK):
                    await self._publish_script(keys=[], args=[
                        x for message in messages[i:i + _PUBLISH_CHUNK] for x in message])
                return
            async with self._publisher.pipeline(transaction=False) as pipe:
                for channel, payload in messages:
                    pipe.publish(channel, payload)
                await pipe.execute()
        except _WIRE_ERRORS as exc:
            raise _unavailable("publish", exc) from exc

    async def subscribe(self, channel: str, handler: Handler) -> LocalSubscription:
        """Add a local handler; returns once Redis has confirmed the channel's subscription (so a
        message published after this returns is delivered), or raises PeerNetError(unavailable)
        and adds nothing."""
        if self._reader is None:
            raise RuntimeError("RedisPubSub is not started")
        sub = LocalSubscription(channel, handler, self._remove)
        handlers = self._handlers.setdefault(channel, [])
        handlers.append(sub)
        if len(handlers) == 1:
            self._confirmed[channel] = asyncio.get_running_loop().create_future()
            await self._send_quietly("SUBSCRIBE", channel)
        confirmed = self._confirmed[channel]
        try:
            await asyncio.wait_for(asyncio.shield(confirmed), self._subscribe_timeout_s)
        except (TimeoutError, asyncio.CancelledError):
            await sub.unsubscribe()
            raise unavailable(f"redis: subscribe to {channel!r} not confirmed") from None
        return sub

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        self._reconnect_callbacks.append(callback)

    def channels(self) -> list[str]:
        """The channels this process is subscribed to upstream."""
        return sorted(self._handlers)

    async def _remove(self, sub: LocalSubscription) -> None:
        handlers = self._handlers.get(sub.channel)
        if handlers is None or sub not in handlers:
            return
        handlers.remove(sub)
        if handlers:
            return
        del self._handlers[sub.channel]
        fut = self._confirmed.pop(sub.channel, None)
        if fut is not None and not fut.done():
            fut.cancel()
        if self._conn is None:
            return  # the next connection will not subscribe it
        waiter = asyncio.get_running_loop().create_future()
        self._unsub_waiters.setdefault(sub.channel, deque()).append(waiter)
        await self._send_quietly("UNSUBSCRIBE", sub.channel)
        # Best effort: wait for Redis to confirm so that NUMSUB is exact when this returns.
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self._subscribe_timeout_s)
        except (TimeoutError, asyncio.CancelledError):
            pass

    async def _send_quietly(self, *args: str) -> None:
        """Send a command on the pub/sub connection; if it is down, the reader's reconnect does
        the right thing (subscribes every channel that has handlers), so errors are its job."""
        conn = self._conn
        if conn is None:
            return
        try:
            await conn.send_command(*args)
        except (RedisError, OSError) as exc:
            log.warning("redis pub/sub: %s failed: %r", args[0], exc)

    def _new_connection(self, attempt: int) -> Connection:
        # The URL's own options too (`rediss://` and its `ssl_*` query parameters: TLS, as for
        # redis_client), except the pool's, which a single connection does not take. On a
        # cluster any node serves (a PUBLISH reaches every node): each attempt tries the next.
        nodes = self._target.node_urls
        kwargs: dict[str, Any] = dict(parse_url(nodes[attempt % len(nodes)]))
        cls = kwargs.pop("connection_class", Connection)
        for pool_only in _POOL_OPTIONS:
            kwargs.pop(pool_only, None)
        # RESP2: pub/sub messages arrive as plain arrays, read by this module's reader only.
        kwargs.update(protocol=2, client_name=self.connection_name, socket_connect_timeout=2.0,
                      socket_timeout=self._ping_interval_s * 2)
        return cls(**kwargs)

    async def _read_forever(self) -> None:
        attempt = 0
        first = True
        while True:
            try:
                conn = self._new_connection(self.connection_errors)
                await conn.connect()
                self._conn = conn
                self._ping_outstanding = False
                channels = list(self._handlers)
                for channel in channels:
                    fut = self._confirmed.get(channel)
                    if fut is None or fut.done():
                        self._confirmed[channel] = asyncio.get_running_loop().create_future()
                self._resubscribing = set(channels)
                self._reconnect_pending = not first
                if channels:
                    await conn.send_command("SUBSCRIBE", *channels)
                self._connected.set()
                if not channels:
                    self._maybe_reconnected()
                first = False
                attempt = 0
                await self._read_connection(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # RedisError/OSError are the expected ones; anything else is a bug, but the
                # reader must outlive it: it is counted and logged with its traceback.
                self.connection_errors += 1
                self._last_error = exc
                expected = isinstance(exc, (RedisError, OSError))
                log.log(logging.WARNING if expected else logging.ERROR,
                        "redis pub/sub connection lost (%d errors so far): %r",
                        self.connection_errors, exc, exc_info=not expected)
            finally:
                self._connected.clear()
                await self._drop_connection()
            attempt += 1
            delay = min(self._max_backoff_s, 0.05 * 2 ** min(attempt, 10))
            await asyncio.sleep(delay * (0.5 + random.random() / 2))

    async def _read_connection(self, conn: Connection) -> None:
        """Read the connection's socket itself, every reply that one read brought, in order.
        redis-py's `read_response` costs a timeout context and a chain of awaits per message:
        on a gateway replica under a fan-out that was a quarter of its CPU (docs/benchmarks.md,
        "Pub/sub intake"). redis-py still connects (TLS, AUTH, the client name) and sends."""
        stream = conn._reader  # redis-py's StreamReader for this socket, connected above
        if stream is None:
            raise RedisConnectionError("pub/sub connection has no socket")
        replies = hiredis.Reader()
        while True:
            try:
                async with asyncio.timeout(self._ping_interval_s):
                    data = await stream.read(_READ_CHUNK)
            except TimeoutError:
                # Idle: a PING proves the connection is alive (a half-open TCP connection
                # would otherwise never raise). Two silent intervals in a row: reconnect.
                if self._ping_outstanding:
                    raise RedisTimeoutError("pub/sub connection did not answer PING") from None
                self._ping_outstanding = True
                await conn.send_command("PING")
                continue
            if not data:
                raise RedisConnectionError("pub/sub connection closed by Redis")
            self._ping_outstanding = False
            try:
                replies.feed(data)
                reply = replies.gets()
                while reply is not False:
                    if isinstance(reply, hiredis.ReplyError):
                        # Redis takes SUBSCRIBE while it loads its data (AOF or RDB) but answers
                        # the watchdog's PING with LOADING: an answer all the same, so the
                        # connection lives. Any other error answers a SUBSCRIBE: start again.
                        if not str(reply).startswith("LOADING"):
                            raise RedisConnectionError(f"pub/sub connection: Redis said {reply}")
                    else:
                        self._dispatch(reply)
                    reply = replies.gets()
            except hiredis.ProtocolError as exc:
                raise RedisConnectionError(f"pub/sub connection: {exc}") from exc

    def _dispatch(self, reply: Any) -> None:
        if not isinstance(reply, list) or not reply:
            return  # +PONG while subscribed to nothing
        kind = bytes(reply[0]).lower()
        if kind == b"message":
            channel = bytes(reply[1]).decode("utf-8")
            payload = bytes(reply[2])
            self.handler_errors += deliver(self._handlers.get(channel, ()), channel, payload, log)
        elif kind == b"subscribe":
            channel = bytes(reply[1]).decode("utf-8")
            fut = self._confirmed.get(channel)
            if fut is not None and not fut.done():
                fut.set_result(None)
            if self._resubscribing:
                self._resubscribing.discard(channel)
                self._maybe_reconnected()
        elif kind == b"unsubscribe":
            if reply[1] is None:
                return
            channel = bytes(reply[1]).decode("utf-8")
            waiters = self._unsub_waiters.get(channel)
            if waiters:
                waiter = waiters.popleft()
                if not waiters:
                    del self._unsub_waiters[channel]
                if not waiter.done():
                    waiter.set_result(None)

    def _maybe_reconnected(self) -> None:
        if not self._reconnect_pending or self._resubscribing:
            return
        self._reconnect_pending = False
        self.reconnects += 1
        log.info("redis pub/sub reconnected; %d channels re-subscribed", len(self._handlers))
        self.handler_errors += reconnected(self._reconnect_callbacks, log)

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        for waiters in self._unsub_waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)  # the connection's subscriptions are gone anyway
        self._unsub_waiters.clear()
        if conn is not None:
            try:
                await conn.disconnect(nowait=True)
            except Exception:
                log.debug("redis pub/sub disconnect failed", exc_info=True)
