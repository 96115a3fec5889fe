"""GroupStore on Redis, under the feeds' keyspace (so `peernet replay --wipe`, which empties it,
empties these too, and the replay writes them again):
  {ks}:group:CONV   hash  v: the state's version, d: the state (msgpack)
  {ks}:glock:CONV   string  the token holding the group's lock (expires)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from redis.exceptions import RedisError

from bus.groups import Group
from bus.redis import RedisClient, hash_tag, redis_client
from peernet.codec import pack, unpack
from peernet.config import PeerNetConfig
from peernet.errors import unavailable

T = TypeVar("T")

_ERRORS = (RedisError, OSError, TimeoutError)

# KEYS: the state, the lock. ARGV: version, state, token ('' none). A state older than the stored
# one is dropped (a stale replay, a late write); the lock is freed only for its holder.
_PUT = """
local cur = redis.call('HGET', KEYS[1], 'v')
if (not cur) or tonumber(cur) <= tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'v', ARGV[1], 'd', ARGV[2])
end
if ARGV[3] ~= '' and redis.call('GET', KEYS[2]) == ARGV[3] then
  redis.call('DEL', KEYS[2])
end
return 1
"""

_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""


class RedisGroupStore:
    """GroupStore on Redis (see bus/groups.py for the contract)."""

    def __init__(self, client: RedisClient, *, keyspace: str) -> None:
        self._r = client
        self.prefix = hash_tag(keyspace)
        self._put = client.register_script(_PUT)
        self._unlock = client.register_script(_UNLOCK)

    def _state(self, conv: str) -> str:
        return f"{self.prefix}:group:{conv}"

    def _lock(self, conv: str) -> str:
        return f"{self.prefix}:glock:{conv}"

    async def _guard(self, what: str, action: Callable[[], Awaitable[T]]) -> T:
        try:
            return await action()
        except _ERRORS as exc:
            raise unavailable(f"groups: {what}: {type(exc).__name__}: {exc}") from exc

    async def get_many(self, convs: Sequence[str]) -> list[Group | None]:
        async def run() -> list[Group | None]:
            if not convs:
                return []
            async with self._r.pipeline(transaction=False) as pipe:
                for conv in convs:
                    pipe.hget(self._state(conv), "d")
                raws: list[Any] = await pipe.execute()
            return [None if raw is None else Group.from_dict(unpack(raw)) for raw in raws]

        return await self._guard("read", run)

    async def lock(self, conv: str, token: str, ttl_ms: int) -> bool:
        async def run() -> bool:
            return bool(await self._r.set(self._lock(conv), token, nx=True, px=ttl_ms))

        return await self._guard("lock", run)

    async def unlock(self, conv: str, token: str) -> None:
        async def run() -> None:
            await self._unlock(keys=[self._lock(conv)], args=[token])

        await self._guard("unlock", run)

    async def put(self, group: Group, *, unlock: str | None = None) -> None:
        async def run() -> None:
            await self._put(keys=[self._state(group.conv), self._lock(group.conv)],
                            args=[group.version, pack(group.to_dict()), unlock or ""])

        await self._guard("write", run)

    async def put_many(self, groups: Sequence[Group]) -> None:
        # A round trip each: changes are few next to messages, and a Redis Cluster's pipelines
        # refuse scripts.
        for group in groups:
            await self.put(group)

    async def close(self) -> None:
        await self._r.aclose()


def group_store(cfg: PeerNetConfig) -> RedisGroupStore:
    """The group store of a process, from configuration (the feeds' Redis and keyspace)."""
    return RedisGroupStore(redis_client(cfg.services.redis_url), keyspace=cfg.feeds.keyspace)
