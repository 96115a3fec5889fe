"""Kafka consumer lag: its computation (bus/eventlog.py) on the in-memory event log, the shards'
reports, and the `peernet_kafka_consumer_lag` series of /metrics (serve/metrics.py, serve/app.py)."""

from __future__ import annotations

import asyncio
import re

import pytest
from gateway_harness import gateway
from unit_helpers import eventually

from actors.feed import FeedShard, feeds_group
from bench.probe import parse_lag
from bus.eventlog import ConsumerLag, TopicSpec, consumer_lag
from bus.eventlog_memory import MemoryEventLog, _partition_for_key
from bus.feeds_memory import MemoryFeedStore
from bus.topics import peernet_topics
from peernet.config import load_config
from serve import app as app_module
from serve import metrics

TOPIC = "lag.events"


def _key_for(partition: int, partitions: int) -> bytes:
    """A key the in-memory log places in `partition` (it partitions by key, as Kafka does)."""
    return next(k for k in (b"k%d" % i for i in range(1000))
                if _partition_for_key(k, partitions) == partition)


async def _log_with(counts: list[int]) -> MemoryEventLog:
    """A log whose topic holds counts[p] records in partition p."""
    log = MemoryEventLog()
    await log.start()
    await log.ensure_topics([TopicSpec(TOPIC, len(counts))])
    for p, n in enumerate(counts):
        for i in range(n):
            await log.append(TOPIC, b"v%d" % i, key=_key_for(p, len(counts)))
    return log


