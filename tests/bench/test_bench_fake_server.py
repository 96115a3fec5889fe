"""The harness end to end against a fake in-memory PeerNet on localhost: every scenario accounts
exactly, and injected faults (dropped and doubled deliveries, kicked connections) are noticed.
These prove the harness, not PeerNet."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from bench_fake_peernet import Faults, serve_fake

from bench.__main__ import main
from bench.client import ConnStats
from bench.params import BenchParams
from bench.peernet_client import PeerNetTarget
from bench.runner import PhaseOutcome, run_bench

pytestmark = pytest.mark.usefixtures("quick_phases")

# A p99 bound no machine misses: these tests judge correctness, never timing.
QUICK = BenchParams(clients=20, rate=80, duration=1.5, warmup=0.5, drain=3.0, seed=7, bound_ms=60_000)


async def one_phase(params: BenchParams) -> PhaseOutcome:
    run = await run_bench(params)
    (target,) = run.targets
    assert not target.error, target.error
    (phase,) = target.phases
    return phase


@pytest.mark.parametrize("scenario, extra", [
    ("dm", {}),
    ("dm", {"group_size": 4, "procs": 2}),
    ("fanout", {"followers": 5, "rate": 20}),
    ("presence", {"churners": 10, "watch": 4, "rate": 8, "duration": 2.5}),
    ("mixed", {"clients": 40, "rate": 40, "duration": 2.5}),
    ("group", {"group_size": 7}),
    # Each group spans both processes: one makes it, the other learns it from the members' note.
    ("group", {"group_size": 10, "procs": 2}),
])
async def test_every_scenario_accounts_exactly(scenario: str, extra: dict[str, object]) -> None:
    async with serve_fake() as (_, url):
        phase = await one_phase(QUICK.with_(scenario=scenario, urls=(url,), **extra))
    c = phase.accounting.total
    assert c.acked > 0
    assert (c.lost, c.failed, c.duplicated, c.unexpected, c.unacked_delivered) == (0, 0, 0, 0, 0)
    assert c.delivered == c.expected
    assert phase.inbox_gaps == 0
    assert phase.unexplained_presence == 0
    assert phase.held


async def test_dm_delivery_counts() -> None:
    async with serve_fake() as (_, url):
        phase = await one_phase(QUICK.with_(urls=(url,)))
    dm = phase.accounting.by_kind["dm"]
    # 80/s for 2 s: 160 DMs, each owed to its recipient and to its sender's own inbox.
    assert dm.acked == 160
    assert dm.expected == dm.delivered == 320
    # Warm-up (the first 0.5 s) is accounted but not timed.
    assert phase.accounting.hist("dm").count == 120
    assert phase.accounting.hist("dm_echo").count == 120
    assert phase.accounting.hist("dm_ack").count == 120


async def test_group_message_delivery_counts() -> None:
    async with serve_fake() as (fake, url):
        phase = await one_phase(QUICK.with_(scenario="group", group_size=5, urls=(url,)))
    assert len(fake.groups) == 4  # 20 clients in groups of 5, each made once
    g = phase.accounting.by_kind["group"]
    # 80/s for 2 s: 160 messages, each owed to the 5 members of its group (its sender too).
    assert g.acked == 160
    assert g.expected == g.delivered == 800
    # Warm-up (the first 0.5 s) is accounted but not timed: 120 messages timed, to 4 others each.
    assert phase.accounting.hist("group").count == 480
    assert phase.accounting.hist("group_echo").count == 120
    assert phase.accounting.hist("group_last").count == 120


async def test_dropped_group_deliveries_are_lost_per_member() -> None:
    async with serve_fake(Faults(drop_every=25)) as (_, url):
        phase = await one_phase(QUICK.with_(scenario="group", group_size=5, urls=(url,)))
    g = phase.accounting.by_kind["group"]
    assert g.lost == g.expected // 25 == 32
    assert g.delivered + g.lost == g.expected
    assert not phase.held and phase.verdict.startswith("32 lost")


async def test_a_member_connecting_after_its_group_was_made_learns_it_from_its_inbox() -> None:
    async with serve_fake() as (_, url):
        target = PeerNetTarget([url], replay_inbox=True)
        await target.prepare([(0, "owner"), (1, "late")])
        owner = target.connection(0, "owner", lambda *_: None, ConnStats())
        await owner.open()
        ok = await owner.request({"t": "group_create", "title": "t", "members": ["late"], "cid": "c"},
                                 idempotent=True)
        frames: list[dict[str, object]] = []
        stats = ConnStats()
        late = target.connection(1, "late", lambda _i, f, _t: frames.append(f), stats)
        await late.open()
        for _ in range(100):
            if any(f["t"] == "resumed" for f in frames):
                break
            await asyncio.sleep(0.02)
        await asyncio.gather(owner.close(), late.close())
    notes = [f for f in frames if f["t"] == "note"]
    assert [(n["kind"], n["conv"]) for n in notes] == [("group", ok["conv"])]
    assert late.inbox_gaps() == 0 and late.last_seq == 1
    assert stats.resumes == 0  # a first connection's replay is not a resume after a cut


async def test_dropped_deliveries_are_lost() -> None:
    async with serve_fake(Faults(drop_every=25)) as (_, url):
        phase = await one_phase(QUICK.with_(urls=(url,)))
    c = phase.accounting.total
    assert c.lost == c.expected // 25 == 12
    assert c.delivered + c.lost == c.expected
    assert phase.inbox_gaps == 0  # the fake drops before numbering, so seqs stay contiguous
    assert not phase.held and phase.verdict.startswith("12 lost")
    assert phase.accounting.lost_sample


async def test_doubled_deliveries_are_duplicates_not_losses() -> None:
    async with serve_fake(Faults(dup_every=10)) as (_, url):
        phase = await one_phase(QUICK.with_(urls=(url,)))
    c = phase.accounting.total
    assert c.lost == 0
    assert c.duplicated == c.extra_copies == 32
    assert c.delivered == c.expected


async def test_kicked_connections_resume_and_lose_nothing() -> None:
    async with serve_fake(Faults(kick_every=20)) as (_, url):
        phase = await one_phase(QUICK.with_(urls=(url,)))
    c = phase.accounting.total
    assert phase.conn_stats["reconnects"] >= 5
    assert phase.conn_stats["resent"] >= 5
    assert phase.conn_stats["resumes"] == phase.conn_stats["reconnects"]
    assert (c.lost, c.failed, c.duplicated) == (0, 0, 0)
    assert phase.inbox_gaps == 0


async def test_unreachable_target_is_an_error_not_a_hang() -> None:
    run = await run_bench(QUICK.with_(urls=("http://127.0.0.1:9",)))
    assert run.targets[0].error and not run.targets[0].phases


async def test_cli_writes_results(tmp_path: Path) -> None:
    async with serve_fake() as (_, url):
        code = await asyncio.to_thread(main, [
            "dm", "--url", url, "--clients", "10", "--rate", "40", "--duration", "1", "--warmup", "0.5",
            "--drain", "2", "--find-max", "--max-steps", "2", "--bound-ms", "60000",
            "--out", str(tmp_path), "--quiet"])
    assert code == 0
    (outdir,) = await asyncio.to_thread(lambda: list(tmp_path.iterdir()))
    names = {p.name for p in outdir.iterdir()}
    assert {"results.json", "summary.md", "latency_cdf.png", "percentiles_vs_rate.png"} <= names
    report = json.loads((outdir / "results.json").read_text())
    assert [ph["rate_target"] for ph in report["targets"][0]["phases"]] == [40.0, 60.0]
    assert report["losses"]["lost"] == 0
    lag = report["targets"][0]["phases"][0]["server"]["kafka_lag_peak"]
    assert lag == {"peernet_consumer_lag": 3.0}
    assert (outdir / "summary.md").read_text().splitlines()[2].startswith("**No losses: 0 lost")
