"""The event log's fail-fast state (bus.kafka.FailFast), on a fake clock: after a failure, calls
are refused at once for the cool-down; then one trial call at a time goes through, and a success
closes it again."""

from __future__ import annotations

import pytest

from bus.kafka import FailFast
from peernet.errors import ErrorCode, PeerNetError


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def refused(ff: FailFast) -> bool:
    try:
        ff.admit()
    except PeerNetError as exc:
        assert exc.code is ErrorCode.UNAVAILABLE and exc.retriable
        return True
    return False


def test_closed_lets_every_call_through() -> None:
    ff = FailFast(1.0, Clock())
    assert [ff.admit() for _ in range(3)] == [False, False, False]
    ff.done(False, ok=True)
    assert not refused(ff)


def test_a_failure_refuses_calls_for_the_cooldown_then_admits_one_trial() -> None:
    clock = Clock()
    ff = FailFast(1.0, clock)
    ff.done(ff.admit(), ok=False)
    assert refused(ff) and refused(ff)
    assert ff.refused == 2
    clock.now += 1.0
    assert ff.admit() is True          # the trial
    assert refused(ff)                 # others while the trial is out
    ff.done(True, ok=True)
    assert ff.admit() is False and not refused(ff)


def test_a_failed_trial_opens_it_again() -> None:
    clock = Clock()
    ff = FailFast(1.0, clock)
    ff.done(ff.admit(), ok=False)
    clock.now += 1.5
    trial = ff.admit()
    clock.now += 10.0                  # the trial took a whole delivery timeout
    ff.done(trial, ok=False)
    assert refused(ff)
    clock.now += 1.0
    assert ff.admit() is True


def test_a_cancelled_trial_frees_the_slot_without_closing() -> None:
    clock = Clock()
    ff = FailFast(1.0, clock)
    ff.done(ff.admit(), ok=False)
    clock.now += 1.0
    trial = ff.admit()
    ff.done(trial, ok=None)
    assert ff.admit() is True          # still open, the next call is a new trial


def test_zero_cooldown_never_refuses() -> None:
    ff = FailFast(0.0, Clock())
    ff.done(ff.admit(), ok=False)
    assert not refused(ff)


@pytest.mark.parametrize("ok", [True, False])
def test_a_late_answer_of_a_call_from_before_the_failure_counts(ok: bool) -> None:
    clock = Clock()
    ff = FailFast(1.0, clock)
    early = ff.admit()
    ff.done(ff.admit(), ok=False)
    ff.done(early, ok=ok)              # a success closes it; a failure restarts the cool-down
    assert refused(ff) is (not ok)
