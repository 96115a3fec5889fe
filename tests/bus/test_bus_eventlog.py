"""The EventLog contract, run against Kafka and the in-memory log."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import pytest
from bus_helpers import LogKit, unique

from bus.eventlog import EventLog, Headers, LogConsumer, Record, TopicSpec
from peernet.errors import ErrorCode, PeerNetError


async def new_topic(log: EventLog, partitions: int = 3) -> str:
    topic = unique("test.bus")
    await log.ensure_topics([TopicSpec(topic, partitions)])
    return topic


async def read(consumer: LogConsumer, count: int, within_s: float = 10.0) -> list[Record]:
    """Poll until `count` records arrived (fails on more, or on fewer after `within_s`)."""
    got: list[Record] = []
    deadline = time.monotonic() + within_s
    while len(got) < count and time.monotonic() < deadline:
        got += await consumer.poll(timeout_ms=200)
    assert len(got) == count, f"expected {count} records, got {len(got)}: {got}"
    # and nothing more is waiting
    assert await consumer.poll(timeout_ms=100) == []
    return got


async def test_append_is_read_back_with_key_value_headers(log_kit: LogKit) -> None:
    log = await log_kit.make()
    topic = await new_topic(log)
    before_ms = int(time.time() * 1000)
    appended = await log.append(topic, b"value-1", key=b"user-1", headers=(("kind", b"msg"),))
    assert appended.topic == topic
    assert appended.offset >= 0

    consumer = log.consumer(topic, partitions=[appended.partition])
    await consumer.start()
    try:
        (record,) = await read(consumer, 1)
    finally:
        await consumer.stop()
    assert (record.topic, record.partition, record.offset) == (
        appended.topic, appended.partition, appended.offset)
    assert record.key == b"user-1"
    assert record.value == b"value-1"
    assert record.headers == (("kind", b"msg"),)
    assert before_ms - 5_000 <= record.timestamp <= int(time.time() * 1000) + 5_000


async def test_same_key_same_partition_in_append_order(log_kit: LogKit) -> None:
    log = await log_kit.make()
    topic = await new_topic(log, partitions=4)
    keys = [f"user-{i}".encode() for i in range(4)]
    sent: dict[bytes, list[bytes]] = defaultdict(list)
    partition_of: dict[bytes, set[int]] = defaultdict(set)
    for n in range(12):
        key = keys[n % len(keys)]
        value = f"{key.decode()}#{n}".encode()
        appended = await log.append(topic, value, key=key)
        sent[key].append(value)
        partition_of[key].add(appended.partition)
    assert all(len(ps) == 1 for ps in partition_of.values()), partition_of

    # Another client (another process) puts the same key on the same partition.
    other = await log_kit.make()
    for key in keys:
        again = await other.append(topic, b"again", key=key)
        assert {again.partition} == partition_of[key]
        sent[key].append(b"again")

    consumer = log.consumer(topic, group=unique("g"))
    await consumer.start()
    try:
        records = await read(consumer, 16)
    finally:
        await consumer.stop()
    # poll orders by partition, then offset
    assert [(r.partition, r.offset) for r in records] == sorted(
        (r.partition, r.offset) for r in records)
    got: dict[bytes, list[bytes]] = defaultdict(list)
    for r in records:
        assert r.key is not None
        got[r.key].append(r.value)
    assert got == sent


async def test_append_many_keeps_item_order(log_kit: LogKit) -> None:
    log = await log_kit.make()
    topic = await new_topic(log, partitions=2)
    items: list[tuple[bytes | None, bytes, Headers]] = [
        (b"k", f"v{i}".encode(), (("i", str(i).encode()),)) for i in range(20)]
    items += [(None, b"unkeyed", ())]
    appended = await log.append_many(topic, items)
    assert len(appended) == len(items)
    keyed = appended[:20]
    assert len({a.partition for a in keyed}) == 1
    assert [a.offset for a in keyed] == list(range(keyed[0].offset, keyed[0].offset + 20))
    assert await log.append_many(topic, []) == []

    consumer = log.consumer(topic, partitions=[keyed[0].partition])
    await consumer.start()
    try:
        records = await read(consumer, 20 + (appended[20].partition == keyed[0].partition))
    finally:
        await consumer.stop()
    assert [r.value for r in records if r.key == b"k"] == [v for _, v, _ in items[:20]]
    assert [r.headers for r in records if r.key == b"k"] == [h for _, _, h in items[:20]]


async def test_ensure_topics_is_idempotent(log_kit: LogKit) -> None:
    log = await log_kit.make()
    topic = unique("test.bus")
    await log.ensure_topics([TopicSpec(topic, 2, 1, (("retention.ms", "-1"),))])
    a = await log.append(topic, b"x", key=b"k")
    # Again, and with other settings: the existing topic is left as it is.
    await log.ensure_topics([TopicSpec(topic, 2), TopicSpec(topic, 5)])
    await log.ensure_topics([])
    consumer = log.consumer(topic, partitions=[0, 1])
    await consumer.start()
    try:
        assert set(await consumer.end_offsets()) == {0, 1}
        (record,) = await read(consumer, 1)
    finally:
        await consumer.stop()
    assert (record.partition, record.offset, record.value) == (a.partition, a.offset, b"x")


async def test_group_resumes_from_committed_offsets(log_kit: LogKit) -> None:
    """(done when) a consumer group restarted gets exactly the records it had not committed."""
    log = await log_kit.make()
    topic = await new_topic(log, partitions=2)
    group = unique("g")
    first = [f"a{i}".encode() for i in range(4)]
    await log.append_many(topic, [(f"k{i}".encode(), v, ()) for i, v in enumerate(first)])

    consumer = log.consumer(topic, group=group)
    await consumer.start()
    got = await read(consumer, 4)
    assert sorted(r.value for r in got) == sorted(first)
    await consumer.commit()
    await consumer.commit()  # nothing new: harmless

    second = [f"b{i}".encode() for i in range(3)]
    await log.append_many(topic, [(f"k{i}".encode(), v, ()) for i, v in enumerate(second)])
    got = await read(consumer, 3)
    assert sorted(r.value for r in got) == sorted(second)
    await consumer.stop()  # stopped without committing the second batch

    restarted = log.consumer(topic, group=group)
    await restarted.start()
    try:
        again = await read(restarted, 3)
        assert sorted(r.value for r in again) == sorted(second)
        await restarted.commit()
    finally:
        await restarted.stop()

    # Everything is committed now; a third member of the group has nothing to read.
    third = (await log_kit.make()).consumer(topic, group=group)
    await third.start()
    try:
        assert await third.poll(timeout_ms=300) == []
        assert await third.positions() == await third.end_offsets()
    finally:
        await third.stop()


async def test_a_lingering_consumer_gets_every_record_in_order_in_fewer_fetches(
        log_kit: LogKit) -> None:
    """`linger_ms` changes when records arrive, never which or in what order; on Kafka the
    records appended within one linger come in one or two fetches, not one each."""
    log = await log_kit.make()
    topic = await new_topic(log, partitions=1)
    consumer = log.consumer(topic, group=unique("g"), linger_ms=1000)
    await consumer.start()
    try:
        values = [f"v{i}".encode() for i in range(5)]
        got: list[Record] = []
        polls_with_records = 0

        async def reader() -> None:  # polls all along, as a shard's loop does
            nonlocal polls_with_records
            deadline = time.monotonic() + 10
            while len(got) < len(values) and time.monotonic() < deadline:
                batch = await consumer.poll(timeout_ms=200)
                polls_with_records += bool(batch)
                got.extend(batch)

        reading = asyncio.create_task(reader())
        for v in values:
            await log.append(topic, v, key=b"k")
            await asyncio.sleep(0.02)
        await reading
        assert [r.value for r in got] == values
        assert [r.offset for r in got] == list(range(5))
        if log_kit.kind == "real":
            # Appended over about 100 ms, inside one 1 s linger (two if a fetch's deadline
            # fell among them); without a linger each append ends a fetch of its own.
            assert polls_with_records <= 2
    finally:
        await consumer.stop()


async def test_new_group_from_latest_skips_the_past(log_kit: LogKit) -> None:
    log = await log_kit.make()
    topic = await new_topic(log, partitions=2)
    await log.append(topic, b"old", key=b"k")
    consumer = log.consumer(topic, group=unique("g"), from_beginning=False)
    await consumer.start()
    try:
        assert await consumer.poll(timeout_ms=200) == []
        await log.append(topic, b"new", key=b"k")
        (record,) = await read(consumer, 1)
        assert record.value == b"new"
    finally:
        await consumer.stop()


async def test_assigned_partitions_seek_positions_end_offsets(log_kit: LogKit) -> None:
    log = await log_kit.make()
    topic = await new_topic(log, partitions=2)
    appended = await log.append_many(topic, [(b"same-key", f"v{i}".encode(), ()) for i in range(5)])
    p = appended[0].partition
    consumer = log.consumer(topic, partitions=[p])
    await consumer.start()
    try:
        assert await consumer.positions() == {p: 0}
        assert await consumer.end_offsets() == {p: 5}
        assert [r.value for r in await read(consumer, 5)] == [f"v{i}".encode() for i in range(5)]
        assert await consumer.positions() == {p: 5}
        await consumer.seek(p, 3)
        assert [r.offset for r in await read(consumer, 2)] == [3, 4]
        # only the assigned partition is read
        extra = await log.append_many(topic, [(f"x{i}".encode(), b"extra", ()) for i in range(6)])
        mine = [a for a in extra if a.partition == p]
        assert {r.partition for r in await read(consumer, len(mine))} <= {p}
    finally:
        await consumer.stop()

    tail = log.consumer(topic, partitions=[p], from_beginning=False)
    await tail.start()
    try:
        assert await tail.positions() == {p: 5 + len(mine)}
        assert await tail.poll(timeout_ms=100) == []
    finally:
        await tail.stop()


async def test_poll_honours_max_records_and_timeout(log_kit: LogKit) -> None:
    log = await log_kit.make()
    topic = await new_topic(log, partitions=1)
    consumer = log.consumer(topic, partitions=[0])
    await consumer.start()
    try:
        t0 = time.monotonic()
        assert await consumer.poll(timeout_ms=300) == []
        assert 0.2 <= time.monotonic() - t0 < 3.0
        await log.append_many(topic, [(None, f"v{i}".encode(), ()) for i in range(6)])
        got: list[Record] = []
        while len(got) < 6:
            batch = await consumer.poll(max_records=4, timeout_ms=500)
            assert len(batch) <= 4
            got += batch
        assert [r.offset for r in got] == list(range(6))
    finally:
        await consumer.stop()


async def test_oversized_record_is_a_bad_request(log_kit: LogKit) -> None:
    log = await log_kit.make()
    topic = await new_topic(log, partitions=1)
    with pytest.raises(PeerNetError) as caught:
        await log.append(topic, b"x" * (1024 * 1024 + 1))
    assert caught.value.code is ErrorCode.BAD_REQUEST
    assert not caught.value.retriable


async def test_ping(log_kit: LogKit) -> None:
    log = await log_kit.make()
    await log.ping()


async def test_unreachable_log_is_unavailable_fast(log_kit: LogKit) -> None:
    log = log_kit.unreachable()
    t0 = time.monotonic()
    with pytest.raises(PeerNetError) as caught:
        await log.start()
        await log.append(unique("t"), b"x")
    assert caught.value.code is ErrorCode.UNAVAILABLE and caught.value.retriable
    with pytest.raises(PeerNetError) as pinged:
        await log.ping()
    assert pinged.value.code is ErrorCode.UNAVAILABLE
    assert time.monotonic() - t0 < 8.0
    await log.stop()
