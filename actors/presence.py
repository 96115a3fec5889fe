"""Presence as virtual actors: plain `PresenceShard`s, each owning the users
`shard_for(user, count)` picks, count them online while at least one live gateway replica holds
a connection of theirs.

Gateway replicas report a user to the owning shard on the user's first connection on that replica
and on the last close (absolute states, so a repeated report is harmless), and renew a lease in
the PresenceStore. A shard counts a replica's users out when its lease lapses. Every change is
recorded in the store (atomically with the replica's user set) before it is published on the
user's channel `p:{user}`, which only replicas with a watcher of that user subscribe to. A shard
keeps only online users in memory and rebuilds them from the store when it starts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from bus.presence import OFFLINE, ONLINE, Change, PresenceStore
from bus.pubsub import PubSub
from peernet.codec import pack
from peernet.errors import PeerNetError
from peernet.ids import now_ms
from peernet.lease import LeaseTiming
from peernet.routing import shard_for
from peernet.wire import presence_channel

log = logging.getLogger("peernet.presence")

T = TypeVar("T")

# Changes published in one round trip when a batch changes many users (a replica's users
# counted out).
PUBLISH_CHUNK = 1_000
# Users whose state a rebuilding shard reads in one round trip.
REBUILD_CHUNK = 1_000


def presence_frame(change: Change) -> dict[str, object]:
    return {"t": "presence", "user": change.user, "status": change.status, "ts": change.ts}


@dataclass
class PresenceStats:
    started: bool = False
    online: int = 0  # users online (owned by this shard)
    replicas: int = 0  # replicas holding at least one of them
    changes: int = 0
    count_outs: int = 0  # replicas counted out because their lease lapsed
    stale_reports: int = 0  # reports older than one already applied, ignored
    errors: int = 0
    last_error: str = ""


class PresenceShard:
    """Owns the presence of the users `shard_for(user, count) == index`."""

    def __init__(self, index: int, count: int, store: PresenceStore, pubsub: PubSub,
                 timing: LeaseTiming, *, clock: Callable[[], int] = now_ms) -> None:
        self.index = index
        self.count = count
        self._store = store
        self._pubsub = pubsub
        self._timing = timing
        self._clock = clock
        # Online users only: user -> the replicas holding them, and the reverse.
        self._holders: dict[str, set[str]] = {}
        self._by_replica: dict[str, set[str]] = {}
        self._since: dict[str, int] = {}  # online user -> since when
        # The newest report applied per replica: a report retried after a newer one is stale.
        # Kept for replicas that hold nobody any more too (one int per replica incarnation).
        self._report_seq: dict[str, int] = {}
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._calls = 0  # reports received and not yet finished (queue_depth)
        self.stats = PresenceStats()

    @property
    def name(self) -> str:
        # The shard count is part of the name: another count owns users differently.
        return f"{self.index}of{self.count}"

    def owns(self, user: str) -> bool:
        return shard_for(user, self.count) == self.index

    def is_online(self, user: str) -> bool:
        return bool(self._holders.get(user))

    def holders(self, user: str) -> set[str]:
        return set(self._holders.get(user, ()))

    async def start(self) -> None:
        """Rebuild the online users from the store (counting out replicas whose lease lapsed
        meanwhile), then check leases every check interval."""
        await self._retry("rebuild", self._rebuild)
        self._task = asyncio.create_task(self._check_forever(), name=f"presence-shard-{self.name}")
        self.stats.started = True
        log.info("presence shard %s started: %d users online on %d replicas", self.name,
                 len(self._holders), len(self._by_replica))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.stats.started = False

    # -- reports from gateway replicas ---------------------------------------------------------

    def queue_depth(self) -> int:
        """Reports (`update`, `sync`) received and not yet finished: waiting for the shard's
        lock (one report at a time) or being published and recorded. A report that failed
        counts no more; the replica retries it as a new call."""
        return self._calls

    async def update(self, replica: str, seq: int, online: Sequence[str],
                     offline: Sequence[str]) -> None:
        """`replica` now holds `online` and not `offline` (its report number `seq`)."""
        self._calls += 1
        try:
            async with self._lock:
                if self._stale(replica, seq):
                    return
                on = set(online)
                await self._apply(replica, on, set(offline) - on)
                self._report_seq[replica] = seq
        finally:
            self._calls -= 1

    async def sync(self, replica: str, seq: int, users: Sequence[str]) -> None:
        """`replica` holds exactly `users` of this shard (after its lease lapsed). Everything
        about them is written again, which repairs a store that lost its data meanwhile."""
        self._calls += 1
        try:
            async with self._lock:
                if self._stale(replica, seq):
                    return
                on = set(users)
                await self._apply(replica, on, self._by_replica.get(replica, set()) - on,
                                  reassert=True)
                self._report_seq[replica] = seq
        finally:
            self._calls -= 1

    async def check_leases(self) -> None:
        """Count out every replica whose lease has lapsed."""
        async with self._lock:
            await self._count_out_lapsed()

    # -- internals -----------------------------------------------------------------------------

    def _stale(self, replica: str, seq: int) -> bool:
        if seq <= self._report_seq.get(replica, -1):
            self.stats.stale_reports += 1
            return True
        return False

    async def _apply(self, replica: str, online: Iterable[str], offline: Iterable[str], *,
                     reassert: bool = False) -> None:
        """Publish and record what changes; memory changes only once the store has it.
        `reassert`: also write again the replica's users that stay online, and their states.

        Published first: a shard killed between the two leaves the store without the change,
        so the report Ray retries on the restarted shard finds it again and publishes it again
        (a watcher may see it twice). Recorded first, a kill right after the write would leave
        the change in the store, found by no retry and told to no watcher."""
        held = self._by_replica.get(replica, set())
        keep = sorted(u for u in online if u in held) if reassert else []
        add = sorted(u for u in online if u not in held and self._mine(u))
        remove = sorted(u for u in offline if u in held)
        if not add and not remove and not reassert:
            return
        now = self._clock()
        changes = [Change(u, ONLINE, now) for u in add if not self._holders.get(u)]
        changes += [Change(u, OFFLINE, now) for u in remove if self._holders.get(u) == {replica}]
        unchanged = [Change(u, ONLINE, self._since.get(u, now)) for u in keep]
        empty = not add and len(remove) == len(held)  # remove is a subset of held
        await self._publish(changes)
        await self._store.record(self.name, replica, add=add + keep, remove=remove,
                                 changes=changes + unchanged, forget=empty)
        for u in add:
            self._holders.setdefault(u, set()).add(replica)
        for u in remove:
            holders = self._holders[u]
            holders.discard(replica)
            if not holders:
                del self._holders[u]
        for c in changes:
            if c.status == ONLINE:
                self._since[c.user] = c.ts
            else:
                self._since.pop(c.user, None)
        if empty:
            self._by_replica.pop(replica, None)
        else:
            mine = self._by_replica.setdefault(replica, set())
            mine.difference_update(remove)
            mine.update(add)
        self.stats.online = len(self._holders)
        self.stats.replicas = len(self._by_replica)
        self.stats.changes += len(changes)

    def _mine(self, user: str) -> bool:
        if self.owns(user):
            return True
        log.warning("presence shard %s: report of %s, owned by another shard, ignored",
                    self.name, user)
        return False

    async def _publish(self, changes: Sequence[Change]) -> None:
        # Pub/sub is at most once: a watcher that misses a change reads the state again when its
        # replica's pub/sub connection comes back (serve/presence.py). A report's changes go in
        # one round trip (a publish each cost a pooled connection and its own reply).
        for start in range(0, len(changes), PUBLISH_CHUNK):
            chunk = changes[start:start + PUBLISH_CHUNK]
            try:
                await self._pubsub.publish_many(
                    [(presence_channel(c.user), pack(presence_frame(c))) for c in chunk])
            except Exception as exc:
                self._count_error("publish", exc)

    async def _count_out_lapsed(self) -> None:
        replicas = list(self._by_replica)
        if not replicas:
            return
        live = await self._store.live(replicas)
        for replica in replicas:
            if replica in live:
                continue
            users = set(self._by_replica.get(replica, ()))
            log.warning("presence shard %s: lease of replica %s lapsed; %d users counted out",
                        self.name, replica, len(users))
            await self._apply(replica, (), users)
            self.stats.count_outs += 1

    async def _rebuild(self) -> None:
        async with self._lock:
            held = await self._store.held(self.name)
            self._holders.clear()
            self._by_replica.clear()
            self._since.clear()
            for replica, users in held.items():
                if users:
                    self._by_replica[replica] = set(users)
                for user in users:
                    self._holders.setdefault(user, set()).add(replica)
            await self._count_out_lapsed()
            await self._load_since()
            self.stats.online = len(self._holders)
            self.stats.replicas = len(self._by_replica)

    async def _load_since(self) -> None:
        """Read when each held user came online; a user the store does not have online (it
        lost the state) is written online from now."""
        users = sorted(self._holders)
        now = self._clock()
        for start in range(0, len(users), REBUILD_CHUNK):
            chunk = users[start:start + REBUILD_CHUNK]
            states = await self._store.read(chunk)
            lost: list[Change] = []
            for user in chunk:
                state = states[user]
                if state.status == ONLINE:
                    self._since[user] = state.since
                else:
                    self._since[user] = now
                    lost.append(Change(user, ONLINE, now))
            if lost:
                replica = next(iter(self._holders[lost[0].user]))
                await self._store.record(self.name, replica, changes=lost)
                await self._publish(lost)

    async def _check_forever(self) -> None:
        while True:
            await asyncio.sleep(self._timing.check_ms / 1000)
            try:
                await self.check_leases()
            except PeerNetError as exc:
                # The store is down: nobody can renew either, so nobody is counted out.
                self._count_error("check leases", exc)
            except Exception as exc:
                self._count_error("check leases", exc)
                log.exception("presence shard %s: lease check failed", self.name)

    async def _retry(self, what: str, action: Callable[[], Awaitable[T]]) -> T:
        delay = 0.05
        while True:
            try:
                return await action()
            except PeerNetError as exc:
                self._count_error(what, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _count_error(self, what: str, exc: BaseException) -> None:
        self.stats.errors += 1
        self.stats.last_error = f"{what}: {exc}"[:300]
        log.warning("presence shard %s: %s failed: %s", self.name, what, exc)
