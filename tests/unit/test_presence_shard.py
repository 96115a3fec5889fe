"""Presence logic without Ray or Redis: PresenceShards, the replicas' reporting and leases, and the
watchers, on the in-memory PresenceStore and PubSub (bus/presence_memory.py,
bus/pubsub_memory.py)."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from unit_helpers import eventually, users_of_shard

from actors.presence import LeaseTiming, PresenceShard, presence_channel
from bus.presence import NEVER_SEEN, OFFLINE, ONLINE, Change, PresenceState
from bus.presence_memory import MemoryPresenceStore
from bus.pubsub_memory import MemoryPubSub
from peernet.codec import unpack
from peernet.errors import ErrorCode, PeerNetError
from serve.hub import Outgoing
from serve.presence import ReplicaPresence, Watchers

TIMING = LeaseTiming(3_000)  # check 300 ms, ttl 2,400 ms, renew 500 ms


class Clock:
    """One clock for the store's expiry (seconds) and the shards' timestamps (ms)."""

    def __init__(self) -> None:
        self.t = 1_000.0

    def __call__(self) -> float:
        return self.t

    def ms(self) -> int:
        return int(self.t * 1000)

    def advance(self, seconds: float) -> None:
        self.t += seconds


def users_of(shard: int, count: int, n: int) -> list[str]:
    """`n` fresh user ids (a tag per call) that shard `shard` of `count` owns."""
    return users_of_shard(shard, count, n, prefix=f"u{uuid.uuid4().hex[:6]}_")


class Pushes:
    """Records presence pushes on channels, as a watching replica would get them."""

    def __init__(self, listener: MemoryPubSub) -> None:
        self.got: list[dict[str, Any]] = []
        self.listener = listener

    def __call__(self, channel: str, payload: bytes) -> None:
        self.got.append(unpack(payload))

    async def settle(self, pubsub: MemoryPubSub) -> None:
        await settled(self.listener, pubsub)

    def of(self, user: str) -> list[tuple[str, int]]:
        return [(f["status"], f["ts"]) for f in self.got if f["user"] == user]


async def settled(listener: MemoryPubSub, pubsub: MemoryPubSub) -> None:
    """Return once everything published on `pubsub` so far has reached `listener`: a marker
    published now arrives after it (a connection keeps the order of publishes). So "nothing more
    came" is checked, not guessed after a sleep."""
    arrived: list[str] = []
    await listener.subscribe("settle", lambda channel, data: arrived.append(channel))
    publisher = pubsub.client()
    await publisher.start()
    try:
        await publisher.publish("settle", b"")
        await eventually(lambda: arrived)
    finally:
        await publisher.stop()


@dataclass
class World:
    clock: Clock
    store: MemoryPresenceStore
    pubsub: MemoryPubSub
    shards: list[PresenceShard] = field(default_factory=list)

    async def watch(self, *users: str) -> Pushes:
        listener = self.pubsub.client()
        await listener.start()
        pushes = Pushes(listener)
        for user in users:
            await listener.subscribe(presence_channel(user), pushes)
        return pushes


async def start_shard(w: World, index: int) -> PresenceShard:
    ps = w.pubsub.client()
    await ps.start()
    shard = PresenceShard(index, 2, w.store.client(), ps, TIMING, clock=w.clock.ms)
    await shard.start()
    return shard


@pytest.fixture
async def world() -> Any:
    clock = Clock()
    store = MemoryPresenceStore(clock=clock, last_seen_ttl_s=3600)
    pubsub = MemoryPubSub()
    await pubsub.start()
    w = World(clock, store, pubsub)
    for i in range(2):
        w.shards.append(await start_shard(w, i))
    yield w
    for shard in w.shards:
        await shard.stop()


