"""PresenceStore in memory, for unit tests, with the semantics of bus/presence_redis.py: leases
and last-seen times expire by a clock the test may advance, answers are copies, `wipe` loses
everything as a restarted Redis would, and `set_down` makes every call
PeerNetError(unavailable). `client()` returns another client of the same server."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from bus.presence import NEVER_SEEN, ONLINE, Change, PresenceState
from peernet.errors import unavailable


class _PresenceServer:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.users: dict[str, tuple[PresenceState, float | None]] = {}
        self.leases: dict[str, float] = {}
        self.held: dict[str, dict[str, set[str]]] = {}  # shard -> replica -> users
        self.down = False


class MemoryPresenceStore:
    """PresenceStore in memory, with expiry by `clock` (seconds; time.monotonic unless given,
    so tests can advance time). Answers are copies; `set_down` makes every call unavailable."""

    def __init__(self, *, last_seen_ttl_s: float = 30 * 24 * 3600,
                 clock: Callable[[], float] = time.monotonic,
                 _server: _PresenceServer | None = None) -> None:
        self._server = _server or _PresenceServer(clock)
        self._last_seen_s = last_seen_ttl_s

    def client(self) -> MemoryPresenceStore:
        return MemoryPresenceStore(last_seen_ttl_s=self._last_seen_s, _server=self._server)

    def set_down(self, down: bool) -> None:
        self._server.down = down

    def wipe(self) -> None:
        """Lose everything, as a restarted Redis without persistence would."""
        s = self._server
        s.users.clear()
        s.leases.clear()
        s.held.clear()

    def _s(self) -> _PresenceServer:
        if self._server.down:
            raise unavailable("memory presence store is down")
        return self._server

    def _lease_live(self, replica: str) -> bool:
        s = self._server
        expires = s.leases.get(replica)
        if expires is None:
            return False
        if s.clock() >= expires:
            del s.leases[replica]
            return False
        return True

    async def renew_lease(self, replica: str, ttl_ms: int) -> bool:
        s = self._s()
        was_live = self._lease_live(replica)
        s.leases[replica] = s.clock() + max(1, ttl_ms) / 1000
        return was_live

    async def release_lease(self, replica: str) -> None:
        self._s().leases.pop(replica, None)

    async def live(self, replicas: Sequence[str]) -> set[str]:
        self._s()
        return {r for r in replicas if self._lease_live(r)}

    async def read(self, users: Sequence[str]) -> dict[str, PresenceState]:
        s = self._s()
        now = s.clock()
        out: dict[str, PresenceState] = {}
        for user in users:
            entry = s.users.get(user)
            if entry is not None and entry[1] is not None and now >= entry[1]:
                del s.users[user]
                entry = None
            out[user] = NEVER_SEEN if entry is None else entry[0]
        return out

    async def held(self, shard: str) -> dict[str, set[str]]:
        return {r: set(u) for r, u in self._s().held.get(shard, {}).items()}

    async def record(self, shard: str, replica: str, *, add: Sequence[str] = (),
                     remove: Sequence[str] = (), changes: Sequence[Change] = (),
                     forget: bool = False) -> None:
        s = self._s()
        if not (add or remove or changes or forget):
            return
        by_replica = s.held.setdefault(shard, {})
        if forget:
            by_replica.pop(replica, None)
        else:
            users = by_replica.setdefault(replica, set())
            users.difference_update(remove)
            users.update(add)
        now = s.clock()
        for c in changes:
            expires = None if c.status == ONLINE else now + self._last_seen_s
            s.users[c.user] = (PresenceState(c.status, c.ts), expires)


__all__ = ["MemoryPresenceStore"]
