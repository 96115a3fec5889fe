"""The Centrifugo peer: its configuration, its CLI wiring, and the harness driving a real
Centrifugo it installed (built with `go install` into .peernet/ on first use: minutes on a
fresh machine, then cached) and started itself, as two nodes on the stack's Redis."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
from bench_fake_peernet import serve_fake

from bench.__main__ import main
from bench.baseline_socketio import redis_reachable
from bench.centrifugo import (
    HISTORY_SIZE,
    CentrifugoCluster,
    NodeSettings,
    binary_path,
    feed_channel,
    inbox_channel,
    node_config,
)
from bench.centrifugo_client import CentrifugoTarget
from bench.client import ConnStats, Frame
from bench.params import BenchParams, ParamError
from bench.plan import parse_body
from bench.runner import run_bench

# Long enough for a first build on a slow CI machine (compiling ~200 modules), then seconds.
INSTALL_TIMEOUT_S = 1800


def test_each_user_has_a_personal_channel_with_history_and_forced_recovery() -> None:
    cfg = node_config(NodeSettings(8300, "redis://127.0.0.1:6379/2", "pfx", "s3cret"))
    assert cfg["http_server"] == {"address": "127.0.0.1", "port": 8300}
    assert cfg["client"]["token"]["hmac_secret_key"] == "s3cret"
    redis = cfg["engine"]["redis"]
    assert cfg["engine"]["type"] == "redis"
    assert (redis["address"], redis["db"], redis["prefix"]) == (["redis://127.0.0.1:6379"], 2, "pfx")
    spaces = {ns["name"]: ns for ns in cfg["channel"]["namespaces"]}
    assert set(spaces) == {"inbox", "feed"}
    for ns in spaces.values():
        assert ns["history_size"] >= 10_000 and ns["history_ttl"] == "168h"
        assert ns["force_recovery"] and ns["allow_publish_for_client"]
    assert spaces["inbox"]["allow_user_limited_channels"]  # only the owner may subscribe
    assert spaces["feed"]["allow_subscribe_for_client"]
    assert cfg["client"]["recovery_max_publication_limit"] == HISTORY_SIZE
    assert inbox_channel("bx_1") == "inbox:#bx_1" and feed_channel("bx_1") == "feed:bx_1"


def test_centrifugo_implements_dm_and_fanout() -> None:
    for scenario in ("dm", "fanout"):
        BenchParams(scenario=scenario, target="centrifugo").validate()
    with pytest.raises(ParamError, match="centrifugo"):
        BenchParams(scenario="presence", target="centrifugo").validate()


def test_vs_centrifugo_refuses_presence(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["presence", "--vs", "centrifugo", "--quiet"]) == 2
    assert "--vs centrifugo compares the dm and fanout" in capsys.readouterr().err


@pytest.fixture(scope="module")
def redis_url(request: pytest.FixtureRequest) -> str:
    """The stack's Redis; brought up by the shared `local_stack` fixture when it is not running."""
    from peernet.config import load_config

    url = load_config().services.redis_url
    if not redis_reachable(url):
        request.getfixturevalue("local_stack")
    return url


@pytest.fixture
async def cluster(redis_url: str) -> AsyncIterator[CentrifugoCluster]:
    c = CentrifugoCluster(redis_url=redis_url, say=print)
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


@pytest.mark.stack
@pytest.mark.timeout(INSTALL_TIMEOUT_S)
@pytest.mark.usefixtures("quick_phases")
async def test_dms_through_real_centrifugo_lose_nothing(redis_url: str) -> None:
    # 60 DMs/s for 6 s: 360 DMs, each owed to its recipient's and its sender's personal channel.
    params = BenchParams(scenario="dm", target="centrifugo", clients=40, rate=60, duration=5, warmup=1,
                         drain=10, bound_ms=60_000)
    run = await run_bench(params, redis_url=redis_url)
    (result,) = run.targets
    assert not result.error, result.error
    (phase,) = result.phases
    c = phase.accounting.total
    assert c.acked == 360 and c.expected == 720
    assert (c.lost, c.failed, c.unacked_delivered) == (0, 0, 0), phase.accounting.failed_reasons
    assert c.delivered == c.expected
    assert phase.inbox_gaps == 0
    assert result.connections == 40
    assert {p["category"] for p in result.processes} >= {"centrifugo", "redis"}
    assert phase.server["by_category"]["centrifugo"]["processes"] == 2
    # The nodes are gone and their history removed from the stack's Redis.
    for p in result.processes:
        if p["category"] == "centrifugo":
            assert not psutil.pid_exists(p["pid"]) or psutil.Process(p["pid"]).status() == "zombie"
    assert binary_path().is_file()


