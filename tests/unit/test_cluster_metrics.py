"""/metrics/cluster (serve/cluster_metrics.py, serve/app.py): what each replica publishes to the
Cache, and the merge of every live replica's exposition into one scrape with a `replica` label."""

from __future__ import annotations

import asyncio
from collections import Counter as Tally

import pytest
from gateway_harness import gateway
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from unit_helpers import eventually

from bus.cache_memory import MemoryCache
from bus.eventlog import ConsumerLag
from serve import metrics
from serve.cluster_metrics import (
    DEPLOYMENT_WIDE,
    REPLICAS_FAMILY,
    MetricsPublisher,
    deployment_wide,
    merge,
    metrics_group,
)

GROUP = metrics_group("metrics-unit")


def exposition(frames: dict[str, int], connections: int, latencies: list[float],
               lag: int | None = None) -> bytes:
    """A replica's registry as it publishes it: a labelled counter, a gauge, a histogram, and
    (when `lag` is given) a series of a deployment-wide gauge."""
    registry = CollectorRegistry()
    frames_in = Counter("peernet_frames_in_total", "Frames received, by type", ["type"],
                        registry=registry)
    for kind, n in frames.items():
        frames_in.labels(kind).inc(n)
    Gauge("peernet_connections", "Open WebSocket connections", registry=registry).set(connections)
    latency = Histogram("peernet_delivery_latency_seconds", "Delivery latency",
                        buckets=(0.01, 0.1, 1), registry=registry)
    for seconds in latencies:
        latency.observe(seconds)
    lag_gauge = Gauge("peernet_kafka_consumer_lag", "Lag", ["group", "topic", "partition"],
                      registry=registry)
    if lag is not None:
        lag_gauge.labels("g", "t", "0").set(lag)
    return generate_latest(registry)


