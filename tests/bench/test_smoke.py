"""CI smoke run of each scenario against the real stack (<= 30 s each). It asserts that nothing
acknowledged is lost or reordered and nothing fails, never a timing: CI machines are too noisy
for that.

The PeerNet URL comes from the `peernet_url` fixture (tests/conftest.py). To check the harness
against the Socket.IO baseline instead (dm only), which the harness starts itself:
    PEERNET_BENCH_SMOKE_TARGET=socketio pytest -m ray tests/bench/test_smoke.py
The results of each run are written to test-artifacts/bench-smoke/<scenario>/ for inspection.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bench.params import BenchParams
from bench.report import build_report, write_results
from bench.runner import run_bench

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "bench-smoke"

# Small and slow enough for any machine: <= 8 s of load, the drain ends as soon as all arrived.
SMOKE = {
    "dm": BenchParams(scenario="dm", clients=40, rate=40, duration=5, warmup=1, drain=10),
    "fanout": BenchParams(scenario="fanout", clients=40, authors=4, followers=10, rate=8, duration=5,
                          warmup=1, drain=10),
    "presence": BenchParams(scenario="presence", clients=40, churners=10, watch=5, rate=5, duration=6,
                            warmup=1, drain=10),
    "mixed": BenchParams(scenario="mixed", clients=60, rate=30, duration=6, warmup=1, drain=10,
                         mix={"dm": 0.6, "fanout": 0.2, "presence": 0.2}),
    # Three groups of 10 made with group_create, over two load processes (each group spans both).
    "group": BenchParams(scenario="group", clients=30, group_size=10, rate=20, duration=5, warmup=1,
                         drain=10, procs=2),
}


@pytest.mark.ray
@pytest.mark.parametrize("scenario", sorted(SMOKE))
async def test_scenario_loses_nothing(scenario: str, bench_target: tuple[str, str | None]) -> None:
    target, url = bench_target
    if target == "socketio" and scenario != "dm":
        pytest.skip("the Socket.IO baseline implements dm only")
    params = SMOKE[scenario].with_(target=target)
    if url is not None:
        params = params.with_(urls=(url,))
    run = await run_bench(params)
    report = build_report(run, ["pytest", "test_smoke", scenario])
    await asyncio.to_thread(write_results, report, ARTIFACTS / f"{target}-{scenario}", plots=False)

    (result,) = run.targets
    assert not result.error, result.error
    (phase,) = result.phases
    c = phase.accounting.total
    assert c.acked > 0, "nothing was acknowledged"
    assert c.failed == 0, phase.accounting.failed_reasons
    assert c.lost == 0, f"{c.lost} of {c.expected} deliveries lost, e.g. {phase.accounting.lost_sample}"
    assert c.delivered == c.expected
    # Without faults, nothing is retried: each recipient gets a sender's actions in the order
    # they were sent, and both sides of a conversation see it in one order.
    assert (c.reordered, c.order_mismatch) == (0, 0), phase.accounting.by_kind
    assert phase.inbox_gaps == 0
    if scenario == "group":
        # Every acknowledged message was owed to all 10 members of its group, and all got it.
        g = phase.accounting.by_kind["group"]
        assert g.expected == 10 * g.acked == g.delivered
        assert phase.accounting.hist("group_last").count > 0
