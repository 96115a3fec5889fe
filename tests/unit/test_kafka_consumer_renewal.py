"""KafkaLogConsumer's renewal (bus/kafka_consumer.py): a group consumer whose commits keep failing is
replaced by a new one that reads again from the committed offsets. aiokafka's consumer is
replaced by a small stand-in here (logic only); the real broker restart that needed this is the
`kafka` fault of tests/bench/test_chaos.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.structs import TopicPartition

from bus import kafka_consumer
from bus.kafka_consumer import RENEW_AFTER_COMMIT_FAILURES, KafkaLogConsumer
from peernet.errors import ErrorCode, PeerNetError

TOPIC = "events"
LOG = [(0, b"a"), (1, b"b"), (2, b"c")]  # (offset, value) of partition 0
COMMITTED: dict[int, int] = {}  # the group's committed offsets, per partition


class StandIn:
    """Enough of AIOKafkaConsumer: one partition, records from the committed offset on. The
    first instance's commits never answer (a coordinator stuck after a broker restart)."""

    made: list[StandIn] = []

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.stuck = not StandIn.made
        self.started = self.stopped = False
        self.position_ = 0
        StandIn.made.append(self)

    def subscribe(self, topics: list[str], listener: Any) -> None:
        self.listener = listener

    async def start(self) -> None:
        self.started = True
        self.position_ = COMMITTED.get(0, 0)

    async def stop(self) -> None:
        self.stopped = True

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(TOPIC, 0)} if self.started and not self.stopped else set()

    async def position(self, tp: TopicPartition) -> int:
        return self.position_

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Any]]:
        batch = [SimpleNamespace(topic=TOPIC, partition=0, offset=o, key=None, value=v, headers=(),
                                 timestamp=0) for o, v in LOG if o >= self.position_][:max_records]
        if batch:
            self.position_ = batch[-1].offset + 1
        return {TopicPartition(TOPIC, 0): batch}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if self.stuck:
            await asyncio.sleep(3600)
        for tp, o in offsets.items():
            COMMITTED[tp.partition] = o


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    StandIn.made.clear()
    COMMITTED.clear()
    monkeypatch.setattr(kafka_consumer, "AIOKafkaConsumer", StandIn)
    yield


def consumer() -> KafkaLogConsumer:
    return KafkaLogConsumer("127.0.0.1:1", TOPIC, group="g", partitions=None, from_beginning=True,
                            request_timeout_ms=1000, timeout_s=0.05, client_id="t")


async def test_a_consumer_whose_commits_keep_failing_is_replaced_and_reads_again(
        stand_in: None) -> None:
    c = consumer()
    await c.start()
    assert [r.value for r in await c.poll()] == [b"a", b"b", b"c"]
    for attempt in range(1, RENEW_AFTER_COMMIT_FAILURES + 1):
        with pytest.raises(PeerNetError) as failed:
            await c.commit()
        assert failed.value.code is ErrorCode.UNAVAILABLE
        assert c.renewals == (1 if attempt == RENEW_AFTER_COMMIT_FAILURES else 0)
    first, second = StandIn.made
    assert first.stopped and second.started and not second.stopped
    assert second.options == first.options
    await c.commit()  # nothing of the new consumer's own to commit yet
    # Nothing was committed, so everything comes again, from the new consumer.
    assert [r.value for r in await c.poll()] == [b"a", b"b", b"c"]
    await c.commit()
    assert COMMITTED == {0: 3}
    await c.stop()


async def test_commits_that_succeed_between_failures_reset_the_count(stand_in: None) -> None:
    c = consumer()
    await c.start()
    await c.poll()
    for _ in range(RENEW_AFTER_COMMIT_FAILURES - 1):
        with pytest.raises(PeerNetError):
            await c.commit()
    StandIn.made[0].stuck = False
    await c.commit()
    StandIn.made[0].stuck = True
    for _ in range(RENEW_AFTER_COMMIT_FAILURES - 1):
        c._uncommitted[0] = 3
        with pytest.raises(PeerNetError):
            await c.commit()
    assert c.renewals == 0 and len(StandIn.made) == 1
    await c.stop()


async def test_a_new_consumer_that_cannot_start_is_tried_again_by_poll(
        stand_in: None, monkeypatch: pytest.MonkeyPatch) -> None:
    c = consumer()
    await c.start()
    await c.poll()
    refuse = True
    real_start = StandIn.start

    async def start(self: StandIn) -> None:
        if refuse and self is not StandIn.made[0]:
            raise OSError("connection refused")
        await real_start(self)

    monkeypatch.setattr(StandIn, "start", start)
    for _ in range(RENEW_AFTER_COMMIT_FAILURES):
        with pytest.raises(PeerNetError):
            await c.commit()
    assert c.renewals == 1
    with pytest.raises(PeerNetError):
        await c.poll()  # the broker still refuses: unavailable, tried again next time
    refuse = False
    assert [r.value for r in await c.poll()] == [b"a", b"b", b"c"]
    await c.stop()
