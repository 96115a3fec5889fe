"""What every fault test asserts of a `bench --chaos` run (tests/bench/test_chaos.py, one fault
per test on one node; tests/e2e/test_multinode.py, a worker node killed)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bench.client import DISCONNECTED
from bench.params import BenchParams
from bench.report import build_report, write_results
from bench.runner import BenchRun, PhaseOutcome, run_bench


async def run_fault(params: BenchParams, artifacts: Path, name: str,
                    log_tail: str = "") -> tuple[BenchRun, PhaseOutcome]:
    """Run the one-fault chaos `params`, write its results to `artifacts`, and assert the fault
    passed: injected, something acknowledged, nothing lost, every delivery made, no request
    unanswered, recovered inside the phase, no inbox gap."""
    run = await run_bench(params)
    report = build_report(run, ["pytest", name])
    await asyncio.to_thread(write_results, report, artifacts, plots=False)
    (result,) = run.targets
    assert not result.error, result.error
    (phase,) = result.phases
    assert phase.fault is not None
    f = phase.fault
    assert not f.event.error, f"{f.event.error}\n{log_tail}"
    assert f.acknowledged > 0, "nothing was acknowledged"
    assert f.lost == 0, f"{f.lost} of {f.expected} deliveries lost, e.g. {phase.accounting.lost_sample}"
    assert f.delivered == f.expected
    seen = (f"fault: {f.event.detail}; clients: reconnects {phase.conn_stats.get('reconnects')}, "
            f"errors {phase.conn_stats.get('errors')}, close codes {phase.conn_stats.get('close_codes')}")
    assert f.failed.get("timeout", 0) == 0, f"requests never answered: {f.failed}; {seen}"
    assert f.failed.get(DISCONNECTED, 0) == 0, f"server unreachable until timeout: {f.failed}; {seen}"
    assert f.recovery_s is not None, f"delivery was still disturbed when the phase ended; {seen}"
    assert f.ok, f.verdict
    assert phase.inbox_gaps == 0
    return run, phase
