"""Cache and PubSub on Redis (redis.asyncio): SET NX PX for idempotency keys, and one pub/sub
connection per process with a single reader task that reconnects by itself.

A URL names one Redis (`redis://`, `rediss://` for TLS) or a Redis Cluster
(`redis+cluster://host:port,host:port/?options`, `rediss+cluster://` for TLS): any reachable
node of the list serves to discover the rest. On a cluster every multi-key command, transaction
and script of PeerNet touches keys of one hash slot: each store puts a `{tag}` in its keys
(`hash_tag`), at the grain its atomic steps need (docs/deploy.md, "Redis Cluster")."""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias
from urllib.parse import urlsplit, urlunsplit

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection, SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bus.lifecycle import Lifecycle, cancelled
from bus.pubsub import Handler, LocalSubscription, deliver, reconnected
from peernet.errors import PeerNetError, unavailable

log = logging.getLogger(__name__)

# What a dead, restarting or unreachable server surfaces as.
_WIRE_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)


# Connections one process keeps to Redis. Commands beyond it wait for a free connection (up to
# the socket timeout) instead of failing: redis-py's default pool raises "Too many connections"
# under a burst, and opening a connection costs far more than a command.
REDIS_POOL_SIZE = 32

# A pooled connection that died while idle (Redis restarted, a proxy dropped it) fails the next
# command sent on it. redis-py then drops it; with this policy the command is sent again on a
# fresh connection (twice at most, 50 ms then 100 ms apart) instead of failing the caller, so a
# restarted Redis costs one slower command per idle connection, not an error per connection.
# Only connection errors are retried: a timeout may mean the command ran and its reply is slow.
# A command whose reply was lost mid-flight can thus run twice; the callers' writes are
# idempotent (SET NX claims, version-checked inbox appends, set adds) or counted by set size.
_RECONNECT_RETRY = (ExponentialBackoff(cap=0.5, base=0.05), 2)


# Options of a Redis URL's query that configure redis-py's connection pool, not a connection.
_POOL_OPTIONS = ("max_connections", "timeout")

# A cluster client keeps a pool per node; past this many connections to one node a command fails
# (redis-py's cluster pool does not queue), so it is larger than the single node's queueing pool.
CLUSTER_POOL_SIZE = 256

_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}

# Either client: a single node's, or a cluster's (the same commands; see the module docstring).
RedisClient: TypeAlias = "aioredis.Redis | RedisCluster"


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """What a Redis URL names: one server, or the seed nodes of a cluster. `node_urls` are plain
    `redis://` (or `rediss://`) URLs of each listed node, with the URL's credentials and options."""

    cluster: bool
    node_urls: tuple[str, ...]


def redis_target(url: str) -> RedisTarget:
    parts = urlsplit(url)
    scheme = _CLUSTER_SCHEMES.get(parts.scheme)
    if scheme is None:
        return RedisTarget(False, (url,))
    auth, _, hosts = parts.netloc.rpartition("@")
    nodes = [h.strip() for h in hosts.split(",") if h.strip()]
    if not nodes:
        raise ValueError(f"a Redis Cluster URL names no node: {_redacted(url)}")
    if parts.path not in ("", "/", "/0"):
        raise ValueError(f"a Redis Cluster has database 0 only: {_redacted(url)}")
    prefix = f"{auth}@" if auth else ""
    return RedisTarget(True, tuple(urlunsplit((scheme, prefix + node, "/0", parts.query, ""))
                                   for node in nodes))


def hash_tag(name: str) -> str:
    """`name` as a Redis Cluster hash tag: keys that contain the same `{name}` share a slot (so
    one script or transaction may touch them all). On a single node it is just part of a name."""
    return "{" + name + "}"


