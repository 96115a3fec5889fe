"""Report generation from a synthetic two-target run: losses lead, ratios are computed, the
JSON holds every figure, the plots are written."""

from __future__ import annotations

import json
from pathlib import Path

from pytest import approx

from bench.latency import LatencyHistogram
from bench.ledger import Acked, Receipt, account
from bench.params import BenchParams
from bench.report import DURABILITY, build_report, render_markdown, write_results
from bench.runner import BenchRun, PhaseOutcome, TargetResult

MS = 1000


def phase(rate: float, latency_ms: int, lose: int = 0) -> PhaseOutcome:
    acked = [Acked(k, "dm", "dm:a:b", 0, (0, 1), k * MS, k * MS + 1, False) for k in range(100)]
    receipts = [Receipt(k, "dm", r, k * MS + latency_ms * MS) for k in range(100) for r in (0, 1)
                if not (r == 1 and k < lose)]
    acc = account(acked, [], receipts)
    o = PhaseOutcome(phase=0, rate=rate, seconds=10.0, started_us=0, ended_us=1, accounting=acc,
                     send_lag=LatencyHistogram(), sent=100, late=0, foreign=0, stray=0,
                     unexplained_presence=0, inbox_gaps=0, conn_stats={"reconnects": 0},
                     server={"samples": 0})
    o.headline_p99_ms = acc.hist("dm").percentile_ms(99)
    o.held = lose == 0 and o.headline_p99_ms <= 100
    o.verdict = "held" if o.held else "no"
    return o


def two_target_run() -> BenchRun:
    params = BenchParams(find_max=True, rate=100, step_factor=2)
    peer = TargetResult("peernet", ["http://127.0.0.1:8000"], connections=100,
                        phases=[phase(100, 10), phase(200, 20), phase(400, 150)])
    base = TargetResult("socketio", ["http://127.0.0.1:8101"], connections=100,
                        phases=[phase(100, 5), phase(200, 40, lose=3)])
    return BenchRun(params, "tag", "socketio", [peer, base], 1_700_000_000.0, 1_700_000_060.0)


def test_report_leads_with_losses_and_compares() -> None:
    report = build_report(two_target_run(), ["peernet", "bench", "dm", "--vs", "socketio"])
    json.dumps(report)  # every figure is plain JSON
    assert report["losses"] == {"lost": 3, "acknowledged_deliveries": 1000,
                                "by_target": {"peernet": 0, "socketio": 3}}
    comp = report["comparison"]
    assert comp["max_rate"] == {"peernet": 200.0, "socketio": 100.0, "ratio": 2.0}
    eq = comp["equal_load"]
    assert eq["rate"] == 100.0 and eq["both_held"]
    assert eq["p50_ratio"] == approx(2.0, rel=1e-2)
    assert comp["durability"] == DURABILITY
    md = render_markdown(report)
    first_bold = next(line for line in md.splitlines() if line.startswith("**"))
    assert first_bold.startswith("**LOSSES: 3 lost of 1,000 acknowledged deliveries**")
    assert "ratio **2.00**" in md
    assert "Kafka" in md and "nothing is stored" in md


def test_phase_figures_in_json() -> None:
    report = build_report(two_target_run(), ["x"])
    ph = report["targets"][0]["phases"][0]
    assert ph["accounting"]["latency_ms"]["dm"]["p50"] == approx(10.0, rel=1e-3)
    assert ph["headline_kinds"] == ["dm"]
    assert LatencyHistogram.decode(ph["histograms"]["dm"]).count == 100
    assert ph["cdf_ms"]["dm"][-1][1] == 100.0
    assert report["targets"][0]["max_held_rate"] == 200.0
    assert report["versions"]["websockets"]
    assert report["rates"][:3] == [100.0, 200.0, 400.0]


def test_write_results(tmp_path: Path) -> None:
    report = build_report(two_target_run(), ["x"])
    files = write_results(report, tmp_path)
    assert files == ["results.json", "summary.md", "latency_cdf.png", "percentiles_vs_rate.png"]
    for name in files:
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["run_tag"] == "tag"


def test_cpu_cost_is_each_category_per_action_with_the_load_generator_apart() -> None:
    from bench.report import cpu_cost, cpu_line

    server = {"by_category": {
        "kafka": {"cpu_mean_pct": 30.0}, "ray:worker:Gateway": {"cpu_mean_pct": 50.0},
        "load_generator": {"cpu_mean_pct": 20.0}}}
    cost = cpu_cost(server, 500.0)
    # 80% of a core for 500 actions a second: 1.6 ms of CPU each; the generator's 20%: 0.4 ms.
    assert cost["server_ms"] == 1.6
    assert cost["load_generator_ms"] == 0.4
    assert cost["total_ms"] == 2.0
    assert list(cost["by_category_ms"]) == ["ray:worker:Gateway", "kafka"]
    line = cpu_line({"rate_target": 500.0, "cpu_per_action": cost}, "DM")
    assert line.startswith("CPU per DM at 500/s: **server 1.600 ms**")
    assert cpu_cost({}, 500.0) == {} and cpu_cost(server, 0.0) == {}


def test_a_group_summary_leads_with_cpu_per_message_and_deliveries_per_second() -> None:
    members = tuple(range(10))
    acked = [Acked(k, "group", "group:g0", 0, members, k * MS, k * MS + 1, False) for k in range(50)]
    receipts = [Receipt(k, "group", m, k * MS + (5 + m) * MS) for k in range(50) for m in members]
    o = PhaseOutcome(phase=0, rate=5.0, seconds=10.0, started_us=0, ended_us=1,
                     accounting=account(acked, [], receipts), send_lag=LatencyHistogram(), sent=50,
                     late=0, foreign=0, stray=0, unexplained_presence=0, inbox_gaps=0,
                     conn_stats={}, server={"kafka_lag_peak": {}, "by_category": {
                         name: {"cpu_mean_pct": pct, "cpu_peak_pct": pct, "processes": 1, "rss_peak_mib": 1}
                         for name, pct in (("kafka", 10.0), ("load_generator", 5.0))}})
    run = BenchRun(BenchParams(scenario="group", group_size=10, rate=5.0), "tag", None,
                   [TargetResult("peernet", ["u"], phases=[o])], 0.0, 1.0)
    report = build_report(run, ["x"])
    ph = report["targets"][0]["phases"][0]
    # 50 messages over 10 s to 10 members each: 50 deliveries a second; 10% of a core is 100 ms
    # of CPU a second, over 5 messages a second 20 ms each.
    assert ph["delivered_rate"] == 50.0
    assert ph["cpu_per_action"]["server_ms"] == 20.0
    lines = render_markdown(report).splitlines()
    assert lines[2].startswith("**No losses: 0 lost of 500 acknowledged deliveries**")
    assert lines[4].startswith("- peernet: CPU per group message at 5/s: **server 20.000 ms**")
    assert lines[4].endswith("**50.0 deliveries/s** (every member's copy, the sender's own included)")
    rows = [line for line in lines if line.startswith("| 5 |")]
    assert [r.split(" | ")[6] for r in rows] == ["group delivery", "group, to its last member"]
    # p99 to the last member: member 9's copy, 14 ms after the schedule (HdrHistogram's precision)
    assert float(rows[1].split(" | ")[9]) == approx(14.0, rel=1e-3)
