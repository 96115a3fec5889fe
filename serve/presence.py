"""The gateway replica's side of presence: how many connections each user has here (reported to
the users' presence shards on the first open and the last close, never per frame), the replica's
lease, and the watchers of this replica with one pub/sub subscription per watched user."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Sequence
from typing import Any, Protocol

from bus.presence import OFFLINE, ONLINE, PresenceState, PresenceStore
from bus.pubsub import PubSub, Subscription
from peernet.codec import Frame, unpack
from peernet.errors import PeerNetError, bad_request
from peernet.ids import now_ms
from peernet.lease import LeaseTiming
from peernet.routing import shard_for
from peernet.wire import presence_channel
from serve import metrics
from serve.hub import Outgoing

log = logging.getLogger("peernet.presence")

# How long a report to a shard may take before it is retried (the shard may be restarting).
REPORT_RETRY_MAX_S = 2.0
# Users read in one round trip when the pub/sub connection comes back.
RECOVER_CHUNK = 1_000
# A watch reads its users' states again this long after its reply (see Watchers).
WATCH_RECHECK_S = 1.0


class PresenceShards(Protocol):
    """The presence shards as a replica reports to them (Ray actors in production).

    `seq` numbers one replica's reports: a shard ignores a report older than one it applied, so a
    report retried after a newer one cannot undo it."""

    count: int

    async def update(self, shard: int, replica: str, seq: int, online: list[str],
                     offline: list[str]) -> None: ...

    async def sync(self, shard: int, replica: str, seq: int, users: list[str]) -> None: ...


class Watcher(Protocol):
    user: str

    @property
    def watching(self) -> set[str]:
        """The users it watches, which Watchers add to and take from."""

    def push(self, out: Outgoing) -> None: ...


class ReplicaPresence:
    """This replica's users and its lease.

    `opened`/`closed` only count and mark the user dirty for its shard; one reporter task per
    shard sends the dirty users' current states (a batch per call, one call in flight per shard).
    The lease is renewed every `renew_ms`; when a renewal finds it lapsed (this replica stalled,
    or Redis lost it), the shards may have counted our users out, so each reporter re-sends its
    full set.
    """

    def __init__(self, store: PresenceStore, shards: PresenceShards, timing: LeaseTiming,
                 replica: str, report_gap_s: float = 0.0) -> None:
        self.replica = f"{replica}.{uuid.uuid4().hex[:8]}"  # one incarnation of the replica
        self.report_gap_s = report_gap_s
        self._store = store
        self._shards = shards
        self._timing = timing
        self._counts: dict[str, int] = {}
        self._reporters = [_Reporter(self, i) for i in range(shards.count)]
        self._seq = 0
        self._reported = False
        self._renewer: asyncio.Task[None] | None = None
        self.lease_lapses = 0

    def online_here(self, user: str) -> bool:
        return user in self._counts

    def opened(self, user: str) -> None:
        count = self._counts.get(user, 0) + 1
        self._counts[user] = count
        if count == 1:
            self._reporters[shard_for(user, self._shards.count)].mark(user)

    def closed(self, user: str) -> None:
        count = self._counts.get(user, 0) - 1
        if count > 0:
            self._counts[user] = count
            return
        self._counts.pop(user, None)
        self._reporters[shard_for(user, self._shards.count)].mark(user)

    async def start(self) -> None:
        await self._renew()
        self._renewer = asyncio.create_task(self._renew_forever(), name="presence-lease")
        for reporter in self._reporters:
            reporter.start()

    async def stop(self) -> None:
        tasks = [t for t in (self._renewer, *(r.task for r in self._reporters)) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # Releasing the lease lets the shards count our users out within a check interval.
        with contextlib.suppress(PeerNetError):
            await self._store.release_lease(self.replica)

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def users_of(self, shard: int) -> list[str]:
        n = self._shards.count
        return [u for u in self._counts if shard_for(u, n) == shard]

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._timing.renew_ms / 1000)
            try:
                await self._renew()
            except Exception:
                # A bug, not the store (that is `_renew`'s): the lease must still be renewed,
                # or every user of this replica goes offline while it serves them.
                metrics.BACKGROUND_ERRORS.labels("presence_lease").inc()
                log.exception("presence: lease renewal of %s failed", self.replica)

    async def _renew(self) -> None:
        try:
            live = await self._store.renew_lease(self.replica, self._timing.ttl_ms)
        except PeerNetError as exc:
            metrics.PRESENCE_ERRORS.labels("lease").inc()
            log.warning("presence: lease renewal of %s failed: %s", self.replica, exc)
            return
        if not live and self._reported:
            self.lease_lapses += 1
            metrics.PRESENCE_ERRORS.labels("lease_lapsed").inc()
            log.warning("presence: lease of %s had lapsed; re-sending its %d users",
                        self.replica, len(self._counts))
            for reporter in self._reporters:
                reporter.resync()


class _Reporter:
    """Sends one shard what changed for its users on this replica."""

    def __init__(self, owner: ReplicaPresence, shard: int) -> None:
        self._owner = owner
        self._shard = shard
        self._dirty: set[str] = set()
        self._resync = False
        self._wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"presence-report-{self._shard}")

    def mark(self, user: str) -> None:
        self._dirty.add(user)
        self._wake.set()

    def resync(self) -> None:
        self._resync = True
        self._wake.set()

    async def _run(self) -> None:
        owner, shards = self._owner, self._owner._shards
        loop = asyncio.get_running_loop()
        delay = 0.05
        sent_at = float("-inf")
        while True:
            await self._wake.wait()
            # At most one report per gap: after a quiet spell the change goes at once; in a
            # burst what comes within the gap rides the same call.
            wait = sent_at + owner.report_gap_s - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            sent_at = loop.time()
            self._wake.clear()
            resync, self._resync = self._resync, False
            batch, self._dirty = self._dirty, set()
            try:
                if resync:
                    await shards.sync(self._shard, owner.replica, owner.next_seq(),
                                      owner.users_of(self._shard))
                elif batch:
                    online = [u for u in batch if owner.online_here(u)]
                    offline = [u for u in batch if not owner.online_here(u)]
                    await shards.update(self._shard, owner.replica, owner.next_seq(), online,
                                        offline)
                owner._reported = True
                delay = 0.05
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The shard is restarting or Redis is down: the same users go again, with their
                # states as they are then, under a newer seq.
                metrics.PRESENCE_ERRORS.labels("report").inc()
                log.warning("presence: report to shard %d failed (retry in %.2fs): %r",
                            self._shard, delay, exc)
                self._dirty |= batch
                self._resync = self._resync or resync
                self._wake.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, REPORT_RETRY_MAX_S)


class Watchers:
    """The connections of this replica that watch users, with one subscription per watched user.

    While a `watch` reads the current states, pushes for that connection are held back and folded
    into the reply, so that the reply is never older than a push already sent. When the pub/sub
    connection comes back after a drop, the states of every watched user are read again and
    what changed meanwhile is pushed.

    A shard publishes a change before it records it (actors/presence.py says why), so a change
    published just before a watch subscribed and recorded just after it read the store is in
    neither: `recheck_s` after each watch its new users are read again and what changed is
    pushed (the CI runs that waited 20 s for an online report after a presence shard restart).
    """

    def __init__(self, pubsub: PubSub, store: PresenceStore, max_watch: int, *,
                 recheck_s: float = WATCH_RECHECK_S) -> None:
        self._pubsub = pubsub
        self._store = store
        self._max = max_watch
        self._recheck_s = recheck_s
        self._by_user: dict[str, set[Watcher]] = {}
        self._subs: dict[str, asyncio.Task[Subscription]] = {}
        self._held: dict[Watcher, dict[str, Frame]] = {}
        # The newest state this replica knows of each watched user (for recovery).
        self._last: dict[str, PresenceState] = {}
        self._background: set[asyncio.Future[Any]] = set()
        pubsub.on_reconnect(self._on_reconnect)

    def watched(self) -> int:
        return len(self._by_user)

    async def watch(self, conn: Watcher, users: Sequence[str]) -> dict[str, PresenceState]:
        new = [u for u in users if u not in conn.watching]
        if len(conn.watching) + len(new) > self._max:
            raise bad_request(f"a connection may watch at most {self._max} users "
                              f"(it watches {len(conn.watching)})")
        self._held[conn] = {}
        try:
            for user in new:
                self._add(conn, user)
            await asyncio.gather(*(asyncio.shield(self._subs[u]) for u in new))
            states = await self._store.read(users)
        except BaseException:
            for user in new:
                self._remove(conn, user)
            self._release(conn, {})
            raise
        for user, state in states.items():
            self._note(user, state)
        self._release(conn, states)
        if new:
            self._in_background(self._recover(new, after_s=self._recheck_s))
        return states

    def unwatch(self, conn: Watcher, users: Sequence[str]) -> None:
        for user in users:
            if user in conn.watching:
                self._remove(conn, user)

    def forget(self, conn: Watcher) -> None:
        self.unwatch(conn, list(conn.watching))
        self._held.pop(conn, None)

    def _release(self, conn: Watcher, states: dict[str, PresenceState]) -> None:
        """Fold the pushes held during a watch into `states`; push the others."""
        for user, frame in self._held.pop(conn, {}).items():
            ts = int(frame["ts"])
            if user in states:
                if ts >= states[user].since:
                    states[user] = PresenceState(frame["status"], ts)
            elif user in conn.watching:
                conn.push(Outgoing(frame))

    def _add(self, conn: Watcher, user: str) -> None:
        conn.watching.add(user)
        self._by_user.setdefault(user, set()).add(conn)
        if user not in self._subs:
            self._subs[user] = asyncio.ensure_future(
                self._pubsub.subscribe(presence_channel(user), self._dispatch))

    def _remove(self, conn: Watcher, user: str) -> None:
        conn.watching.discard(user)
        watchers = self._by_user.get(user)
        if watchers is None:
            return
        watchers.discard(conn)
        if watchers:
            return
        del self._by_user[user]
        self._last.pop(user, None)
        task = self._subs.pop(user, None)
        if task is not None:
            self._in_background(self._unsubscribe(task))

    async def _unsubscribe(self, task: asyncio.Task[Subscription]) -> None:
        try:
            sub = await task
            await sub.unsubscribe()
        except Exception as exc:  # the subscription failed or the broker is gone: nothing to undo
            metrics.BACKGROUND_ERRORS.labels("presence_unsubscribe").inc()
            log.debug("presence unsubscribe failed: %s", exc)

    def _in_background(self, coro: Any) -> None:
        fut = asyncio.ensure_future(coro)
        self._background.add(fut)
        fut.add_done_callback(self._background_done)

    def _background_done(self, fut: asyncio.Future[Any]) -> None:
        # Nobody awaits these tasks: a failure is told here, or it would only surface as "Task
        # exception was never retrieved" when the task is collected.
        self._background.discard(fut)
        if fut.cancelled() or fut.exception() is None:
            return
        metrics.BACKGROUND_ERRORS.labels("presence_watchers").inc()
        log.error("presence: a background task of the watchers failed", exc_info=fut.exception())

    def _note(self, user: str, state: PresenceState) -> bool:
        """Remember `state` unless an equal or newer one is known; True when it was news."""
        if user not in self._by_user:
            return False
        last = self._last.get(user)
        if last is not None and (last.since > state.since or last == state):
            return False
        self._last[user] = state
        return True

    def _dispatch(self, channel: str, payload: bytes) -> None:
        user = channel[2:]
        if user not in self._by_user:
            return
        try:
            frame = unpack(payload)
            state = PresenceState(frame["status"], int(frame["ts"]))
        except Exception:
            log.error("undecodable presence push on %s dropped", channel)
            return
        metrics.PRESENCE_PUSH_LATENCY.observe(max(0, now_ms() - state.since) / 1000)
        self._note(user, state)
        self._deliver(user, frame)

    def _deliver(self, user: str, frame: Frame) -> None:
        out: Outgoing | None = None
        for conn in list(self._by_user.get(user, ())):
            held = self._held.get(conn)
            if held is not None:
                previous = held.get(user)
                if previous is None or int(previous["ts"]) <= int(frame["ts"]):
                    held[user] = frame
                continue
            if out is None:
                out = Outgoing(frame)
            conn.push(out)

    def _on_reconnect(self) -> None:
        self._in_background(self._recover(list(self._by_user)))

    async def _recover(self, users: list[str], *, after_s: float = 0.0) -> None:
        """Read `users`' states again (those still watched) and push what is news."""
        if after_s:
            await asyncio.sleep(after_s)
            users = [u for u in users if u in self._by_user]
        for start in range(0, len(users), RECOVER_CHUNK):
            try:
                states = await self._store.read(users[start:start + RECOVER_CHUNK])
            except PeerNetError as exc:
                metrics.BACKGROUND_ERRORS.labels("presence_recover").inc()
                log.warning("presence: re-reading watched users failed: %s", exc)
                return
            for user, state in states.items():
                if self._note(user, state):
                    self._deliver(user, {"t": "presence", "user": user, "status": state.status,
                                         "ts": state.since})