def redis_client(url: str, *, socket_timeout_s: float = 5.0,
                 connect_timeout_s: float = 2.0, pool_size: int = REDIS_POOL_SIZE) -> RedisClient:
    """A redis.asyncio client for `url` (bytes replies, bounded timeouts, a bounded blocking pool):
    the one factory that every Redis-backed module of `bus/` uses. TLS comes from the URL, as
    redis-py reads it: `rediss://host:port/db?ssl_ca_certs=/path/ca.pem` (the CA to trust; the
    system's CAs without it), `ssl_certfile` and `ssl_keyfile` for a client certificate;
    certificate and host name are checked unless the URL says `ssl_cert_reqs=none`. A
    `redis+cluster://` URL gives a cluster client (redis-py's RedisCluster: it follows the
    cluster's slot map and its MOVED and ASK redirections)."""
    target = redis_target(url)
    if target.cluster:
        return _cluster_client(target, socket_timeout_s=socket_timeout_s,
                               connect_timeout_s=connect_timeout_s)
    pool = aioredis.BlockingConnectionPool.from_url(
        # A burst queues for a connection; each command is still bounded by the socket timeout.
        url, max_connections=pool_size, timeout=3 * socket_timeout_s, decode_responses=False,
        socket_timeout=socket_timeout_s, socket_connect_timeout=connect_timeout_s,
        health_check_interval=30,
        retry=Retry(*_RECONNECT_RETRY, supported_errors=(RedisConnectionError,)))
    return aioredis.Redis(connection_pool=pool)


def _cluster_client(target: RedisTarget, *, socket_timeout_s: float,
                    connect_timeout_s: float) -> RedisCluster:
    kwargs: dict[str, Any] = dict(parse_url(target.node_urls[0]))
    if kwargs.pop("connection_class", None) is SSLConnection:
        kwargs["ssl"] = True
    for option in (*_POOL_OPTIONS, "host", "port", "db"):
        kwargs.pop(option, None)
    nodes = []
    for node_url in target.node_urls:
        parts = urlsplit(node_url)
        if parts.hostname is None:
            raise ValueError(f"a Redis Cluster node has no host: {_redacted(node_url)}")
        nodes.append(ClusterNode(parts.hostname, parts.port or 6379))
    kwargs.update(startup_nodes=nodes, decode_responses=False, socket_timeout=socket_timeout_s,
                  socket_connect_timeout=connect_timeout_s, health_check_interval=30,
                  max_connections=CLUSTER_POOL_SIZE,
                  retry=Retry(*_RECONNECT_RETRY, supported_errors=(RedisConnectionError,)))
    return RedisCluster(**kwargs)


