"""PresenceStore on Redis. Keys, all under the configured keyspace K, written `{K}` (a hash tag:
on a Redis Cluster they share one slot, since a shard's record and a read span many users):

- `{K}:u:USER`: msgpack [online 1|0, since]; an offline user's key expires (last-seen retention)
- `{K}:lease:REPLICA`: a replica's lease, a key with a TTL
- `{K}:s:SHARD:replicas`: the replicas shard SHARD has recorded users for
- `{K}:s:SHARD:r:REPLICA`: the users of shard SHARD that REPLICA holds
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.exceptions import RedisError

from bus.presence import NEVER_SEEN, OFFLINE, ONLINE, Change, PresenceState
from bus.redis import RedisClient, hash_tag
from peernet.codec import pack, unpack
from peernet.errors import unavailable

_ERRORS = (RedisError, OSError, TimeoutError)


class RedisPresenceStore:
    """PresenceStore on Redis (see bus/presence.py for the contract)."""

    def __init__(self, client: RedisClient, *, keyspace: str, last_seen_ttl_s: int) -> None:
        self._r = client
        self._k = hash_tag(keyspace)
        self._last_seen_ms = max(1, last_seen_ttl_s) * 1000

    def _user(self, user: str) -> str:
        return f"{self._k}:u:{user}"

    def _lease(self, replica: str) -> str:
        return f"{self._k}:lease:{replica}"

    def _replicas(self, shard: str) -> str:
        return f"{self._k}:s:{shard}:replicas"

    def _held(self, shard: str, replica: str) -> str:
        return f"{self._k}:s:{shard}:r:{replica}"

    async def renew_lease(self, replica: str, ttl_ms: int) -> bool:
        try:
            previous = await self._r.set(self._lease(replica), b"1", px=max(1, ttl_ms), get=True)
        except _ERRORS as exc:
            raise unavailable(f"presence store: {exc}") from exc
        return previous is not None

    async def release_lease(self, replica: str) -> None:
        try:
            await self._r.delete(self._lease(replica))
        except _ERRORS as exc:
            raise unavailable(f"presence store: {exc}") from exc

    async def live(self, replicas: Sequence[str]) -> set[str]:
        if not replicas:
            return set()
        try:
            values: list[Any] = await self._r.mget([self._lease(r) for r in replicas])
        except _ERRORS as exc:
            raise unavailable(f"presence store: {exc}") from exc
        return {r for r, v in zip(replicas, values, strict=True) if v is not None}

    async def read(self, users: Sequence[str]) -> dict[str, PresenceState]:
        if not users:
            return {}
        try:
            values: list[Any] = await self._r.mget([self._user(u) for u in users])
        except _ERRORS as exc:
            raise unavailable(f"presence store: {exc}") from exc
        out: dict[str, PresenceState] = {}
        for user, raw in zip(users, values, strict=True):
            if raw is None:
                out[user] = NEVER_SEEN
            else:
                online, since = unpack(bytes(raw))
                out[user] = PresenceState(ONLINE if online else OFFLINE, int(since))
        return out

    async def held(self, shard: str) -> dict[str, set[str]]:
        try:
            raw: Any = await self._r.smembers(self._replicas(shard))
            replicas = sorted(bytes(r).decode() for r in raw)
            if not replicas:
                return {}
            async with self._r.pipeline(transaction=False) as pipe:
                for replica in replicas:
                    pipe.smembers(self._held(shard, replica))
                members = await pipe.execute()
        except _ERRORS as exc:
            raise unavailable(f"presence store: {exc}") from exc
        return {r: {bytes(u).decode() for u in m} for r, m in zip(replicas, members, strict=True)}

    async def record(self, shard: str, replica: str, *, add: Sequence[str] = (),
                     remove: Sequence[str] = (), changes: Sequence[Change] = (),
                     forget: bool = False) -> None:
        if not (add or remove or changes or forget):
            return
        held = self._held(shard, replica)
        try:
            async with self._r.pipeline(transaction=True) as pipe:
                if forget:
                    pipe.delete(held)
                    pipe.srem(self._replicas(shard), replica)
                else:
                    if remove:
                        pipe.srem(held, *remove)
                    if add:
                        pipe.sadd(held, *add)
                    pipe.sadd(self._replicas(shard), replica)
                for c in changes:
                    online = c.status == ONLINE
                    pipe.set(self._user(c.user), pack([1 if online else 0, c.ts]),
                             px=None if online else self._last_seen_ms)
                await pipe.execute()
        except _ERRORS as exc:
            raise unavailable(f"presence store: {exc}") from exc
