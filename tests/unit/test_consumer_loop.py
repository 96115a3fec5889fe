"""ConsumerLoop: the one fetch-handle-commit loop of every log consumer."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from unit_helpers import eventually

from actors.consuming import ConsumerLoop
from bus.eventlog import Record, TopicSpec
from bus.eventlog_memory import MemoryEventLog


async def _log(*topics: str) -> MemoryEventLog:
    log = MemoryEventLog()
    await log.start()
    await log.ensure_topics([TopicSpec(t, 2, 1) for t in topics])
    return log


class Owner:
    def __init__(self, fail_first: int = 0) -> None:
        self.batches: list[list[tuple[str, bytes]]] = []
        self.errors: list[str] = []
        self.stopped: list[BaseException] = []
        self.inside = 0
        self.overlapped = False
        self.fail_first = fail_first

    async def handle(self, records: Sequence[Record]) -> None:
        self.inside += 1
        self.overlapped |= self.inside > 1
        try:
            await asyncio.sleep(0.01)
            if self.fail_first:
                self.fail_first -= 1
                raise RuntimeError("store away")
            self.batches.append([(r.topic, r.value) for r in records])
        finally:
            self.inside -= 1

    def on_error(self, what: str, exc: BaseException, trace: bool) -> None:
        self.errors.append(f"{what}: {exc}")

    def seen(self) -> list[tuple[str, bytes]]:
        return sorted(x for b in self.batches for x in b)


async def test_every_topic_is_read_and_handler_calls_never_overlap() -> None:
    log = await _log("a", "b")
    owner = Owner()
    loop = ConsumerLoop(log, ["a", "b"], "g", owner.handle, name="t", on_error=owner.on_error)
    await loop.start()
    try:
        assert loop.groups() == ["g@a", "g@b"]
        for i in range(20):
            await log.append("a" if i % 2 else "b", str(i).encode(), key=str(i).encode())
        await eventually(lambda: len(owner.seen()) == 20)
        assert not owner.overlapped
        assert {t for t, _ in owner.seen()} == {"a", "b"}
        lags = await loop.lag()
        assert [(lag.group, lag.topic) for lag in lags] == [("g@a", "a"), ("g@b", "b")]
    finally:
        await loop.stop()


async def test_a_failed_batch_is_handed_again_never_skipped_and_each_failure_counted() -> None:
    log = await _log("a")
    owner = Owner(fail_first=2)
    loop = ConsumerLoop(log, ["a"], "g", owner.handle, name="t", on_error=owner.on_error,
                        step="write")
    await log.append("a", b"x", key=b"k")
    await loop.start()
    try:
        await eventually(lambda: owner.seen() == [("a", b"x")])
        assert owner.errors == ["write: store away", "write: store away"]
        assert loop.queue_depth() == 0
    finally:
        await loop.stop()
    # Committed after the handler returned: a new member of the group starts past it.
    again = Owner()
    second = ConsumerLoop(log, ["a"], "g", again.handle, name="t", on_error=again.on_error)
    await log.append("a", b"y", key=b"k")
    await second.start()
    try:
        await eventually(lambda: again.seen() == [("a", b"y")])
    finally:
        await second.stop()


async def test_without_handler_retries_a_failure_stops_the_loop_and_is_reported() -> None:
    log = await _log("a")
    owner = Owner(fail_first=1)
    loop = ConsumerLoop(log, ["a"], "g", owner.handle, name="t", on_error=owner.on_error,
                        retry_handler=False, on_stopped=owner.stopped.append)
    await log.append("a", b"x", key=b"k")
    await loop.start()
    await eventually(lambda: len(owner.stopped) == 1)
    assert isinstance(owner.stopped[0], RuntimeError) and owner.batches == []
    with pytest.raises(RuntimeError, match="store away"):
        await loop.stop()


async def test_gathering_makes_one_batch_of_records_that_arrive_within_the_window() -> None:
    log = await _log("a")
    owner = Owner()
    loop = ConsumerLoop(log, ["a"], "g", owner.handle, name="t", on_error=owner.on_error,
                        gather_ms=300)
    await loop.start()
    try:
        for i in range(5):
            await log.append("a", str(i).encode(), key=b"k")
            await asyncio.sleep(0.02)
        await eventually(lambda: len(owner.seen()) == 5)
        assert len(owner.batches) == 1
    finally:
        await loop.stop()