async def test_a_user_is_online_while_any_replica_holds_them(world: World) -> None:
    (alice,) = users_of(0, 2, 1)
    shard = world.shards[0]
    pushes = await world.watch(alice)
    assert (await world.store.read([alice]))[alice] == NEVER_SEEN

    await world.store.renew_lease("r1", TIMING.ttl_ms)
    await world.store.renew_lease("r2", TIMING.ttl_ms)
    t_on = world.clock.ms()
    await shard.update("r1", 1, [alice], [])
    world.clock.advance(1)
    await shard.update("r2", 1, [alice], [])  # a second replica: no change
    await shard.update("r1", 2, [], [alice])  # one of two gone: still online
    assert shard.holders(alice) == {"r2"}
    assert (await world.store.read([alice]))[alice] == PresenceState(ONLINE, t_on)
    world.clock.advance(1)
    t_off = world.clock.ms()
    await shard.update("r2", 2, [], [alice])
    assert not shard.is_online(alice)
    assert (await world.store.read([alice]))[alice] == PresenceState(OFFLINE, t_off)
    await eventually(lambda: len(pushes.got) == 2)
    assert pushes.of(alice) == [(ONLINE, t_on), (OFFLINE, t_off)]
    assert pushes.got[0] == {"t": "presence", "user": alice, "status": "online", "ts": t_on}
    # No state per offline user in the shard's memory.
    assert shard._holders == {} and shard._by_replica == {}
    assert shard.stats.online == 0 and shard.stats.changes == 2


async def test_repeated_and_stale_reports_change_nothing(world: World) -> None:
    alice, bob = users_of(1, 2, 2)
    shard = world.shards[1]
    pushes = await world.watch(alice, bob)
    await shard.update("r1", 5, [alice, bob], [])
    await shard.update("r1", 6, [alice, bob], [])  # the same states again
    await shard.update("r1", 4, [], [alice])  # older than one applied: ignored
    assert shard.is_online(alice) and shard.is_online(bob)
    assert shard.stats.stale_reports == 1
    await eventually(lambda: len(pushes.got) == 2)
    await pushes.settle(world.pubsub)  # nothing more was published
    assert len(pushes.got) == 2


async def test_sync_sets_exactly_the_replicas_users(world: World) -> None:
    a, b, c = users_of(0, 2, 3)
    shard = world.shards[0]
    await shard.update("r1", 1, [a, b], [])
    await shard.sync("r1", 2, [b, c])
    assert [shard.is_online(u) for u in (a, b, c)] == [False, True, True]
    assert await world.store.held(shard.name) == {"r1": {b, c}}
    await shard.sync("r1", 3, [])
    assert await world.store.held(shard.name) == {}


async def test_reports_of_users_owned_by_another_shard_are_ignored(world: World) -> None:
    (other,) = users_of(1, 2, 1)
    await world.shards[0].update("r1", 1, [other], [])
    assert not world.shards[0].is_online(other)
    assert (await world.store.read([other]))[other] == NEVER_SEEN


async def test_a_lapsed_lease_counts_the_replicas_users_out(world: World) -> None:
    a, b = users_of(0, 2, 2)
    shard = world.shards[0]
    pushes = await world.watch(a, b)
    await world.store.renew_lease("dead", TIMING.ttl_ms)
    await world.store.renew_lease("alive", TIMING.ttl_ms)
    await shard.update("dead", 1, [a, b], [])
    await shard.update("alive", 1, [b], [])
    world.clock.advance(TIMING.ttl_ms / 1000 - 0.1)
    await world.store.renew_lease("alive", TIMING.ttl_ms)
    await shard.check_leases()
    assert shard.is_online(a)  # not lapsed yet
    world.clock.advance(0.2)
    await shard.check_leases()
    assert not shard.is_online(a)
    assert shard.holders(b) == {"alive"}
    assert shard.stats.count_outs == 1
    assert await world.store.held(shard.name) == {"alive": {b}}
    await eventually(lambda: len(pushes.got) == 3)
    assert [s for s, _ in pushes.of(a)] == [ONLINE, OFFLINE]
    assert [s for s, _ in pushes.of(b)] == [ONLINE]