def _series(text: str, group: str) -> dict[str, float]:
    """partition -> value of the lag series of `group` in a /metrics body."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("peernet_kafka_consumer_lag{") and f'group="{group}"' in line:
            partition = re.search(r'partition="(\d+)"', line)
            assert partition
            out[partition.group(1)] = float(line.rsplit(" ", 1)[1])
    return out


async def test_lag_is_the_end_offset_minus_the_position_per_partition() -> None:
    log = await _log_with([5, 3])
    consumer = log.consumer(TOPIC, group="g")
    await consumer.start()
    assert await consumer_lag(consumer, group="g", topic=TOPIC) == ConsumerLag("g", TOPIC, {0: 5, 1: 3})
    got = await consumer.poll(max_records=4, timeout_ms=0)
    # Four records read, so the lag must fall by four: a lag that ignored the position (the end
    # offset, or end minus the last commit, none yet) would still read {0: 5, 1: 3}.
    assert len(got) == 4
    read = {p: sum(1 for r in got if r.partition == p) for p in (0, 1)}
    lag = await consumer_lag(consumer, group="g", topic=TOPIC)
    assert lag.partitions == {0: 5 - read[0], 1: 3 - read[1]}
    # New records raise it; reading everything brings it to zero.
    await log.append(TOPIC, b"late", key=_key_for(1, 2))
    assert (await consumer_lag(consumer, group="g", topic=TOPIC)).partitions[1] == 4 - read[1]
    while await consumer.poll(max_records=100, timeout_ms=0):
        pass
    assert (await consumer_lag(consumer, group="g", topic=TOPIC)).partitions == {0: 0, 1: 0}
    await consumer.stop()


async def test_a_restarted_member_lags_from_its_last_commit() -> None:
    log = await _log_with([4])
    first = log.consumer(TOPIC, group="g")
    await first.start()
    await first.poll(max_records=3, timeout_ms=0)
    await first.commit()
    await first.poll(max_records=1, timeout_ms=0)  # read, never committed
    await first.stop()
    second = log.consumer(TOPIC, group="g")
    await second.start()
    assert (await consumer_lag(second, group="g", topic=TOPIC)).partitions == {0: 1}
    await second.stop()


async def test_each_member_of_a_group_reports_only_its_own_partitions() -> None:
    log = await _log_with([2, 2, 2, 2])
    members = [log.client().consumer(TOPIC, group="g") for _ in range(2)]
    for m in members:
        await m.start()
    reports = [await consumer_lag(m, group="g", topic=TOPIC) for m in members]
    assert [sorted(r.partitions) for r in reports] == [[0, 2], [1, 3]]
    for m in members:
        await m.stop()


async def test_a_feed_shard_reports_its_groups_lag_once_started() -> None:
    cfg = load_config({"PEERNET_EVENTS_PARTITIONS": "2", "PEERNET_INBOX_PARTITIONS": "2"})
    log = MemoryEventLog()
    await log.start()
    await log.ensure_topics(peernet_topics(cfg))
    shard = FeedShard(0, 1, cfg, log, MemoryFeedStore(cap=10), push=False)
    assert await shard.lag() == []
    await log.append(cfg.topics.events, b"not an event", key=_key_for(1, 2))
    await shard.start()
    try:
        assert await shard.lag() == [ConsumerLag(feeds_group(cfg), cfg.topics.events, {0: 0, 1: 1})]
        reads: list[list[ConsumerLag]] = []

        async def read() -> None:
            while True:
                reads.append(await shard.lag())
                await asyncio.sleep(0.01)

        reader = asyncio.create_task(read())
        try:
            await eventually(lambda: reads and reads[-1] == [ConsumerLag(
                feeds_group(cfg), cfg.topics.events, {0: 0, 1: 0})])
        finally:
            reader.cancel()
    finally:
        await shard.stop()


def test_the_gauge_has_one_series_per_group_and_partition() -> None:
    metrics.set_consumer_lag([
        ConsumerLag("peernet.feeds@e", "e", {0: 3, 1: 0}),
        ConsumerLag("peernet.feeds@e", "e", {2: 7}),
        # During a rebalance two members may report one partition: the larger lag is kept.
        ConsumerLag("peernet.feeds@e", "e", {2: 5}),
        ConsumerLag("peernet.projections@e", "e", {0: 12}),
    ])
    text = metrics.render().decode()
    assert _series(text, "peernet.feeds@e") == {"0": 3.0, "1": 0.0, "2": 7.0}
    assert _series(text, "peernet.projections@e") == {"0": 12.0}
    # A consumer that stops reporting loses its series: no stale lag.
    metrics.set_consumer_lag([ConsumerLag("peernet.feeds@e", "e", {0: 1})])
    text = metrics.render().decode()
    assert _series(text, "peernet.feeds@e") == {"0": 1.0}
    assert _series(text, "peernet.projections@e") == {}


def test_metrics_reads_the_lag_at_scrape_time() -> None:
    calls: list[int] = []

    async def lag() -> list[ConsumerLag]:
        calls.append(1)
        return [ConsumerLag("peernet.sessions.0-of-2@e", "e", {0: len(calls)})]

    with gateway() as gw:
        gw.deps.consumer_lag = lag
        first = gw.client.get("/metrics").text
        second = gw.client.get("/metrics").text
    assert _series(first, "peernet.sessions.0-of-2@e") == {"0": 1.0}
    assert _series(second, "peernet.sessions.0-of-2@e") == {"0": 2.0}


def test_a_lag_source_that_hangs_is_bounded_and_drops_the_series(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_module, "METRICS_LAG_TIMEOUT_S", 0.05)

    async def hangs() -> list[ConsumerLag]:
        await asyncio.sleep(30)
        return []

    metrics.set_consumer_lag([ConsumerLag("old@e", "e", {0: 9})])
    errors_before = metrics.CONSUMER_LAG_ERRORS._value.get()
    with gateway() as gw:
        gw.deps.consumer_lag = hangs
        reply = gw.client.get("/metrics")
    assert reply.status_code == 200
    assert _series(reply.text, "old@e") == {}
    assert "peernet_connections" in reply.text
    assert metrics.CONSUMER_LAG_ERRORS._value.get() == errors_before + 1


def test_the_bench_harness_reads_the_lag_gauge_and_nothing_else() -> None:
    # bench/probe.py sums every sample whose metric name contains "lag": only the gauge may.
    metrics.CONSUMER_LAG_ERRORS.inc()
    metrics.set_consumer_lag([ConsumerLag("a@e", "e", {0: 2, 1: 3}), ConsumerLag("b@e", "e", {0: 4})])
    assert parse_lag(metrics.render().decode()) == {"peernet_kafka_consumer_lag": 9.0}


async def test_the_report_carries_the_consumers_client_renewals() -> None:
    log = await _log_with([2])
    consumer = log.consumer(TOPIC, group="g")
    await consumer.start()
    consumer.renewals = 2  # as KafkaLogConsumer counts them after commits kept failing
    assert await consumer_lag(consumer, group="g", topic=TOPIC) == ConsumerLag("g", TOPIC, {0: 2}, 2)
    await consumer.stop()


def test_the_renewals_gauge_sums_a_groups_members_and_forgets_silent_groups() -> None:
    metrics.set_consumer_lag([
        ConsumerLag("peernet.feeds@e", "e", {0: 0}, renewals=1),
        ConsumerLag("peernet.feeds@e", "e", {1: 0}, renewals=2),
        ConsumerLag("peernet.projections@e", "e", {0: 0}),
    ])
    value = metrics.REGISTRY.get_sample_value
    assert value("peernet_kafka_consumer_renewals", {"group": "peernet.feeds@e", "topic": "e"}) == 3
    assert value("peernet_kafka_consumer_renewals",
                 {"group": "peernet.projections@e", "topic": "e"}) == 0
    metrics.set_consumer_lag([ConsumerLag("peernet.projections@e", "e", {0: 0})])
    assert value("peernet_kafka_consumer_renewals", {"group": "peernet.feeds@e", "topic": "e"}) is None