@pytest.mark.stack
@pytest.mark.timeout(INSTALL_TIMEOUT_S)
@pytest.mark.usefixtures("quick_phases")
async def test_posts_reach_every_follower(redis_url: str) -> None:
    params = BenchParams(scenario="fanout", target="centrifugo", clients=30, authors=3, followers=8,
                         rate=10, duration=3, warmup=1, drain=10, bound_ms=60_000)
    run = await run_bench(params, redis_url=redis_url)
    (result,) = run.targets
    assert not result.error, result.error
    c = result.phases[0].accounting.total
    assert c.acked == 40 and c.expected == 40 * 9  # the author and its 8 followers
    assert (c.lost, c.failed) == (0, 0)
    assert c.delivered == c.expected


@pytest.mark.stack
@pytest.mark.timeout(INSTALL_TIMEOUT_S)
async def test_a_reconnecting_user_recovers_what_it_missed(cluster: CentrifugoCluster) -> None:
    target = CentrifugoTarget(cluster.urls, secret=cluster.secret)
    await target.prepare([(0, "crec_a"), (1, "crec_b")])
    got: list[tuple[int, Frame]] = []
    stats = ConnStats()
    a = target.connection(0, "crec_a", lambda i, f, _: got.append((i, f)), stats)
    b = target.connection(1, "crec_b", lambda i, f, _: got.append((i, f)), stats)
    await a.open()
    await b.open()
    try:
        await a.request({"t": "dm", "to": "crec_b", "body": "r.0.0.0.live"}, idempotent=True)
        await b.close()
        for k in range(1, 6):
            await a.request({"t": "dm", "to": "crec_b", "body": f"r.0.{k}.0.missed"}, idempotent=True)
        await b.open()  # resubscribes with recover from the last offset it saw
        await asyncio.sleep(0.5)
        to_b = [parse_body(f["body"]) for i, f in got if i == 1 and f.get("t") == "msg"]
        assert [t.k for t in to_b if t is not None] == [0, 1, 2, 3, 4, 5]
        assert (stats.resumes, stats.resumes_incomplete) == (1, 0)
        assert b.inbox_gaps() == 0
    finally:
        await a.close()
        await b.close()


@pytest.mark.stack
@pytest.mark.timeout(INSTALL_TIMEOUT_S)
async def test_stop_removes_the_runs_keys_and_nothing_else(redis_url: str) -> None:
    import redis.asyncio as aioredis

    r = aioredis.from_url(redis_url)
    other = "peernet-bench-test-not-centrifugo"
    await r.set(other, "1", ex=60)
    try:
        async with CentrifugoCluster(redis_url=redis_url, say=print) as c:
            target = CentrifugoTarget(c.urls, secret=c.secret)
            await target.prepare([(0, "ckeys_a"), (1, "ckeys_b")])
            a = target.connection(0, "ckeys_a", lambda *_: None, ConnStats())
            await a.open()
            await a.request({"t": "dm", "to": "ckeys_b", "body": "x"}, idempotent=True)
            await a.close()
            assert [k async for k in r.scan_iter(match=f"{c.prefix}*")], "history went to Redis"
        assert not [k async for k in r.scan_iter(match=f"{c.prefix}*")]
        assert await r.get(other) == b"1"
    finally:
        await r.delete(other)
        await r.aclose()


@pytest.mark.stack
@pytest.mark.timeout(INSTALL_TIMEOUT_S)
async def test_vs_centrifugo_runs_both_and_writes_the_comparison(redis_url: str, tmp_path: Path) -> None:
    # The fake PeerNet stands in for the real one (this checks the wiring, not PeerNet); the
    # Centrifugo side is real.
    async with serve_fake() as (_, url):
        code = await asyncio.to_thread(main, [
            "fanout", "--vs", "centrifugo", "--url", url, "--clients", "20", "--followers", "5",
            "--rate", "10", "--duration", "1.5", "--warmup", "0.5", "--drain", "5", "--bound-ms", "60000",
            "--redis-url", redis_url, "--out", str(tmp_path), "--no-plots", "--quiet"])
    assert code == 0
    (outdir,) = await asyncio.to_thread(lambda: list(tmp_path.iterdir()))
    report = json.loads((outdir / "results.json").read_text())
    assert [t["name"] for t in report["targets"]] == ["peernet", "centrifugo"]
    assert all(not t["error"] and t["lost"] == 0 for t in report["targets"])
    assert "Centrifugo acknowledges a publication once the Redis engine" in report["comparison"]["durability"]
    assert "token_secret" not in report["params"]
    assert "## peernet against centrifugo" in (outdir / "summary.md").read_text()
