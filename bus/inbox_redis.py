"""InboxCache on Redis: one sorted set per user (score seq, member the msgpack item)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from bus.inbox import Bounds, Item
from peernet.codec import pack, unpack
from peernet.errors import unavailable
from peernet.ids import now_ms

# Trim the oldest items of one user while there are more than ARGV[1] and the oldest is older
# than ARGV[2] (ms). Stops at the first young item, so it costs O(1) once the inbox is trimmed.
_TRIM = """
local excess = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[1])
if excess <= 0 then return 0 end
local removed = 0
local olds = redis.call('ZRANGE', KEYS[1], 0, excess - 1)
for _, m in ipairs(olds) do
  local item = cmsgpack.unpack(m)
  if tonumber(item['ts']) < tonumber(ARGV[2]) then removed = removed + 1 else break end
end
if removed > 0 then redis.call('ZREMRANGEBYRANK', KEYS[1], 0, removed - 1) end
return removed
"""

# Cumulative ack: keep the larger of the stored and the given seq.
_ACK = """
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local new = tonumber(ARGV[2])
if new > cur then redis.call('HSET', KEYS[1], ARGV[1], new); return new end
return cur
"""


def _key(user: str) -> str:
    return f"inbox:{user}"


class RedisInboxCache:
    """InboxCache on Redis (see bus/inbox.py for the contract)."""

    def __init__(self, client: aioredis.Redis, *, retention_items: int, retention_ms: int) -> None:
        self._r = client
        self._retention_items = retention_items
        self._retention_ms = retention_ms
        self._trim = client.register_script(_TRIM)
        self._ack = client.register_script(_ACK)

    async def append(self, items: Sequence[tuple[str, Item]], *, checkpoint_name: str,
                     checkpoint: Mapping[int, int]) -> None:
        cutoff = now_ms() - self._retention_ms
        try:
            async with self._r.pipeline(transaction=True) as pipe:
                users: set[str] = set()
                for user, item in items:
                    seq = int(item["seq"])
                    # Remove then add: a replayed (user, seq) replaces itself, never doubles.
                    pipe.zremrangebyscore(_key(user), seq, seq)
                    pipe.zadd(_key(user), {pack(item): seq})
                    users.add(user)
                for user in users:
                    await self._trim(keys=[_key(user)], args=[self._retention_items, cutoff],
                                     client=pipe)
                if checkpoint:
                    pipe.hset(f"inbox:ckpt:{checkpoint_name}",
                              mapping={str(p): o for p, o in checkpoint.items()})
                await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            raise unavailable(f"inbox cache: {exc}") from exc

    async def read(self, user: str, after: int, limit: int) -> list[Item]:
        try:
            raw: Any = await self._r.zrangebyscore(_key(user), f"({after}", "+inf", start=0, num=limit)
        except (RedisError, OSError, TimeoutError) as exc:
            raise unavailable(f"inbox cache: {exc}") from exc
        return [unpack(bytes(m)) for m in raw]

    async def bounds(self, user: str) -> Bounds:
        try:
            async with self._r.pipeline(transaction=False) as pipe:
                pipe.zrange(_key(user), 0, 0, withscores=True)
                pipe.zrange(_key(user), -1, -1, withscores=True)
                first, last = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            raise unavailable(f"inbox cache: {exc}") from exc
        if not last:
            return Bounds(0, 0)
        return Bounds(int(first[0][1]), int(last[0][1]))

    async def recent(self, user: str, count: int) -> list[Item]:
        try:
            raw: Any = await self._r.zrange(_key(user), -count, -1)
        except (RedisError, OSError, TimeoutError) as exc:
            raise unavailable(f"inbox cache: {exc}") from exc
        return [unpack(bytes(m)) for m in raw]

    async def checkpoint(self, name: str) -> dict[int, int] | None:
        try:
            raw = await self._r.hgetall(f"inbox:ckpt:{name}")
        except (RedisError, OSError, TimeoutError) as exc:
            raise unavailable(f"inbox cache: {exc}") from exc
        if not raw:
            return None
        return {int(p): int(o) for p, o in raw.items()}

    async def ack(self, user: str, seq: int) -> int:
        try:
            return int(await self._ack(keys=["inbox:acked"], args=[user, seq]))
        except (RedisError, OSError, TimeoutError) as exc:
            raise unavailable(f"inbox cache: {exc}") from exc

    async def acked(self, user: str) -> int:
        try:
            raw = await self._r.hget("inbox:acked", user)
        except (RedisError, OSError, TimeoutError) as exc:
            raise unavailable(f"inbox cache: {exc}") from exc
        return int(raw or 0)