async def test_a_restarted_shard_rebuilds_online_users_from_live_leases(world: World) -> None:
    a, b, c = users_of(1, 2, 3)
    old = world.shards[1]
    await world.store.renew_lease("r1", TIMING.ttl_ms)
    await world.store.renew_lease("r2", TIMING.ttl_ms)
    await old.update("r1", 1, [a, b], [])
    await old.update("r2", 1, [c], [])
    await old.stop()  # killed: its memory is gone
    pushes = await world.watch(a, b, c)
    world.clock.advance(TIMING.ttl_ms / 1000 + 0.1)
    await world.store.renew_lease("r1", TIMING.ttl_ms)  # r1 lives on; r2 died meanwhile

    del world.store._server.users[b]  # a state lost with the rest kept: repaired on rebuild
    new = world.shards[1] = await start_shard(world, 1)
    assert new.is_online(a) and new.is_online(b) and not new.is_online(c)
    states = await world.store.read([a, b, c])
    assert [states[u].status for u in (a, b, c)] == [ONLINE, ONLINE, OFFLINE]
    await eventually(lambda: len(pushes.got) == 2)
    assert {(f["user"], f["status"]) for f in pushes.got} == {(c, OFFLINE), (b, ONLINE)}
    # The rebuilt shard carries on: r1's last close takes a and b offline.
    await new.update("r1", 2, [], [a, b])
    assert not new.is_online(a) and not new.is_online(b)


async def test_a_failed_write_changes_nothing_and_the_retry_applies(world: World) -> None:
    (a,) = users_of(0, 2, 1)
    shard = world.shards[0]
    world.store.set_down(True)
    with pytest.raises(PeerNetError) as err:
        await shard.update("r1", 1, [a], [])
    assert err.value.code is ErrorCode.UNAVAILABLE
    assert not shard.is_online(a)
    world.store.set_down(False)
    await shard.update("r1", 2, [a], [])
    assert shard.is_online(a)


