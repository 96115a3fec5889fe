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

# The commit interval of the first test: long enough for a poll between two commits on a loaded
# machine (at 1.5 s, the probe consumer's group join once read between them could use it up).
INTERVAL_S = 3


async def _poll(consumer: LogConsumer, count: int, within_s: float = 20,
                max_records: int = 500) -> list[Record]:
    got: list[Record] = []
    deadline = time.monotonic() + within_s
    while len(got) < count and time.monotonic() < deadline:
        got += await consumer.poll(timeout_ms=300, max_records=max_records - len(got))
    assert len(got) == count, got
    return got


async def _committed(bootstrap: str, topic: str, group: str) -> int | None:
    return await _committed_at(bootstrap, topic, group, 0)


async def test_held_back_commits_go_on_the_next_commit_after_the_interval_and_on_stop(
        services: Services) -> None:
    log = KafkaEventLog(services.kafka_bootstrap, commit_interval_ms=INTERVAL_S * 1000)
    await log.start()
    topic, group = unique("test.bus.interval"), unique("g")
    try:
        await log.ensure_topics([TopicSpec(topic, 1)])
        consumer = log.consumer(topic, group=group)
        await consumer.start()
        await log.append(topic, b"a", key=b"k")
        await log.append(topic, b"b", key=b"k")
        await _poll(consumer, 1, max_records=1)
        await consumer.commit()  # the first commit goes at once
        first_done = time.monotonic()
        await _poll(consumer, 1, max_records=1)
        # The held-back case needs this commit inside the interval: a machine too slow for that
        # fails here, rather than the test checking a commit that was due anyway.
        assert time.monotonic() - first_done < INTERVAL_S, "too slow to commit inside the interval"
        await consumer.commit()  # inside the interval: held back
        # Read after both commits (a probe's group join takes a while): the first went, the
        # second did not.
        assert await _committed(services.kafka_bootstrap, topic, group) == 1

        # The interval passes (measured from the end of the first commit, as the log does).
        await asyncio.sleep(max(0.0, first_done + INTERVAL_S - time.monotonic()))
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


async def test_held_back_commits_go_when_the_group_takes_the_partitions_away(
        services: Services) -> None:
    """A second member joins: the first's partitions are revoked in the rebalance, and what
    its last `commit` asked for is committed then, so the new owner does not read it again."""
    log = KafkaEventLog(services.kafka_bootstrap, commit_interval_ms=60_000)
    await log.start()
    topic, group = unique("test.bus.interval"), unique("g")
    first = log.consumer(topic, group=group)
    second = log.consumer(topic, group=group)
    try:
        await log.ensure_topics([TopicSpec(topic, 2)])
        await first.start()
        await log.append_many(topic, [(f"k{i}".encode(), b"a", ()) for i in range(4)])
        await _poll(first, 4)
        await first.commit()  # at once
        await log.append_many(topic, [(f"k{i}".encode(), b"b", ()) for i in range(4)])
        await _poll(first, 4)
        await first.commit()  # held back for a minute
        ends = {p: o for p, o in (await first.end_offsets()).items()}

        await second.start()  # the rebalance: the first member's partitions are revoked
        deadline = time.monotonic() + 30
        committed: dict[int, int | None] = {}
        while time.monotonic() < deadline:
            await first.poll(timeout_ms=300)  # a member takes part in the rebalance by polling
            committed = {p: await _committed_at(services.kafka_bootstrap, topic, group, p)
                         for p in ends}
            if committed == ends:
                break
        assert committed == ends, f"committed {committed}, wanted {ends}"
        # Nothing the first member processed comes to either member again.
        assert await second.poll(timeout_ms=500) == [] and await first.poll(timeout_ms=300) == []
    finally:
        await second.stop()
        await first.stop()
        await log.stop()


async def _committed_at(bootstrap: str, topic: str, group: str, partition: int) -> int | None:
    probe = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await probe.start()
    try:
        offset: int | None = await probe.committed(TopicPartition(topic, partition))
        return offset
    finally:
        await probe.stop()
