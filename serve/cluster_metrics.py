"""One scrape for the whole gateway: each replica publishes its own registry to the Cache every
few seconds, and GET /metrics/cluster on any replica merges what every live replica published,
each sample labelled with its replica."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from bus.cache import Cache
from peernet.errors import PeerNetError
from serve import metrics

log = logging.getLogger("peernet.metrics")

# The label that tells the replicas' series apart in the merged scrape.
REPLICA_LABEL = "replica"
# A replica's entry lives this many publish intervals after its last publish: a replica that
# died, or cannot reach Redis, leaves the merged scrape within them (one late publish does not).
ENTRY_TTL_INTERVALS = 3
# Families that already describe the whole deployment: the shard actors' consumer lag and queue
# depths, read at a scrape from the actors (not from the replica). Merged per replica they would
# repeat one reading N times, each as old as its replica's last /metrics scrape; the merged
# scrape has them once, without a replica label, read by the replica that answers it.
DEPLOYMENT_WIDE = frozenset({"peernet_kafka_consumer_lag", "peernet_kafka_consumer_renewals",
                             "peernet_shard_queue_depth"})
# Rendered by the merge: how many replicas' entries it holds.
REPLICAS_FAMILY = "peernet_cluster_replicas"


def metrics_group(keyspace: str) -> str:
    """The Cache group the gateway replicas publish to (PEERNET_METRICS_KEYSPACE)."""
    return f"{keyspace}:gateway"


class MetricsPublisher:
    """Puts what `render` returns into the Cache group every `every_ms` (0: never), under its
    replica id, live for ENTRY_TTL_INTERVALS intervals (nothing when `render` returns None: not
    known yet). A failed publish is logged and counted
    (peernet_background_errors_total{loop=`loop`}) and the next one is tried on time; `stop`
    takes the entry out at once. The gateway's metrics use it, and its direct endpoint
    (serve/endpoints.py)."""

    def __init__(self, cache: Cache, group: str, replica: str, every_ms: int,
                 render: Callable[[], bytes | None] = metrics.render,
                 loop: str = "metrics_publish") -> None:
        self._cache = cache
        self._group = group
        self.replica = replica
        self._every_s = max(0, every_ms) / 1000
        self._render = render
        self._loop = loop
        self._task: asyncio.Task[None] | None = None

    @property
    def ttl_s(self) -> float:
        return ENTRY_TTL_INTERVALS * self._every_s

    async def start(self) -> None:
        """Publish once (so the replica is in the merged scrape as soon as it serves), then every
        interval."""
        if self._every_s <= 0 or self._task is not None:
            return
        await self._publish()
        self._task = asyncio.create_task(self._publish_forever(), name=self._loop)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # Else the entry would be merged, frozen, until it expires.
        with contextlib.suppress(PeerNetError):
            await self._cache.remove_member(self._group, self.replica)

    async def _publish_forever(self) -> None:
        while True:
            await asyncio.sleep(self._every_s)
            await self._publish()

    async def _publish(self) -> None:
        try:
            value = self._render()
            if value is None:
                return
            await self._cache.put_member(self._group, self.replica, value, ttl_s=self.ttl_s)
        except PeerNetError as exc:  # Redis away: the message says so, no traceback
            metrics.BACKGROUND_ERRORS.labels(self._loop).inc()
            log.warning("%s of replica %s not published: %s", self._loop, self.replica, exc)
        except Exception:
            metrics.BACKGROUND_ERRORS.labels(self._loop).inc()
            log.exception("%s of replica %s not published", self._loop, self.replica)


class _Families(Collector):
    """Ready-made metric families, for generate_latest."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def merge(published: Mapping[str, bytes], deployment_wide: Iterable[Metric] = ()) -> bytes:
    """One Prometheus text exposition of `published` (replica id -> that replica's exposition):
    each family's HELP and TYPE once, each sample with a `replica` label (replacing one it had),
    histograms with their _bucket, _sum and _count. The DEPLOYMENT_WIDE families of the entries
    are left out; `deployment_wide` (this scrape's own reading) goes in as it is, and
    `peernet_cluster_replicas` counts the entries merged. An entry that does not parse is left
    out (logged), as is a family whose type differs from the first replica's (an upgrade that
    changed it): the output stays one valid exposition."""
    families: dict[str, Metric] = {}
    merged = 0
    for replica in sorted(published):
        try:
            parsed = list(text_string_to_metric_families(published[replica].decode()))
        except ValueError as exc:
            log.warning("published metrics of replica %s do not parse; left out: %s", replica, exc)
            continue
        merged += 1
        for family in parsed:
            if family.name in DEPLOYMENT_WIDE:
                continue
            into = families.get(family.name)
            if into is None:
                into = families[family.name] = Metric(family.name, family.documentation,
                                                      family.type, family.unit)
            elif into.type != family.type:
                log.warning("metric %s of replica %s is a %s, not a %s; left out", family.name,
                            replica, family.type, into.type)
                continue
            into.samples.extend(s._replace(labels={**s.labels, REPLICA_LABEL: replica})
                                for s in family.samples)
    count = GaugeMetricFamily(REPLICAS_FAMILY,
                              "Gateway replicas whose published metrics this scrape merges",
                              value=merged)
    return generate_latest(_Families([*families.values(), *deployment_wide, count]))


def deployment_wide() -> list[Metric]:
    """This replica's DEPLOYMENT_WIDE families as they stand (set by the scrape's reading)."""
    return [*metrics.CONSUMER_LAG.collect(), *metrics.CONSUMER_RENEWALS.collect(),
            *metrics.SHARD_QUEUE_DEPTH.collect()]