class DiesAfterWrite:
    """A store client whose process is killed right after its `record` reached the store."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def record(self, *args: Any, **kwargs: Any) -> None:
        await self._store.record(*args, **kwargs)
        raise asyncio.CancelledError  # ray.kill: the actor is gone mid-call


async def test_a_shard_killed_right_after_its_write_loses_no_change(world: World) -> None:
    """The e2e shard-kill test once lost a change: the dying shard had written it and not yet
    published it, and the retried report found nothing to change on the restarted shard."""
    (a,) = users_of(0, 2, 1)
    await world.store.renew_lease("r1", TIMING.ttl_ms)  # r1 lives throughout
    pushes = await world.watch(a)
    ps = world.pubsub.client()
    await ps.start()
    dying = PresenceShard(0, 2, DiesAfterWrite(world.store.client()), ps, TIMING,
                          clock=world.clock.ms)
    await dying.start()
    with pytest.raises(asyncio.CancelledError):
        await dying.update("r1", 1, [a], [])
    await dying.stop()
    restarted = await start_shard(world, 0)
    try:
        await restarted.update("r1", 1, [a], [])  # Ray retries the call on the new actor
        assert restarted.is_online(a)
        await eventually(lambda: [s for s, _ in pushes.of(a)] in ([ONLINE], [ONLINE, ONLINE]))
    finally:
        await restarted.stop()


async def test_last_seen_is_kept_for_a_while_then_the_user_reads_as_never_seen(world: World) -> None:
    (a,) = users_of(0, 2, 1)
    shard = world.shards[0]
    await shard.update("r1", 1, [a], [])
    await shard.update("r1", 2, [], [a])
    assert (await world.store.read([a]))[a].status == OFFLINE
    world.clock.advance(3601)
    assert (await world.store.read([a]))[a] == NEVER_SEEN


# -- the gateway side ------------------------------------------------------------------------


class InProcessShards:
    """PresenceShards calling PresenceShard objects directly; can be made to fail."""

    def __init__(self, shards: list[PresenceShard]) -> None:
        self.shards = shards
        self.count = len(shards)
        self.calls: list[tuple[str, int, list[str], list[str]]] = []
        self.failing = False
        self.refused = 0  # calls made while failing

    async def update(self, shard: int, replica: str, seq: int, online: list[str],
                     offline: list[str]) -> None:
        if self.failing:
            self.refused += 1
            raise RuntimeError("shard unreachable")
        self.calls.append(("update", shard, sorted(online), sorted(offline)))
        await self.shards[shard].update(replica, seq, online, offline)

    async def sync(self, shard: int, replica: str, seq: int, users: list[str]) -> None:
        if self.failing:
            self.refused += 1
            raise RuntimeError("shard unreachable")
        self.calls.append(("sync", shard, sorted(users), []))
        await self.shards[shard].sync(replica, seq, users)


@dataclass(eq=False)
class FakeConn:
    user: str
    watching: set[str] = field(default_factory=set)
    frames: list[dict[str, Any]] = field(default_factory=list)

    def push(self, out: Outgoing) -> None:
        self.frames.append(out.frame)


async def test_a_replica_reports_the_first_open_and_the_last_close_only(world: World) -> None:
    shards = InProcessShards(world.shards)
    replica = ReplicaPresence(world.store.client(), shards, TIMING, "gw1")
    await replica.start()
    try:
        (a,) = users_of(0, 2, 1)
        replica.opened(a)
        replica.opened(a)
        await eventually(lambda: world.shards[0].is_online(a))
        replica.closed(a)
        await asyncio.sleep(0.05)
        assert world.shards[0].is_online(a)
        replica.closed(a)
        await eventually(lambda: not world.shards[0].is_online(a))
        assert shards.calls == [("update", 0, [a], []), ("update", 0, [], [a])]
    finally:
        await replica.stop()


async def test_reports_are_retried_until_the_shard_answers(world: World) -> None:
    shards = InProcessShards(world.shards)
    replica = ReplicaPresence(world.store.client(), shards, TIMING, "gw1")
    await replica.start()
    try:
        a, b = users_of(1, 2, 2)
        shards.failing = True
        replica.opened(a)
        replica.opened(b)
        replica.closed(b)  # opened and closed while the shard was away: never reported online
        await eventually(lambda: shards.refused >= 2)  # the report failed, and so did its retry
        assert not world.shards[1].is_online(a)
        shards.failing = False
        await eventually(lambda: world.shards[1].is_online(a))
        assert not world.shards[1].is_online(b)
        # One report got through: the retried one, with both users as they are by then.
        assert shards.calls == [("update", 1, [a], [b])], shards.calls
    finally:
        await replica.stop()


async def test_a_replica_whose_lease_lapsed_sends_its_users_again(world: World) -> None:
    shards = InProcessShards(world.shards)
    replica = ReplicaPresence(world.store.client(), shards, TIMING, "gw1")
    await replica.start()
    try:
        (a,) = users_of(0, 2, 1)
        replica.opened(a)
        await eventually(lambda: world.shards[0].is_online(a))
        world.clock.advance(TIMING.ttl_ms / 1000 + 0.1)  # the replica stalled
        await world.shards[0].check_leases()
        assert not world.shards[0].is_online(a)
        await replica._renew()  # the next renewal finds the lease lapsed
        assert replica.lease_lapses == 1
        await eventually(lambda: world.shards[0].is_online(a))
        assert ("sync", 0, [a], []) in shards.calls and ("sync", 1, [], []) in shards.calls
    finally:
        await replica.stop()


async def test_after_the_store_lost_everything_the_next_renewal_repairs_it(world: World) -> None:
    shards = InProcessShards(world.shards)
    replica = ReplicaPresence(world.store.client(), shards, TIMING, "gw1")
    await replica.start()
    try:
        a, b = users_of(1, 2, 2)
        replica.opened(a)
        replica.opened(b)
        await eventually(lambda: world.shards[1].is_online(a) and world.shards[1].is_online(b))
        before = await world.store.read([a, b])
        world.store.wipe()  # Redis restarted empty
        assert await world.store.read([a]) == {a: NEVER_SEEN}
        await replica._renew()  # renewed before any shard noticed: the lease "lapsed"
        await eventually(lambda: world.store._server.users.get(b) is not None)
        assert await world.store.read([a, b]) == before
        assert await world.store.held(world.shards[1].name) == {replica.replica: {a, b}}
    finally:
        await replica.stop()


async def test_a_stopped_replica_releases_its_lease(world: World) -> None:
    shards = InProcessShards(world.shards)
    replica = ReplicaPresence(world.store.client(), shards, TIMING, "gw1")
    await replica.start()
    (a,) = users_of(0, 2, 1)
    replica.opened(a)
    await eventually(lambda: world.shards[0].is_online(a))
    await replica.stop()
    await world.shards[0].check_leases()
    assert not world.shards[0].is_online(a)


async def test_watchers_get_the_state_then_every_change(world: World) -> None:
    ps = world.pubsub.client()
    await ps.start()
    watchers = Watchers(ps, world.store.client(), max_watch=3)
    a, b = users_of(0, 2, 2)
    shard = world.shards[0]
    await shard.update("r1", 1, [a], [])
    conn, other = FakeConn("w1"), FakeConn("w2")
    states = await watchers.watch(conn, [a, b])
    assert states[a].status == ONLINE and states[b] == NEVER_SEEN
    await watchers.watch(other, [a])
    assert ps.channels() == sorted([presence_channel(a), presence_channel(b)])  # one each

    await shard.update("r1", 2, [b], [a])
    await eventually(lambda: len(conn.frames) == 2 and len(other.frames) == 1)
    assert {(f["user"], f["status"]) for f in conn.frames} == {(a, OFFLINE), (b, ONLINE)}

    with pytest.raises(PeerNetError) as err:
        await watchers.watch(conn, ["c1", "c2"])  # 2 + 2 > 3
    assert err.value.code is ErrorCode.BAD_REQUEST
    assert conn.watching == {a, b}

    watchers.unwatch(conn, [b])
    watchers.forget(other)
    await eventually(lambda: ps.channels() == [presence_channel(a)])
    await shard.update("r1", 3, [], [b])
    await settled(ps, world.pubsub)
    assert len(conn.frames) == 2


async def test_a_change_during_a_watch_is_folded_into_the_reply(world: World) -> None:
    ps = world.pubsub.client()
    await ps.start()
    store = world.store.client()
    watchers = Watchers(ps, store, max_watch=10)
    (a,) = users_of(0, 2, 1)
    shard = world.shards[0]
    conn = FakeConn("w1")
    real_read = store.read
    pushed = asyncio.Event()

    async def slow_read(users: Any) -> dict[str, PresenceState]:
        states = await real_read(users)  # read before the change...
        world.clock.advance(0.01)
        await shard.update("r1", 1, [a], [])  # ...which is pushed before the reply goes out
        await eventually(lambda: watchers._held[conn])  # type: ignore[arg-type]
        pushed.set()
        return states

    store.read = slow_read  # type: ignore[method-assign]
    states = await watchers.watch(conn, [a])
    assert pushed.is_set()
    assert states[a].status == ONLINE  # not the stale "never seen"
    assert conn.frames == []  # folded into the reply, not sent before it


async def test_watchers_catch_up_after_a_pubsub_reconnect(world: World) -> None:
    ps = world.pubsub.client()
    await ps.start()
    watchers = Watchers(ps, world.store.client(), max_watch=10)
    (a,) = users_of(1, 2, 1)
    conn = FakeConn("w1")
    await watchers.watch(conn, [a])
    world.pubsub.set_down(True)  # the change is published while pub/sub is down: lost
    world.clock.advance(0.01)
    await world.shards[1].update("r1", 1, [a], [])
    assert conn.frames == []
    world.pubsub.set_down(False)  # reconnect: watched users are read again
    await eventually(lambda: conn.frames)
    assert conn.frames == [{"t": "presence", "user": a, "status": ONLINE,
                            "ts": (await world.store.read([a]))[a].since}]


async def test_a_change_published_before_the_watch_and_recorded_after_its_read_is_pushed(
        world: World) -> None:
    """The shard publishes, then records. A watch that subscribes between the two and reads
    the store before the record has the old state and missed the push: its recheck, a moment
    later, reads the recorded change and pushes it."""
    ps = world.pubsub.client()
    await ps.start()
    store = world.store.client()
    watchers = Watchers(ps, store, max_watch=10, recheck_s=0.2)
    (a,) = users_of(0, 2, 1)
    conn = FakeConn("w1")
    real_read = store.read
    reads = 0

    async def read_before_the_record(users: Any) -> dict[str, PresenceState]:
        nonlocal reads
        reads += 1
        states = await real_read(users)
        if reads == 1:  # the watch's own read: then the change lands in the store, unpublished
            world.clock.advance(0.01)
            await world.store.client().record("0of2", "r1", add=[a],
                                              changes=[Change(a, ONLINE, world.clock.ms())])
        return states

    store.read = read_before_the_record  # type: ignore[method-assign]
    states = await watchers.watch(conn, [a])
    assert states[a] == NEVER_SEEN and conn.frames == []
    await eventually(lambda: conn.frames)
    assert conn.frames == [{"t": "presence", "user": a, "status": ONLINE,
                            "ts": (await real_read([a]))[a].since}]
    await asyncio.sleep(0.3)
    assert len(conn.frames) == 1  # once


class GatedStore:
    """A store client whose `record` waits until `gate` is set (a slow Redis)."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.gate = asyncio.Event()
        self.waiting = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def record(self, *args: Any, **kwargs: Any) -> None:
        self.waiting += 1
        await self.gate.wait()
        await self._store.record(*args, **kwargs)