class Presence:
    """Presence as the gateway replica's connections and HTTP API use it."""

    def __init__(self, store: PresenceStore, shards: PresenceShards, pubsub: PubSub,
                 timing: LeaseTiming, replica: str, max_watch: int,
                 report_gap_s: float = 0.0) -> None:
        self.store = store
        self.replica = ReplicaPresence(store, shards, timing, replica, report_gap_s)
        self.watchers = Watchers(pubsub, store, max_watch)

    async def start(self) -> None:
        await self.replica.start()

    async def stop(self) -> None:
        await self.replica.stop()

    def connected(self, conn: Watcher) -> None:
        self.replica.opened(conn.user)

    def disconnected(self, conn: Watcher) -> None:
        """The connection closed, whatever the reason: it holds and watches nobody any more."""
        self.replica.closed(conn.user)
        self.watchers.forget(conn)

    async def watch(self, conn: Watcher, users: Sequence[str]) -> dict[str, PresenceState]:
        return await self.watchers.watch(conn, users)

    def unwatch(self, conn: Watcher, users: Sequence[str]) -> None:
        self.watchers.unwatch(conn, users)

    async def read(self, users: Sequence[str]) -> dict[str, PresenceState]:
        return await self.store.read(users)


def state_map(states: dict[str, PresenceState]) -> dict[str, dict[str, Any]]:
    """The protocol's `users` map: {U: {"status": S, "since": TS}}."""
    return {u: {"status": s.status, "since": s.since} for u, s in states.items()}


__all__ = ["OFFLINE", "ONLINE", "Presence", "PresenceShards", "ReplicaPresence", "Watchers",
           "state_map"]
