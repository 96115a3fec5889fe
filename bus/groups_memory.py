"""GroupStore in memory, for unit tests: the semantics of bus/groups_redis.py, states copied in
and out, and `down` to exercise the unavailable paths."""

from __future__ import annotations

from collections.abc import Sequence

from bus.groups import Group
from peernet.errors import unavailable


class MemoryGroupStore:
    """GroupStore in memory (see bus/groups.py); locks never expire here."""

    def __init__(self) -> None:
        self.states: dict[str, Group] = {}
        self.locks: dict[str, str] = {}
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise unavailable("groups: the memory store is down")

    async def get_many(self, convs: Sequence[str]) -> list[Group | None]:
        self._check()
        return [self.states.get(conv) for conv in convs]

    async def lock(self, conv: str, token: str, ttl_ms: int) -> bool:
        self._check()
        if conv in self.locks:
            return False
        self.locks[conv] = token
        return True

    async def unlock(self, conv: str, token: str) -> None:
        self._check()
        if self.locks.get(conv) == token:
            del self.locks[conv]

    async def put(self, group: Group, *, unlock: str | None = None) -> None:
        self._check()
        current = self.states.get(group.conv)
        if current is None or current.version <= group.version:
            self.states[group.conv] = Group.from_dict(group.to_dict())
        if unlock is not None:
            await self.unlock(group.conv, unlock)

    async def put_many(self, groups: Sequence[Group]) -> None:
        for group in groups:
            await self.put(group)

    async def close(self) -> None:
        pass
