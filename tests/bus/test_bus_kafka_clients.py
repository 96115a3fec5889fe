"""The two Kafka backends (PEERNET_KAFKA_CLIENT) side by side on the real broker: a key lands on the
same partition whichever wrote it, so switching the client keeps each conversation's and inbox's
order; and members of both can share a consumer group, so replicas can switch one at a time."""

from __future__ import annotations

import asyncio
import time

import pytest
from bus_helpers import Services, unique

from bus.eventlog import LogConsumer, Record, TopicSpec
from bus.kafka import KafkaEventLog
from bus.librdkafka import RdKafkaEventLog

pytestmark = pytest.mark.stack


async def test_a_key_lands_on_the_same_partition_from_either_backend(services: Services) -> None:
    aio = KafkaEventLog(services.kafka_bootstrap, client_id=unique("test-aio"))
    rdk = RdKafkaEventLog(services.kafka_bootstrap, client_id=unique("test-rdk"))
    await aio.start()
    await rdk.start()
    try:
        for partitions in (7, 8):
            topic = unique("test.bus.keys")
            await aio.ensure_topics([TopicSpec(topic, partitions)])
            # PeerNet's keys (conversations, users), an empty one and arbitrary bytes.
            keys = [f"c:u{i}:u{i + 1}".encode() for i in range(150)] + [
                f"u:{i}".encode() for i in range(150)] + [b"", bytes(range(256))]
            items = [(k, b"x", ()) for k in keys]
            by_aio = await aio.append_many(topic, items)
            by_rdk = await rdk.append_many(topic, items)
            assert [a.partition for a in by_rdk] == [a.partition for a in by_aio]
            assert len({a.partition for a in by_aio}) == partitions
    finally:
        await rdk.stop()
        await aio.stop()


async def _poll_all(consumers: list[LogConsumer], count: int, within_s: float = 30) -> list[Record]:
    got: list[Record] = []
    deadline = time.monotonic() + within_s
    while len(got) < count and time.monotonic() < deadline:
        for batch in await asyncio.gather(*(c.poll(timeout_ms=300) for c in consumers)):
            got += batch
    return got


async def test_members_of_both_backends_share_a_group(services: Services) -> None:
    aio = KafkaEventLog(services.kafka_bootstrap, client_id=unique("test-aio"))
    rdk = RdKafkaEventLog(services.kafka_bootstrap, client_id=unique("test-rdk"))
    await aio.start()
    await rdk.start()
    topic, group = unique("test.bus.mixed"), unique("g")
    await aio.ensure_topics([TopicSpec(topic, 4)])
    first = aio.consumer(topic, group=group)
    second = rdk.consumer(topic, group=group)
    try:
        await first.start()
        # The second joins while the first polls (a librdkafka member rebalances as it polls).
        joining = asyncio.create_task(second.start())
        while not joining.done():
            await first.poll(timeout_ms=200)
        await joining
        mine: dict[str, set[int]] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            await asyncio.gather(first.poll(timeout_ms=200), second.poll(timeout_ms=200))
            mine = {"aio": set(await first.positions()), "rdk": set(await second.positions())}
            if mine["aio"] and mine["rdk"] and mine["aio"] | mine["rdk"] == {0, 1, 2, 3}:
                break
        assert mine["aio"] and mine["rdk"], mine
        assert not mine["aio"] & mine["rdk"] and mine["aio"] | mine["rdk"] == {0, 1, 2, 3}, mine

        values = [f"v{i}".encode() for i in range(40)]
        await rdk.append_many(topic, [(f"k{i}".encode(), v, ()) for i, v in enumerate(values)])
        got = await _poll_all([first, second], len(values))
        assert sorted(r.value for r in got) == sorted(values)
    finally:
        await asyncio.gather(first.stop(), second.stop())
        await rdk.stop()
        await aio.stop()