async def test_the_queue_depth_counts_the_reports_received_and_not_finished(world: World) -> None:
    a, b = users_of(0, 2, 2)
    ps = world.pubsub.client()
    await ps.start()
    store = GatedStore(world.store.client())
    shard = PresenceShard(0, 2, store, ps, TIMING, clock=world.clock.ms)
    await shard.start()
    try:
        assert shard.queue_depth() == 0
        first = asyncio.create_task(shard.update("r1", 1, [a], []))
        await eventually(lambda: store.waiting)
        # The second waits for the shard's lock while the first is being recorded.
        second = asyncio.create_task(shard.sync("r2", 1, [b]))
        await eventually(lambda: shard.queue_depth() == 2)
        store.gate.set()
        await asyncio.gather(first, second)
        assert shard.queue_depth() == 0
        assert shard.is_online(a) and shard.is_online(b)
        # A report that fails is finished too.
        world.store.set_down(True)
        with pytest.raises(PeerNetError):
            await shard.update("r1", 2, [], [a])
        assert shard.queue_depth() == 0
    finally:
        world.store.set_down(False)
        await shard.stop()


async def test_a_burst_of_opens_rides_one_report_per_gap_and_a_quiet_change_goes_at_once(
        world: World) -> None:
    shards = InProcessShards(world.shards)
    replica = ReplicaPresence(world.store.client(), shards, TIMING, "gw1", report_gap_s=0.3)
    await replica.start()
    loop = asyncio.get_running_loop()
    try:
        first, *burst = users_of(0, 2, 21)
        replica.opened(first)  # nothing reported before: goes at once
        await eventually(lambda: world.shards[0].is_online(first), within_s=0.2)
        for user in burst:  # within the gap: gathered into the next report
            replica.opened(user)
            await asyncio.sleep(0.005)
        await eventually(lambda: all(world.shards[0].is_online(u) for u in burst))
        assert shards.calls == [("update", 0, [first], []), ("update", 0, sorted(burst), [])]
        await asyncio.sleep(0.35)  # a quiet spell longer than the gap
        started = loop.time()
        replica.closed(first)
        await eventually(lambda: not world.shards[0].is_online(first))
        assert loop.time() - started < 0.2
        assert shards.calls[-1] == ("update", 0, [], [first])
    finally:
        await replica.stop()
