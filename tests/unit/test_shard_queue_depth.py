"""The `peernet_shard_queue_depth` series of /metrics (serve/metrics.py, serve/app.py): one per
shard actor that answered, read at scrape time. The counts themselves are tested with each
class (test_actors_session.py, test_feed.py, test_presence_shard.py)."""

from __future__ import annotations

import asyncio
import re

import pytest
from gateway_harness import gateway

from bench.probe import parse_lag
from serve import app as app_module
from serve import metrics

SERIES = re.compile(r'^peernet_shard_queue_depth\{shard="([^"]+)"\} (\S+)$')


def _depths(text: str) -> dict[str, float]:
    """actor name -> value of the queue depth series in a /metrics body."""
    return {m.group(1): float(m.group(2))
            for m in (SERIES.match(line) for line in text.splitlines()) if m}


def test_the_gauge_has_one_series_per_actor_that_answered() -> None:
    # Named as actors/wiring.py names them (not imported: unit tests run without Ray).
    names = ["session-shard-0-of-2", "session-shard-1-of-2", "presence-shard-0-of-1",
             "feed-shard-0-of-1", "projector"]
    metrics.set_shard_queue_depth({name: i for i, name in enumerate(names)})
    assert _depths(metrics.render().decode()) == {name: float(i) for i, name in enumerate(names)}
    # An actor that stops answering loses its series: no stale depth.
    metrics.set_shard_queue_depth({names[0]: 4})
    assert _depths(metrics.render().decode()) == {names[0]: 4.0}
    metrics.set_shard_queue_depth({})
    assert _depths(metrics.render().decode()) == {}


def test_metrics_reads_the_depths_at_scrape_time() -> None:
    calls: list[int] = []

    async def depths() -> dict[str, int]:
        calls.append(1)
        return {"session-shard-0-of-2": len(calls), "projector": 0}

    with gateway() as gw:
        gw.deps.shard_queue_depth = depths
        first = gw.client.get("/metrics").text
        second = gw.client.get("/metrics").text
    assert _depths(first) == {"session-shard-0-of-2": 1.0, "projector": 0.0}
    assert _depths(second) == {"session-shard-0-of-2": 2.0, "projector": 0.0}


def test_a_depth_source_that_hangs_is_bounded_and_drops_the_series(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_module, "METRICS_LAG_TIMEOUT_S", 0.05)

    async def hangs() -> dict[str, int]:
        await asyncio.sleep(30)
        return {}

    metrics.set_shard_queue_depth({"projector": 9})
    with gateway() as gw:
        gw.deps.shard_queue_depth = hangs
        reply = gw.client.get("/metrics")
    assert reply.status_code == 200
    assert _depths(reply.text) == {}
    assert "peernet_connections" in reply.text


def test_the_bench_harness_does_not_take_the_depths_for_lag() -> None:
    # bench/probe.py sums every sample whose metric name contains "lag".
    metrics.set_consumer_lag([])
    metrics.set_shard_queue_depth({"projector": 5})
    assert parse_lag(metrics.render().decode()) == {}
