"""Cache in memory, for unit tests, behaving like Redis on the wire: values are copied bytes,
expiry is kept in whole milliseconds by a clock the test may advance, and `set_down` makes every
call PeerNetError(unavailable). `client()` returns another client of the same server."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from bus.lifecycle import Lifecycle
from bus.memory_wire import as_bytes
from peernet.errors import unavailable


class _CacheServer:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.data: dict[str, tuple[bytes, float | None]] = {}
        # group -> member -> (value, expires at)
        self.groups: dict[str, dict[str, tuple[bytes, float]]] = {}
        self.down = False


class MemoryCache(Lifecycle):
    """Cache in memory, with expiry by `clock` (time.monotonic unless given, so tests can
    advance time)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 _server: _CacheServer | None = None) -> None:
        self._server = _server or _CacheServer(clock)

    def client(self) -> MemoryCache:
        return MemoryCache(_server=self._server)

    def set_down(self, down: bool) -> None:
        self._server.down = down

    def _live(self, key: str) -> bytes | None:
        s = self._server
        if s.down:
            raise unavailable("memory cache is down")
        entry = s.data.get(key)
        if entry is None:
            return None
        value, expires = entry
        if expires is not None and s.clock() >= expires:
            del s.data[key]
            return None
        return value

    def _expiry(self, ttl_s: float | None) -> float | None:
        if ttl_s is None:
            return None
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        # Redis keeps whole milliseconds, at least one.
        return self._server.clock() + max(1, round(ttl_s * 1000)) / 1000

    async def get(self, key: str) -> bytes | None:
        return self._live(key)

    async def set(self, key: str, value: bytes, *, ttl_s: float | None = None) -> None:
        expires = self._expiry(ttl_s)
        self._live(key)
        self._server.data[key] = (as_bytes(value, "value"), expires)

    async def set_if_absent(self, key: str, value: bytes, *, ttl_s: float | None = None) -> bool:
        expires = self._expiry(ttl_s)
        if self._live(key) is not None:
            return False
        self._server.data[key] = (as_bytes(value, "value"), expires)
        return True

    async def set_many(self, items: Sequence[tuple[str, bytes]], *, ttl_s: float | None = None) -> None:
        for key, value in items:
            await self.set(key, value, ttl_s=ttl_s)

    async def set_many_if_absent(self, items: Sequence[tuple[str, bytes]], *,
                                 ttl_s: float | None = None,
                                 first: Sequence[tuple[str, bytes]] = ()) -> list[bool]:
        for key, value in first:
            await self.set(key, value, ttl_s=ttl_s)
        return [await self.set_if_absent(key, value, ttl_s=ttl_s) for key, value in items]

    async def delete(self, key: str) -> None:
        self._live(key)
        self._server.data.pop(key, None)

    def _group(self, group: str) -> dict[str, tuple[bytes, float]]:
        """`group`'s live members (the expired ones dropped), as Redis would answer."""
        s = self._server
        if s.down:
            raise unavailable("memory cache is down")
        entries = s.groups.get(group, {})
        now = s.clock()
        for member in [m for m, (_, expires) in entries.items() if now >= expires]:
            del entries[member]
        return entries

    async def put_member(self, group: str, member: str, value: bytes, *, ttl_s: float) -> None:
        expires = self._expiry(ttl_s)
        assert expires is not None
        self._group(group)
        self._server.groups.setdefault(group, {})[member] = (as_bytes(value, "value"), expires)

    async def members(self, group: str) -> dict[str, bytes]:
        return {member: value for member, (value, _) in self._group(group).items()}

    async def remove_member(self, group: str, member: str) -> None:
        self._group(group).pop(member, None)

    async def ping(self) -> None:
        if self._server.down:
            raise unavailable("memory cache is down")


__all__ = ["MemoryCache"]
