"""InboxCache on Redis: one sorted set per user (score seq, member the msgpack item)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgpack
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from bus.inbox import Bounds, CacheBehind, Item
from peernet.codec import pack, unpack
from peernet.errors import unavailable
from peernet.ids import now_ms

# One atomic append: check the writer's version, store the items (a replayed (user, seq)
# replaces itself), trim each touched inbox, merge the checkpoints, bump the version.
# Trimming drops the oldest items while there are more than `keep` and the oldest is older than
# `cutoff` (ms); it stops at the first young item, so it costs O(1) once an inbox is trimmed.
# The request is one msgpack argument; returns the new version, or -1 when the version differs.
_APPEND = """
local req = cmsgpack.unpack(ARGV[1])
local vkey = 'inbox:ckptv:' .. req.name
local current = tonumber(redis.call('GET', vkey) or '0')
if req.expect ~= false and req.expect ~= nil and tonumber(req.expect) ~= current then
  return -1
end
local touched = {}
for _, it in ipairs(req.items) do
  local key = 'inbox:' .. it[1]
  redis.call('ZREMRANGEBYSCORE', key, it[2], it[2])
  redis.call('ZADD', key, it[2], it[3])
  touched[key] = true
end
for key, _ in pairs(touched) do
  local excess = redis.call('ZCARD', key) - req.keep
  if excess > 0 then
    local removed = 0
    for _, m in ipairs(redis.call('ZRANGE', key, 0, excess - 1)) do
      if tonumber(cmsgpack.unpack(m)['ts']) < req.cutoff then removed = removed + 1 else break end
    end
    if removed > 0 then redis.call('ZREMRANGEBYRANK', key, 0, removed - 1) end
  end
end
for name, ckpt in pairs(req.ckpts) do
  for p, o in pairs(ckpt) do redis.call('HSET', 'inbox:ckpt:' .. name, tostring(p), o) end
end
return redis.call('INCR', vkey)
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
        self._append = client.register_script(_APPEND)
        self._ack = client.register_script(_ACK)

    async def append(self, items: Sequence[tuple[str, Item]], *, checkpoint_name: str,
                     checkpoint: Mapping[int, int],
                     also: Mapping[str, Mapping[int, int]] | None = None,
                     expect_version: int | None = None) -> int:
        ckpts = {checkpoint_name: {int(p): int(o) for p, o in checkpoint.items()}}
        for name, extra in (also or {}).items():
            ckpts[name] = {int(p): int(o) for p, o in extra.items()}
        # Redis's Lua cmsgpack reads no msgpack `bin`: the members travel as raw strings.
        request = msgpack.packb({
            "name": checkpoint_name,
            "expect": False if expect_version is None else expect_version,
            "items": [[user, int(item["seq"]), pack(item)] for user, item in items],
            "keep": self._retention_items,
            "cutoff": now_ms() - self._retention_ms,
            "ckpts": ckpts,
        }, use_bin_type=False)
        try:
            version = int(await self._append(args=[request]))
        except (RedisError, OSError, TimeoutError) as exc:
            raise unavailable(f"inbox cache: {exc}") from exc
        if version < 0:
            raise CacheBehind(f"inbox cache checkpoint {checkpoint_name!r} is not at version "
                              f"{expect_version}")
        return version

    async def version(self, name: str) -> int:
        try:
            return int(await self._r.get(f"inbox:ckptv:{name}") or 0)
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
        if count <= 0:
            return []
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
