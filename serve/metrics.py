"""The gateway's Prometheus metrics (one registry per process)."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from bus.eventlog import ConsumerLag

REGISTRY = CollectorRegistry(auto_describe=True)

CONNECTIONS = Gauge("peernet_connections", "Open WebSocket connections", registry=REGISTRY)
ERRORS = Counter("peernet_errors_total", "Error frames sent, by code", ["code"], registry=REGISTRY)
CLOSES = Counter("peernet_closes_total", "Connections closed by the server, by close code",
                 ["code"], registry=REGISTRY)
# Refused before any frame was read (closed at once with 4429, counted in CLOSES too), by reason:
# "address", the client address already had PEERNET_MAX_CONNECTIONS_PER_ADDRESS open here.
CONNECTIONS_REFUSED = Counter("peernet_connections_refused_total",
                              "WebSocket connections refused on opening, by reason", ["reason"],
                              registry=REGISTRY)
DELIVERY_LATENCY = Histogram(
    "peernet_delivery_latency_seconds",
    "From an inbox item's event time to its push on a socket",
    buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
    registry=REGISTRY)
APPEND_LATENCY = Histogram(
    "peernet_log_append_seconds", "Durable appends to the event log (acks=all)",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 5), registry=REGISTRY)
BATCH_SIZE = Histogram(
    "peernet_gateway_batch_size",
    "Requests of one event-loop turn sent to a backend together, by what they do (TurnBatch)",
    ["batch"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=REGISTRY)
PRESENCE_PUSH_LATENCY = Histogram(
    "peernet_presence_push_latency_seconds",
    "From a presence change at its shard to its arrival at a watching replica",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 5), registry=REGISTRY)
PRESENCE_ERRORS = Counter("peernet_presence_errors_total",
                          "Presence reports and lease renewals that failed, and lapsed leases",
                          ["kind"], registry=REGISTRY)
# Failures inside this process's background tasks (a connection's writer, the ack buffer, the
# cid marks, the presence lease, pub/sub unsubscribes, re-reading watched users, publishing the
# metrics), by loop: each is logged and the loop goes on (a writer closes its connection). The shard actors
# count theirs in their own stats.
BACKGROUND_ERRORS = Counter("peernet_background_errors_total",
                            "Errors caught in the gateway's background loops and tasks, by loop",
                            ["loop"], registry=REGISTRY)
# Set at scrape time from the consumers' own reports (they run in the shard actors, not here):
# records in the events topic after each consumer's position, per group and partition.
CONSUMER_LAG = Gauge("peernet_kafka_consumer_lag",
                     "Records after a consumer group's position, per partition (read at scrape time)",
                     ["group", "topic", "partition"], registry=REGISTRY)
# Set at scrape time with the lag: the consumers' client renewals (a stuck group coordinator
# survived by a new client), summed over a group's members, since each member's actor started.
CONSUMER_RENEWALS = Gauge("peernet_kafka_consumer_renewals",
                          "Kafka clients a consumer group's members replaced after their commits "
                          "kept failing, since each member's actor started (read at scrape time)",
                          ["group", "topic"], registry=REGISTRY)
CONSUMER_LAG_ERRORS = Counter("peernet_kafka_consumer_scrape_errors_total",
                              "Scrapes whose consumer lag could not be read in time",
                              registry=REGISTRY)


class Tally:
    """A counter by one label, for the frame path: `inc` is a dictionary update on the replica's
    event loop, and the registry reads the counts when it is scraped. prometheus_client's
    Counter takes a lock on every increment (and `labels()` checks and locks again), which the
    frame path paid for every frame in and out. Exposed like a Counter: `<name>_total{label}`.
    For label values from a small fixed set; increments from one thread (the event loop)."""

    def __init__(self, name: str, documentation: str, label: str,
                 registry: CollectorRegistry) -> None:
        self._name = name.removesuffix("_total")
        self._documentation = documentation
        self._label = label
        self.counts: dict[str, int] = {}
        registry.register(self)

    def inc(self, value: str) -> None:
        counts = self.counts
        counts[value] = counts.get(value, 0) + 1

    def collect(self) -> Iterable[CounterMetricFamily]:
        family = CounterMetricFamily(self._name, self._documentation, labels=[self._label])
        for value, count in list(self.counts.items()):
            family.add_metric([value], count)
        yield family

    def describe(self) -> Iterable[CounterMetricFamily]:
        yield CounterMetricFamily(self._name, self._documentation, labels=[self._label])


FRAMES_IN = Tally("peernet_frames_in_total", "Frames received, by type", "type", REGISTRY)
FRAMES_OUT = Tally("peernet_frames_out_total", "Frames sent, by type", "type", REGISTRY)
# A frame in or out, by its type (one of the handlers' names or "unknown"; the frames PeerNet sends).
frame_in = FRAMES_IN.inc
frame_out = FRAMES_OUT.inc

# Set at scrape time from each shard actor's own count (`queue_depth`): the work it has taken
# and not finished. Session and feed shards and the projector: records fetched from the events
# topic (the batch in hand) and not yet handled; presence shards: reports (`update`, `sync`)
# received and not yet finished. Per kind, exactly: each class's `queue_depth` docstring.
SHARD_QUEUE_DEPTH = Gauge("peernet_shard_queue_depth",
                          "Work a shard actor has taken and not finished, by actor (read at "
                          "scrape time)", ["shard"], registry=REGISTRY)


# Every event loop in the replica stops while the collector runs: a full collection over the
# objects of thousands of connections shows up in every latency above.
GC_PAUSE = Histogram("peernet_gc_pause_seconds",
                     "Python garbage collections in this replica, by generation",
                     ["generation"],
                     buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1),
                     registry=REGISTRY)
_gc_started: list[float] = []


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _gc_started[:] = [time.perf_counter()]
    elif _gc_started:
        GC_PAUSE.labels(str(info.get("generation", "?"))).observe(
            time.perf_counter() - _gc_started.pop())


def watch_gc() -> None:
    """Time this process's garbage collections into GC_PAUSE (once per process)."""
    if _on_gc not in gc.callbacks:
        gc.callbacks.append(_on_gc)


def set_consumer_lag(reports: Iterable[ConsumerLag]) -> None:
    """Replace the lag gauge's series with `reports` (a partition two members report during a
    rebalance keeps the larger lag), and the renewals gauge's (summed per group); series of
    consumers that no longer report go away."""
    values: dict[tuple[str, str, str], int] = {}
    renewals: dict[tuple[str, str], int] = {}
    for report in reports:
        for partition, lag in report.partitions.items():
            key = (report.group, report.topic, str(partition))
            values[key] = max(lag, values.get(key, 0))
        group = (report.group, report.topic)
        renewals[group] = renewals.get(group, 0) + report.renewals
    CONSUMER_LAG.clear()
    for labels, lag in values.items():
        CONSUMER_LAG.labels(*labels).set(lag)
    CONSUMER_RENEWALS.clear()
    for group, count in renewals.items():
        CONSUMER_RENEWALS.labels(*group).set(count)


def set_shard_queue_depth(depths: Mapping[str, int]) -> None:
    """Replace the queue depth gauge's series with `depths` (actor name -> depth); series of
    actors that no longer answer go away."""
    SHARD_QUEUE_DEPTH.clear()
    for shard, depth in depths.items():
        SHARD_QUEUE_DEPTH.labels(shard).set(depth)


def render() -> bytes:
    return generate_latest(REGISTRY)