def families(text: str) -> dict[str, Metric]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def values(family: Metric, sample: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Each series of `sample` (a sample name of `family`): sorted labels -> value."""
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples if s.name == sample}


def test_merge_labels_every_sample_with_its_replica_and_names_each_family_once() -> None:
    published = {
        "r1": exposition({"dm": 3, "ping": 1}, connections=5, latencies=[0.005, 0.5], lag=7),
        "r2": exposition({"dm": 2}, connections=1, latencies=[2.0], lag=9),
    }
    text = merge(published).decode()

    types = Tally(line.split()[2] for line in text.splitlines() if line.startswith("# TYPE"))
    helps = Tally(line.split()[2] for line in text.splitlines() if line.startswith("# HELP"))
    assert types and all(n == 1 for n in types.values()), types
    assert helps == types
    got = families(text)  # it parses back: one valid exposition
    assert values(got["peernet_frames_in"], "peernet_frames_in_total") == {
        (("replica", "r1"), ("type", "dm")): 3.0,
        (("replica", "r1"), ("type", "ping")): 1.0,
        (("replica", "r2"), ("type", "dm")): 2.0,
    }
    assert values(got["peernet_connections"], "peernet_connections") == {
        (("replica", "r1"),): 5.0, (("replica", "r2"),): 1.0}
    latency = got["peernet_delivery_latency_seconds"]
    assert latency.type == "histogram"
    assert values(latency, "peernet_delivery_latency_seconds_bucket") == {
        (("le", "0.01"), ("replica", "r1")): 1.0, (("le", "0.1"), ("replica", "r1")): 1.0,
        (("le", "1.0"), ("replica", "r1")): 2.0, (("le", "+Inf"), ("replica", "r1")): 2.0,
        (("le", "0.01"), ("replica", "r2")): 0.0, (("le", "0.1"), ("replica", "r2")): 0.0,
        (("le", "1.0"), ("replica", "r2")): 0.0, (("le", "+Inf"), ("replica", "r2")): 1.0,
    }
    assert values(latency, "peernet_delivery_latency_seconds_count") == {
        (("replica", "r1"),): 2.0, (("replica", "r2"),): 1.0}
    assert values(latency, "peernet_delivery_latency_seconds_sum") == {
        (("replica", "r1"),): pytest.approx(0.505), (("replica", "r2"),): 2.0}
    assert values(got[REPLICAS_FAMILY], REPLICAS_FAMILY) == {(): 2.0}


def test_the_deployment_wide_gauges_come_once_from_the_scrapes_own_reading() -> None:
    published = {"r1": exposition({}, 0, [], lag=7), "r2": exposition({}, 0, [], lag=9)}
    fresh = GaugeMetricFamily("peernet_kafka_consumer_lag", "Lag read now",
                              labels=["group", "topic", "partition"])
    fresh.add_metric(["g", "t", "0"], 11)
    got = families(merge(published, [fresh]).decode())
    # The replicas' own copies (as old as each one's last /metrics scrape) are left out.
    assert values(got["peernet_kafka_consumer_lag"], "peernet_kafka_consumer_lag") == {
        (("group", "g"), ("partition", "0"), ("topic", "t")): 11.0}
    # Without a reading, no series at all rather than N stale ones.
    got = families(merge(published).decode())
    assert "peernet_kafka_consumer_lag" not in got
    # What the app passes: the gauges of serve/metrics.py, by these very names.
    assert {f.name for f in deployment_wide()} == DEPLOYMENT_WIDE


def test_an_entry_that_does_not_parse_or_disagrees_on_a_type_is_left_out() -> None:
    clashing = CollectorRegistry()
    Counter("peernet_connections", "Not a gauge here", registry=clashing).inc()
    Gauge("peernet_other", "Fine", registry=clashing).set(4)
    published = {
        "r1": exposition({"dm": 1}, 2, []),
        "r2": b"peernet_connections{ 1\n\xff",
        "r3": generate_latest(clashing),
    }
    text = merge(published).decode()
    got = families(text)
    assert values(got["peernet_connections"], "peernet_connections") == {(("replica", "r1"),): 2.0}
    assert got["peernet_connections"].type == "gauge"
    assert values(got["peernet_other"], "peernet_other") == {(("replica", "r3"),): 4.0}
    assert values(got[REPLICAS_FAMILY], REPLICAS_FAMILY) == {(): 2.0}
    assert "peernet_connections_total" not in text


def test_merge_of_nothing_is_a_valid_exposition() -> None:
    got = families(merge({}).decode())
    assert list(got) == [REPLICAS_FAMILY]
    assert values(got[REPLICAS_FAMILY], REPLICAS_FAMILY) == {(): 0.0}


def publish_errors() -> float:
    return metrics.REGISTRY.get_sample_value("peernet_background_errors_total",
                                             {"loop": "metrics_publish"}) or 0.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_an_entry_lives_three_intervals_after_the_last_publish() -> None:
    clock = FakeClock()
    cache = MemoryCache(clock=clock)
    publisher = MetricsPublisher(cache, GROUP, "r1", 60_000, render=lambda: b"x 1\n")
    await publisher.start()  # published at once, before the first interval
    try:
        assert await cache.members(GROUP) == {"r1": b"x 1\n"}
        assert publisher.ttl_s == 180
        clock.now += 179.9
        assert await cache.members(GROUP) == {"r1": b"x 1\n"}
        clock.now += 0.2  # a replica that stopped publishing (dead) is gone
        assert await cache.members(GROUP) == {}
    finally:
        await publisher.stop()


async def test_the_publish_loop_counts_a_failure_and_goes_on_then_leaves_on_stop() -> None:
    cache = MemoryCache()
    published = [0]

    def render() -> bytes:
        published[0] += 1
        if published[0] == 3:
            raise RuntimeError("a bug in rendering")
        return f"x {published[0]}\n".encode()

    before = publish_errors()
    publisher = MetricsPublisher(cache, GROUP, "r1", 20, render=render)
    await publisher.start()
    try:
        await eventually(lambda: publish_errors() == before + 1)  # the bug, counted
        cache.set_down(True)  # Redis away: counted too, and the loop goes on
        await eventually(lambda: publish_errors() >= before + 3)
        cache.set_down(False)
        latest = published[0]

        async def republished() -> bool:
            entry = (await cache.members(GROUP)).get("r1", b"")
            return entry.startswith(b"x ") and int(entry.split()[1]) > latest

        for _ in range(100):
            if await republished():
                break
            await asyncio.sleep(0.02)
        assert await republished()
    finally:
        await publisher.stop()
    # Stopped: the entry is taken out at once, not left to expire.
    assert await cache.members(GROUP) == {}


async def test_publishing_every_0_ms_is_off() -> None:
    cache = MemoryCache()
    publisher = MetricsPublisher(cache, GROUP, "r1", 0, render=lambda: b"x 1\n")
    await publisher.start()
    await publisher.stop()
    assert await cache.members(GROUP) == {}


def test_the_cluster_endpoint_merges_every_live_replica_and_its_own() -> None:
    other = exposition({"dm": 4}, connections=3, latencies=[0.05], lag=99)

    async def depths() -> dict[str, int]:
        return {"projector": 6}

    async def no_lag() -> list[ConsumerLag]:
        return []

    group = metrics_group("metrics")  # the default PEERNET_METRICS_KEYSPACE
    with gateway() as gw:
        gw.deps.shard_queue_depth = depths
        gw.deps.consumer_lag = no_lag

        async def publish_other() -> None:
            await gw.cache.put_member(group, "other", other, ttl_s=30)

        gw.run(publish_other)
        reply = gw.client.get("/metrics/cluster")
        assert reply.status_code == 200, reply.text
        assert reply.headers["content-type"].startswith("text/plain")
        got = families(reply.text)
        # This replica published at start ("unit", the harness's replica id); the other's entry
        # is merged beside it.
        connections = values(got["peernet_connections"], "peernet_connections")
        assert set(connections) == {(("replica", "other"),), (("replica", "unit"),)}
        assert connections[(("replica", "other"),)] == 3.0
        assert values(got["peernet_shard_queue_depth"], "peernet_shard_queue_depth") == {
            (("shard", "projector"),): 6.0}
        # The other replica's lag (99) is not merged: this scrape read none.
        assert not got["peernet_kafka_consumer_lag"].samples
        assert values(got[REPLICAS_FAMILY], REPLICAS_FAMILY) == {(): 2.0}
        # /metrics is the answering replica's own registry, as before: no replica label.
        assert 'replica="' not in gw.client.get("/metrics").text

        gw.cache.set_down(True)
        down = gw.client.get("/metrics/cluster")
        gw.cache.set_down(False)
        assert down.status_code == 503
        assert down.json()["error"]["code"] == "unavailable"
    # The stopped replica took its entry out.
    assert set(asyncio.run(gw.cache.members(group))) == {"other"}
