"""The home-feed read probe (bench/feed_probe.py): its schedule and accounting on synthetic reads,
its open loop against a stalling reader, and whole runs against the real gateway app (Starlette,
served by uvicorn in this process) on in-memory backends with a FeedShard building the feeds.
No PeerNet server, Ray, Kafka or Redis is needed."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from bench_fake_peernet import serve_asgi

from actors.feed import FeedShard
from bench.feed_probe import (
    FeedProbeParams,
    ReadLedger,
    Schedule,
    build_parser,
    followed,
    main,
    params_from_args,
    progress_line,
    run_cli,
    run_load,
)
from bus.cache_memory import MemoryCache
from bus.eventlog_memory import MemoryEventLog
from bus.feeds import Cursor, FeedPage
from bus.feeds_memory import MemoryFeedStore
from bus.inbox_memory import MemoryInboxCache
from bus.presence_memory import MemoryPresenceStore
from bus.pubsub_memory import MemoryPubSub
from bus.store_memory import MemoryDocumentStore
from bus.topics import peernet_topics
from peernet.config import load_config
from peernet.errors import unavailable
from serve.app import build_app
from serve.deps import GatewayDeps

MS = 1_000_000  # ns

# --- schedule and accounting ------------------------------------------------------------------


def test_the_schedule_spreads_reads_round_robin_at_the_rate() -> None:
    s = Schedule(rate=1000, warmup=3, duration=20, readers=100)
    assert (s.total, s.first_measured, s.measured) == (23_000, 3_000, 20_000)
    assert s.offset_ns(0) == 0 and s.offset_ns(1500) == 1_500 * MS
    assert [s.reader(j) for j in (0, 1, 99, 100, 201)] == [0, 1, 99, 0, 1]
    assert not s.is_measured(2_999) and s.is_measured(3_000)
    # A rate that does not divide a second: reads due before warmup + duration, exclusive.
    s = Schedule(rate=3, warmup=0.5, duration=1, readers=2)
    assert [s.offset_ns(j) for j in range(s.total)] == [0, 333_333_333, 666_666_667, 10**9,
                                                        1_333_333_333]
    assert s.first_measured == 2  # due at 0.667 s, the first at or after 0.5 s
    # Float noise does not add a read: 1000 * 0.3 is 300.00000000000006.
    assert Schedule(rate=1000, warmup=0.3, duration=0.7, readers=1).first_measured == 300


def test_latency_runs_from_the_due_time_and_every_read_ends_once() -> None:
    s = Schedule(rate=100, warmup=0.02, duration=0.05, readers=2)  # reads 0-1 warm-up, 2-6 measured
    ledger = ReadLedger(s)
    ledger.start(1_000 * MS)
    for j in range(s.total):
        ledger.dispatch(j)
    # Read 2 is due at t0 + 20 ms, sent 50 ms late, answered 10 ms after that: 60 ms, lag 50 ms.
    ledger.mark_sent(2, ledger.due_ns(2) + 50 * MS)
    assert ledger.answered(2, ledger.due_ns(2) + 60 * MS, items=7)
    assert ledger.answered(3, ledger.due_ns(3) + 5 * MS, items=0)
    assert ledger.failed(4, "timeout")
    assert not ledger.answered(4, ledger.due_ns(4) + 20_000 * MS, items=1)  # late: not counted twice
    assert not ledger.failed(2, "timeout")  # already answered
    assert ledger.failed(5, "unavailable") and ledger.failed(6, "unavailable")
    assert ledger.answered(0, ledger.due_ns(0) + 900 * MS, items=3)  # warm-up: not timed
    assert ledger.failed(1, "rate_limited")
    lat = ledger.latency.summary()
    assert lat["count"] == 2 and lat["max"] == pytest.approx(60, rel=1e-3)
    assert ledger.send_lag.summary()["max"] == pytest.approx(50, rel=1e-3)
    summary = ledger.summary()
    assert summary["answered"] + summary["errors"] == summary["measured"] == 5
    assert summary["errors_by_reason"] == {"timeout": 1, "unavailable": 2}
    assert summary["warmup"] == {"reads": 2, "answered": 1, "errors": 1,
                                 "errors_by_reason": {"rate_limited": 1}}
    assert summary["late_replies"] == 1 and summary["unconcluded"] == 0
    assert summary["empty_pages"] == 1 and summary["items_per_page_mean"] == 3.5
    assert ledger.failures == 4
    # 2 answered over the 50 ms window stretched to the last reply at 80 ms: 60 ms.
    assert ledger.achieved_rate() == pytest.approx(2 / 0.060)
    line = progress_line(ledger, 0.5)
    assert "measuring" in line and "errors 4" in line and "last 3 replies" in line
    assert ledger.recent.count == 0  # the progress line took it


async def test_the_load_is_open_loop_a_stall_delays_no_send() -> None:
    """Every read takes 300 ms (a stalled server): the reads still go out on schedule and each
    carries the stall in its latency, instead of the load slowing down to hide it."""
    s = Schedule(rate=100, warmup=0.1, duration=0.4, readers=3)
    ledger = ReadLedger(s)
    concurrent = peak = 0

    async def read(j: int) -> None:
        nonlocal concurrent, peak
        ledger.mark_sent(j, asyncio_now_ns())
        concurrent += 1
        peak = max(peak, concurrent)
        await asyncio.sleep(0.3)
        concurrent -= 1
        ledger.answered(j, asyncio_now_ns(), items=1)

    out = io.StringIO()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await run_load(ledger, read, progress=out, progress_every=0.25, lead_s=0.05)
    elapsed = loop.time() - started
    assert ledger.summary()["answered"] == s.measured == 40
    assert elapsed < 1.5  # 50 reads of 0.3 s one after another would take 15 s
    assert peak >= 25  # about rate x stall reads in flight at once
    lat = ledger.latency.summary()
    assert lat["p50"] >= 300 and lat["max"] < 700
    assert ledger.send_lag.summary()["p50"] < 50
    assert "feed probe" in out.getvalue()  # a progress line was printed


def asyncio_now_ns() -> int:
    from bench.feed_probe import now_ns

    return now_ns()


async def test_a_read_that_raises_or_never_concludes_is_still_counted() -> None:
    ledger = ReadLedger(Schedule(rate=200, warmup=0, duration=0.05, readers=1))

    async def read(j: int) -> None:
        if j % 2:
            raise RuntimeError("bug")

    await run_load(ledger, read, lead_s=0)
    assert ledger.summary()["errors_by_reason"] == {"RuntimeError": 5, "unconcluded": 5}


def test_parameters() -> None:
    args = build_parser().parse_args(["--url", "http://h:1", "--readers", "4", "--rate", "50",
                                      "--via", "http", "--limit", "5", "--http-client", "httpx"])
    params = params_from_args(args)
    assert (params.url, params.readers, params.rate, params.via, params.limit, params.http_client) == (
        "http://h:1", 4, 50.0, "http", 5, "httpx")
    assert FeedProbeParams().problems() == []
    assert FeedProbeParams().expected_items == 20  # 10 x 5 posts, a page of 20
    assert FeedProbeParams(follows=21).problems()  # more than the authors
    assert FeedProbeParams(limit=101).problems() and FeedProbeParams(run_tag="A-b").problems()
    assert FeedProbeParams(readers=2, rate=1000).warnings()  # 500/s on one connection
    # Each reader follows distinct authors, and the authors share the followers evenly.
    p = FeedProbeParams(readers=10, authors=5, follows=3)
    assert all(len(set(followed(i, p))) == 3 for i in range(10))
    counts = [sum(a in followed(i, p) for i in range(10)) for a in range(5)]
    assert counts == [6] * 5


# --- whole runs against the gateway app -------------------------------------------------------


class FlakyFeeds(MemoryFeedStore):
    """Every third page read is `unavailable` (Redis down for it)."""

    reads = 0

    async def page(self, user: str, limit: int, before: Cursor | None) -> FeedPage:
        self.reads += 1
        if self.reads % 3 == 0:
            raise unavailable("flaky feed store")
        return await super().page(user, limit, before)


class StallingFeeds(MemoryFeedStore):
    """Every 20th page read takes 0.6 s (a stalled Redis)."""

    reads = 0

    async def page(self, user: str, limit: int, before: Cursor | None) -> FeedPage:
        self.reads += 1
        if self.reads % 20 == 0:
            await asyncio.sleep(0.6)
        return await super().page(user, limit, before)


@contextlib.asynccontextmanager
async def gateway(feeds: MemoryFeedStore | None = None) -> AsyncIterator[tuple[str, MemoryFeedStore]]:
    """The real gateway app with in-memory backends and one FeedShard, on a free port."""
    cfg = load_config({"PEERNET_DEV_TOKENS": "1",
                       "PEERNET_TOKEN_SECRET": "feed-probe-test-secret-of-at-least-32-bytes",
                       "PEERNET_EVENTS_PARTITIONS": "2", "PEERNET_INBOX_PARTITIONS": "2",
                       "PEERNET_RATE_PER_S": "10000", "PEERNET_RATE_BURST": "10000"})
    log, pubsub = MemoryEventLog(), MemoryPubSub()
    store = feeds or MemoryFeedStore(cap=cfg.feeds.cap)
    store.pubsub = pubsub  # the shard's feed pushes reach the readers, who must ignore them
    shard = FeedShard(0, 1, cfg, log, store)

    async def start() -> None:
        await log.start()
        await log.ensure_topics(peernet_topics(cfg))
        await pubsub.start()
        await shard.start()

    async def stop() -> None:
        await shard.stop()
        await pubsub.stop()
        await log.stop()

    class NoPresenceShards:
        count = 1

        async def update(self, *args: Any) -> None:
            return None

        async def sync(self, *args: Any) -> None:
            return None

    inbox = MemoryInboxCache(retention_items=cfg.shards.inbox_retention_items,
                             retention_ms=cfg.shards.inbox_retention_ms)
    deps = GatewayDeps(cfg=cfg, log=log, cache=MemoryCache(), inbox=inbox, pubsub=pubsub,
                       store=MemoryDocumentStore(), presence=MemoryPresenceStore(),
                       presence_shards=NoPresenceShards(), replica="probe-test", feeds=store,
                       on_startup=[start], on_shutdown=[stop])
    async with serve_asgi(build_app(deps)) as url:
        yield url, store


SMALL = dict(readers=4, authors=3, follows=2, posts=3, rate=150.0, duration=0.5, warmup=0.2,
             timeout=3.0, settle_timeout=5.0)


async def run(url: str, tmp_path: Path, **kw: Any) -> tuple[int, dict[str, Any], str, str]:
    params = FeedProbeParams(url=url, **{**SMALL, **kw})
    out, log = io.StringIO(), io.StringIO()
    code = await run_cli(params, tmp_path, ["--url", url], stdout=out, log=log, progress_every=0.5)
    return code, the_results(tmp_path), out.getvalue(), log.getvalue()


def the_results(base: Path) -> dict[str, Any]:
    (path,) = base.glob("*-feed/results.json")
    return dict(json.loads(path.read_text()))


@pytest.mark.parametrize("via", ["ws", "http"])
async def test_a_run_against_the_gateway_answers_every_read(tmp_path: Path, via: str) -> None:
    async with gateway() as (url, _):
        code, result, out, log = await run(url, tmp_path, via=via, http_client="aiohttp")
    reads = result["reads"]
    assert code == 0, log
    assert reads["measured"] == 75 and reads["answered"] == 75 and reads["errors"] == 0
    assert reads["warmup"] == {"reads": 30, "answered": 30, "errors": 0, "errors_by_reason": {}}
    assert result["latency_ms"]["count"] == 75
    # Each feed has its followees' posts: 2 authors x 3 posts.
    assert result["setup"]["first_page_items_min"] == 6 and result["setup"]["readers_short"] == 0
    assert reads["items_per_page_mean"] == 6 and reads["empty_pages"] == 0
    assert 0 < result["achieved_rate"] <= 150
    assert result["command"][:3] == ["python", "-m", "bench.feed_probe"]
    assert result["versions"]["git_commit"] is not None
    assert result["generator_cpu_percent"] > 0
    assert out.count("\n") == 1 and out.startswith(f"| {via} | 4 | 150 |")
    assert "feed probe" in log and "| via |" in log


@pytest.mark.parametrize("via,client,rate,reason", [("ws", "json", 150, "unavailable"),
                                                    ("http", "httpx", 60, "http_503")])
async def test_failed_reads_are_counted_and_fail_the_run(tmp_path: Path, via: str, client: str,
                                                         rate: float, reason: str) -> None:
    """Over JSON frames (ws) and through httpx (http), the options the other test leaves out."""
    kw: dict[str, Any] = {"json_frames": True} if client == "json" else {"http_client": client}
    async with gateway(FlakyFeeds(cap=800)) as (url, _):
        code, result, _, log = await run(url, tmp_path, via=via, rate=rate, **kw)
    reads = result["reads"]
    measured = round(rate * SMALL["duration"])
    assert code == 1 and "FAILED" in log
    assert reads["answered"] + reads["errors"] == reads["measured"] == measured
    assert set(reads["errors_by_reason"]) == {reason}
    assert abs(reads["errors"] - measured / 3) <= 3  # every third page read fails
    assert result["latency_ms"]["count"] == reads["answered"]


async def test_reads_without_a_reply_in_time_are_counted_as_timeouts(tmp_path: Path) -> None:
    async with gateway(StallingFeeds(cap=800)) as (url, _):
        code, result, _, _ = await run(url, tmp_path, timeout=0.25)
    reads = result["reads"]
    assert code == 1
    assert reads["answered"] + reads["errors"] == reads["measured"] == 75
    assert set(reads["errors_by_reason"]) == {"timeout"}
    assert reads["late_replies"] > 0  # the stalled replies came after their reads timed out
    assert reads["unconcluded"] == 0


def test_bad_parameters_exit_2() -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--authors", "3", "--follows", "4"])
    assert exit_.value.code == 2


async def test_an_unreachable_server_fails_the_setup(tmp_path: Path) -> None:
    params = FeedProbeParams(url="http://127.0.0.1:9", **{**SMALL, "timeout": 1.0})
    log = io.StringIO()
    assert await run_cli(params, tmp_path, [], stdout=io.StringIO(), log=log) == 1
    assert "setup failed" in log.getvalue() and not any_files(tmp_path)


def any_files(base: Path) -> bool:
    return any(base.iterdir())
