"""Commits held back by `commit_interval_ms` on the real Kafka: at most one commit per interval,
and what was held back is committed on `stop` and when the group takes a partition away, so
only a crash redelivers (which every PeerNet consumer absorbs)."""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaConsumer, TopicPartition
from bus_helpers import Services, unique

from bus.eventlog import LogConsumer, Record, TopicSpec
from bus.kafka import KafkaEventLog


async def _poll(consumer: LogConsumer, count: int, within_s: float = 20) -> list[Record]:
    got: list[Record] = []
    deadline = time.monotonic() + within_s
    while len(got) < count and time.monotonic() < deadline:
        got += await consumer.poll(timeout_ms=300)
    assert len(got) == count, got
    return got


async def _committed(bootstrap: str, topic: str, group: str) -> int | None:
    probe = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await probe.start()
    try:
        offset: int | None = await probe.committed(TopicPartition(topic, 0))
        return offset
    finally:
        await probe.stop()


async def test_held_back_commits_go_on_the_next_commit_after_the_interval_and_on_stop(
        services: Services) -> None:
    log = KafkaEventLog(services.kafka_bootstrap, commit_interval_ms=1500)
    await log.start()
    topic, group = unique("test.bus.interval"), unique("g")
    try:
        await log.ensure_topics([TopicSpec(topic, 1)])
        consumer = log.consumer(topic, group=group)
        await consumer.start()
        await log.append(topic, b"a", key=b"k")
        await _poll(consumer, 1)
        await consumer.commit()  # the first commit goes at once
        assert await _committed(services.kafka_bootstrap, topic, group) == 1

        await log.append(topic, b"b", key=b"k")
        await _poll(consumer, 1)
        await consumer.commit()  # inside the interval: held back
        assert await _committed(services.kafka_bootstrap, topic, group) == 1

        await asyncio.sleep(1.6)
        await consumer.commit()  # the interval has passed: what was held back goes
        assert await _committed(services.kafka_bootstrap, topic, group) == 2

        await log.append(topic, b"c", key=b"k")
        await _poll(consumer, 1)
        await consumer.commit()  # held back again ...
        await consumer.stop()    # ... and committed on the way out
        assert await _committed(services.kafka_bootstrap, topic, group) == 3

        # A restarted member resumes after everything it had processed: nothing redelivered.
        again = log.consumer(topic, group=group)
        await again.start()
        try:
            assert await again.poll(timeout_ms=1000) == []
        finally:
            await again.stop()
    finally:
        await log.stop()
