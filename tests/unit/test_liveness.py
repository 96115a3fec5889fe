"""Connection deadlines (serve/liveness.py): the replica's one timing wheel on a fake clock."""

from __future__ import annotations

import asyncio

from serve.liveness import Liveness, tick_for

# -- the wheel, on a fake clock ----------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Conn:
    """A connection as the wheel sees it: silent for `idle` seconds after `heard_at` is dead."""

    def __init__(self, clock: Clock, idle: float = 10.0) -> None:
        self.liveness_tick: int | None = None
        self.heard_at = clock.t
        self.idle = idle
        self.expired = 0
        self.asked = 0
        self.gone = asyncio.Event()

    def deadline(self) -> float:
        self.asked += 1
        return self.heard_at + self.idle

    def expire(self) -> None:
        self.expired += 1
        self.gone.set()


def sweep_until(wheel: Liveness, clock: Clock, until: float, step: float = 0.25) -> None:
    while clock.t < until:
        clock.t = min(until, clock.t + step)
        wheel.sweep()


def test_a_silent_connection_expires_after_its_deadline_and_never_before() -> None:
    clock = Clock()
    wheel = Liveness(1.0, clock)
    conn = Conn(clock)
    wheel._file(conn, conn.deadline())  # watch() without the sweeping task
    sweep_until(wheel, clock, 1009.75)
    assert conn.expired == 0
    sweep_until(wheel, clock, 1011.0)  # due at 1010, swept within the tick after
    assert conn.expired == 1
    assert conn.liveness_tick is None and len(wheel) == 0
    sweep_until(wheel, clock, 1030.0)
    assert conn.expired == 1  # once


def test_being_heard_from_moves_the_deadline_without_touching_the_wheel() -> None:
    clock = Clock()
    wheel = Liveness(1.0, clock)
    conn = Conn(clock)
    wheel._file(conn, conn.deadline())
    for _ in range(50):  # a frame every second for 50 s: an attribute write each time
        sweep_until(wheel, clock, clock.t + 1)
        conn.heard_at = clock.t
    assert conn.expired == 0
    # Asked about once per idle period (when its old deadline came round), not per frame.
    assert conn.asked <= 50 / 9 + 1
    sweep_until(wheel, clock, clock.t + 11)
    assert conn.expired == 1


def test_a_forgotten_connection_is_never_expired() -> None:
    clock = Clock()
    wheel = Liveness(1.0, clock)
    conns = [Conn(clock) for _ in range(3)]
    for conn in conns:
        wheel._file(conn, conn.deadline())
    wheel.forget(conns[1])
    wheel.forget(conns[1])  # twice is harmless
    sweep_until(wheel, clock, clock.t + 12)
    assert [c.expired for c in conns] == [1, 0, 1]


def test_a_deadline_already_past_is_expired_at_the_next_tick() -> None:
    clock = Clock()
    wheel = Liveness(1.0, clock)
    conn = Conn(clock, idle=-5)
    wheel._file(conn, conn.deadline())
    clock.t += 1.0
    assert wheel.sweep() == 1


def test_a_connection_that_fails_is_counted_and_the_others_of_its_tick_still_expire() -> None:
    clock = Clock()
    wheel = Liveness(1.0, clock)

    class Broken(Conn):
        def expire(self) -> None:
            raise RuntimeError("bug")

    conns = [Conn(clock), Broken(clock), Conn(clock)]
    for conn in conns:
        wheel._file(conn, conn.deadline())
    sweep_until(wheel, clock, clock.t + 11)
    assert conns[0].expired == 1 and conns[2].expired == 1


def test_a_long_stall_expires_everything_due_in_one_sweep() -> None:
    clock = Clock()
    wheel = Liveness(0.05, clock)
    conns = [Conn(clock, idle=i) for i in range(1, 6)]
    for conn in conns:
        wheel._file(conn, conn.deadline())
    clock.t += 3600  # many more ticks than buckets
    assert wheel.sweep() == 5


def test_the_tick_is_a_tenth_of_the_shortest_deadline_within_bounds() -> None:
    assert tick_for(10, 50) == 1.0
    assert tick_for(0.5, 0.6) == 0.05
    assert tick_for(0.001) == 0.02


async def test_the_sweeping_task_expires_connections_on_the_real_clock() -> None:
    wheel = Liveness(0.02)
    clock = Clock()
    conn = Conn(clock, idle=0.1)
    conn.heard_at = wheel.now()
    wheel.watch(conn)  # starts the task
    try:
        await asyncio.wait_for(conn.gone.wait(), 5)
        assert wheel.now() >= conn.heard_at + 0.1
    finally:
        await wheel.stop()