def _redacted(url: str) -> str:
    """`url` without its password, for error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


def _unavailable(what: str, exc: BaseException) -> PeerNetError:
    return unavailable(f"redis: {what}: {type(exc).__name__}: {exc}")


def _px(ttl_s: float | None) -> int | None:
    if ttl_s is None:
        return None
    if ttl_s <= 0:
        raise ValueError("ttl_s must be positive")
    return max(1, round(ttl_s * 1000))


# A group `g` of the Cache is the set `g:members` (its members' names) and a key `g:m:{member}`
# per member, with the member's TTL. The set outlives its members (a day past the last put), so
# that no put of a live member can be lost with it; reading the group drops the names whose key
# has expired, in the same script, so a member put again meanwhile is never dropped.
_GROUP_INDEX_TTL_MS = 24 * 3600 * 1000
# KEYS[1]: the group's set; ARGV[1]: the prefix of its members' keys. Returns [member, value, ...].
_GROUP_MEMBERS = """
local out = {}
for _, m in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local v = redis.call('GET', ARGV[1] .. m)
  if v then
    out[#out + 1] = m
    out[#out + 1] = v
  else
    redis.call('SREM', KEYS[1], m)
  end
end
return out
"""


def _group_keys(group: str) -> tuple[str, str]:
    """The set of `group`'s member names and the prefix of its members' keys: one hash slot, so
    that the script reading them runs on a cluster too."""
    tag = hash_tag(group)
    return f"{tag}:members", f"{tag}:m:"


class RedisCache:
    """Cache on Redis: every call is one command, or one transaction or script; set_if_absent is
    SET NX (atomic). A group's keys share one hash slot (its name as their tag), so the script that
    reads its members runs on a cluster too."""

    def __init__(self, url: str, *, socket_timeout_s: float = 5.0) -> None:
        self._url = url
        self._socket_timeout_s = socket_timeout_s
        self._client: RedisClient | None = None

    async def start(self) -> None:
        if self._client is None:
            self._client = redis_client(self._url, socket_timeout_s=self._socket_timeout_s)

    async def stop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _c(self) -> RedisClient:
        if self._client is None:
            raise RuntimeError("RedisCache is not started")
        return self._client

    async def get(self, key: str) -> bytes | None:
        try:
            value = await self._c().get(key)
        except _WIRE_ERRORS as exc:
            raise _unavailable("get", exc) from exc
        if value is None or isinstance(value, bytes):
            return value
        return bytes(value, "utf-8")  # only if someone configured decode_responses

    async def set(self, key: str, value: bytes, *, ttl_s: float | None = None) -> None:
        px = _px(ttl_s)
        try:
            await self._c().set(key, value, px=px)
        except _WIRE_ERRORS as exc:
            raise _unavailable("set", exc) from exc

    async def set_if_absent(self, key: str, value: bytes, *, ttl_s: float | None = None) -> bool:
        px = _px(ttl_s)
        try:
            return bool(await self._c().set(key, value, px=px, nx=True))
        except _WIRE_ERRORS as exc:
            raise _unavailable("set_if_absent", exc) from exc

    async def set_many(self, items: Sequence[tuple[str, bytes]], *, ttl_s: float | None = None) -> None:
        if not items:
            return
        px = _px(ttl_s)
        try:
            async with self._c().pipeline(transaction=False) as pipe:
                for key, value in items:
                    pipe.set(key, value, px=px)
                await pipe.execute()
        except _WIRE_ERRORS as exc:
            raise _unavailable("set_many", exc) from exc

    async def set_many_if_absent(self, items: Sequence[tuple[str, bytes]], *,
                                 ttl_s: float | None = None) -> list[bool]:
        if not items:
            return []
        px = _px(ttl_s)
        try:
            async with self._c().pipeline(transaction=False) as pipe:
                for key, value in items:
                    pipe.set(key, value, px=px, nx=True)
                return [bool(r) for r in await pipe.execute()]
        except _WIRE_ERRORS as exc:
            raise _unavailable("set_many_if_absent", exc) from exc

    async def delete(self, key: str) -> None:
        try:
            await self._c().delete(key)
        except _WIRE_ERRORS as exc:
            raise _unavailable("delete", exc) from exc

    async def put_member(self, group: str, member: str, value: bytes, *, ttl_s: float) -> None:
        px = _px(ttl_s)
        assert px is not None
        index, prefix = _group_keys(group)
        try:
            async with self._c().pipeline(transaction=True) as pipe:
                pipe.set(prefix + member, value, px=px)
                pipe.sadd(index, member)
                pipe.pexpire(index, max(px, _GROUP_INDEX_TTL_MS))
                await pipe.execute()
        except _WIRE_ERRORS as exc:
            raise _unavailable("put_member", exc) from exc

    async def members(self, group: str) -> dict[str, bytes]:
        index, prefix = _group_keys(group)
        try:
            flat: list[Any] = await self._c().eval(_GROUP_MEMBERS, 1, index, prefix)
        except _WIRE_ERRORS as exc:
            raise _unavailable("members", exc) from exc
        return {bytes(flat[i]).decode(): bytes(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def remove_member(self, group: str, member: str) -> None:
        index, prefix = _group_keys(group)
        try:
            async with self._c().pipeline(transaction=True) as pipe:
                pipe.srem(index, member)
                pipe.delete(prefix + member)
                await pipe.execute()
        except _WIRE_ERRORS as exc:
            raise _unavailable("remove_member", exc) from exc

    async def ping(self) -> None:
        try:
            await self._c().ping()
        except _WIRE_ERRORS as exc:
            raise _unavailable("ping", exc) from exc


# ARGV: channel, payload, channel, payload, ...
_PUBLISH_MANY = """
for i = 1, #ARGV, 2 do redis.call('PUBLISH', ARGV[i], ARGV[i + 1]) end
return #ARGV / 2
"""
# Messages per script call: bounds how long one call holds a node.
# Bytes the pub/sub reader asks its socket for at once: a burst of pushes arrives in one read.
_READ_CHUNK = 256 * 1024
_PUBLISH_CHUNK = 500


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
