"""Redis clients (redis.asyncio) for one Redis or a Redis Cluster, and the Cache on Redis: SET NX
PX for idempotency keys. The PubSub on Redis is bus/pubsub_redis.py.

A URL names one Redis (`redis://`, `rediss://` for TLS) or a Redis Cluster
(`redis+cluster://host:port,host:port/?options`, `rediss+cluster://` for TLS): any reachable
node of the list serves to discover the rest. On a cluster every multi-key command, transaction
and script of PeerNet touches keys of one hash slot: each store puts a `{tag}` in its keys
(`hash_tag`), at the grain its atomic steps need (docs/deploy.md, "Redis Cluster")."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

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


async def run_script(client: RedisClient, script: Any, keys: list[str], args: list[Any]) -> Any:
    """`script` (a registered Lua script) by EVALSHA, one round trip; when Redis does not know it
    (restarted, or its scripts flushed), by EVAL, which runs it and caches it again: two round
    trips, where redis-py's own fallback (SCRIPT LOAD, then EVALSHA again) takes three."""
    try:
        return await client.evalsha(script.sha, len(keys), *keys, *args)
    except NoScriptError:
        return await client.eval(script.script, len(keys), *keys, *args)


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
                                 ttl_s: float | None = None,
                                 first: Sequence[tuple[str, bytes]] = ()) -> list[bool]:
        if not items and not first:
            return []
        px = _px(ttl_s)
        try:
            async with self._c().pipeline(transaction=False) as pipe:
                for key, value in first:
                    pipe.set(key, value, px=px)
                for key, value in items:
                    pipe.set(key, value, px=px, nx=True)
                return [bool(r) for r in (await pipe.execute())[len(first):]]
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
