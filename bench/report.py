"""The results of a run: one JSON document with every figure, the exact parameters and the
versions; a Markdown summary that leads with losses; PNG plots (latency by percentile, and
latency percentiles against rate for --find-max).

One module, a little over 600 lines: the three are views of the same figures and share their
formatting helpers, and the summary's sections follow one another in the order they print."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench import __version__
from bench.probe import LOAD_GENERATOR
from bench.runner import GENERATOR_LAG_MS, SCENARIO_KINDS, BenchRun, PhaseOutcome, TargetResult, rate_ladder

SCHEMA = 1
PEERNET_DURABILITY = (
    "PeerNet acknowledges a DM only once it is durable in Kafka (written with acks from all "
    "in-sync replicas) and delivers at least once, replaying from the inbox after a reconnect."
)
# What each peer's acknowledgement means, written beside its figures.
PEER_DURABILITY = {
    "socketio": (
        "The Socket.IO baseline acknowledges after handing the message to Redis pub/sub: nothing is "
        "stored, and a message whose recipient is disconnected, or a server that restarts, loses it."
    ),
    "centrifugo": (
        "Centrifugo acknowledges a publication once the Redis engine has appended it to the channel's "
        "history stream and published it, in Redis memory: no disk write is awaited (Redis persists "
        "on its own schedule, e.g. an AOF fsync every second), and history lives for the configured "
        "size and TTL. A client that reconnects recovers what it missed from that history."
    ),
}


def durability(peer: str) -> str:
    """PeerNet's guarantee beside the peer's, for a comparison's summary."""
    return (f"{PEERNET_DURABILITY} {PEER_DURABILITY.get(peer, '')} The two paths do not give the same "
            "guarantee; the ratios compare cost, not equivalence.")


DURABILITY = durability("socketio")
_PACKAGES = ("websockets", "msgpack", "hdrhistogram", "psutil", "httpx", "matplotlib", "python-socketio",
             "python-engineio", "uvicorn", "uvloop", "redis", "pyjwt", "peernet")


def versions() -> dict[str, Any]:
    from bench.worker import event_loop_name

    out: dict[str, Any] = {"bench": __version__, "python": sys.version.split()[0],
                           "implementation": platform.python_implementation(),
                           "client_event_loop": event_loop_name()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    try:
        root = Path(__file__).resolve().parent.parent
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                           text=True, timeout=5).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "bench"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        out["bench_modified"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def machine() -> dict[str, Any]:
    import psutil

    return {"hostname": socket.gethostname(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "memory_mib": psutil.virtual_memory().total // (1024 * 1024),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


# What one "action" of a scenario is, for CPU per action; fan-out is counted per push (a post's
# delivery to one follower), the unit its cost grows with.
ACTION_UNIT = {"dm": "DM", "fanout": "push", "presence": "presence change", "mixed": "action",
               "connections": "DM", "group": "group message"}


def cpu_cost(server: dict[str, Any], actions_per_s: float) -> dict[str, Any]:
    """CPU per action in ms (summed over the processes of each category, load generator apart):
    each category's mean CPU (% of one core) times 10 over the rate of actions. Empty when the
    phase has no CPU samples or no action was acknowledged."""
    per = server.get("by_category") or {}
    if not per or actions_per_s <= 0:
        return {}
    ms = {c: round(v["cpu_mean_pct"] * 10 / actions_per_s, 3) for c, v in per.items()}
    load = ms.pop(LOAD_GENERATOR, 0.0)
    return {"server_ms": round(sum(ms.values()), 3), "load_generator_ms": load,
            "total_ms": round(sum(ms.values()) + load, 3),
            "by_category_ms": dict(sorted(ms.items(), key=lambda kv: -kv[1]))}


def cpu_line(ph: dict[str, Any], unit: str, *, deliveries: bool = False) -> str:
    """`CPU per DM: server 1.2 ms (kafka 0.3, ...), load generator 0.4 ms, total 1.6 ms`, and with
    `deliveries` the rate of deliveries after it (a group message is one per member)."""
    cost = ph.get("cpu_per_action") or {}
    if not cost:
        return ""
    parts = ", ".join(f"{c} {v:g}" for c, v in cost["by_category_ms"].items() if v >= 0.005)
    line = (f"CPU per {unit} at {ph['rate_target']:g}/s: **server {cost['server_ms']:.3f} ms** "
            f"({parts}), load generator {cost['load_generator_ms']:.3f} ms, "
            f"total {cost['total_ms']:.3f} ms")
    if deliveries:
        line += (f"; **{ph['delivered_rate']:,.1f} deliveries/s** (every member's copy, the "
                 "sender's own included)")
    return line


def phase_dict(o: PhaseOutcome, scenario: str) -> dict[str, Any]:
    acc = o.accounting
    measured_s = max(o.seconds - 0.0, 1e-9)
    return {
        "phase": o.phase,
        "rate_target": o.rate,
        "seconds": o.seconds,
        "held": o.held,
        "verdict": o.verdict,
        "generator_behind": o.generator_behind,
        "headline_kinds": o.headline_kinds(scenario),
        "headline_p99_ms": round(o.headline_p99_ms, 3),
        "sent": o.sent,
        "acked_rate": round(acc.total.acked / measured_s, 1),
        "delivered_rate": round(acc.total.delivered / measured_s, 1),
        "cpu_per_action": cpu_cost(o.server, (acc.total.delivered if scenario == "fanout"
                                              else acc.total.acked) / measured_s),
        "accounting": acc.to_dict(),
        "send_lag_ms": o.send_lag.summary(),
        "late_after_drain": o.late,
        "foreign_frames": o.foreign,
        "frames_between_phases": o.stray,
        "presence_unexplained": o.unexplained_presence,
        "inbox_gaps": o.inbox_gaps,
        "connections": o.conn_stats,
        "server": o.server,
        "fault": o.fault.to_dict() if o.fault is not None else None,
        "histograms": {k: h.encode() for k, h in sorted(acc.latency.items())},
        "cdf_ms": {k: [[round(v, 3), round(p, 5)] for v, p in h.cdf()] for k, h in sorted(acc.latency.items())
                   if not k.endswith("_ack")},
    }


def target_dict(t: TargetResult, scenario: str) -> dict[str, Any]:
    phases = [phase_dict(p, scenario) for p in t.phases]
    lost = sum(p.accounting.total.lost for p in t.phases)
    return {
        "name": t.name,
        "urls": t.urls,
        "error": t.error or None,
        "health": t.health or None,
        "connections": t.connections,
        "setup_s": t.setup_s,
        "memory": t.memory,
        "max_held_rate": t.max_held_rate,
        "lost": lost,
        "phases": phases,
        "processes": t.processes,
        "notes": t.notes,
        "connections_scenario": connections_verdict(t.conns) if t.conns else None,
    }


def connections_verdict(c: dict[str, Any]) -> dict[str, Any]:
    """The `connections` figures with what went wrong: refusals (by the server, or in the load
    generator), connections closed during the hold, storm clients not back or not resumed, and
    DMs acknowledged before the cut not delivered."""
    problems = []
    o = c.get("open", {})
    behind = ""
    if o.get("generator_behind"):
        behind = (f" (load generator behind schedule: connects started up to "
                  f"{o['start_lag_ms']['p99']:,.0f} ms late at p99, so timeouts may be its own)")
    if o.get("refused_by_server"):
        problems.append(f"{o['refused_by_server']:,} connections refused by the server "
                        f"({', '.join(f'{r} {n:,}' for r, n in sorted(o['refused'].items()))})"
                        + behind)
    if o.get("refused_in_load_generator"):
        problems.append(f"{o['refused_in_load_generator']:,} connections failed in the load generator "
                        "(out of files: raise --procs)")
    h = c.get("hold", {})
    if h.get("closed"):
        problems.append(f"{h['closed']:,} closed by the server during the open and hold ({h['codes']})")
    s = c.get("storm")
    if s is not None:
        if not s.get("injected"):
            problems.append("storm: no replica was killed")
        elif s.get("all_resumed_after_s") is None:
            problems.append(f"storm: of {s['cut']:,} cut, {s['back']:,} back and {s['resumed']:,} "
                            "resumed by the end of the phase")
        missing = (s.get("resume") or {}).get("missing", 0)
        if missing:
            problems.append(f"storm: {missing} deliveries of DMs acknowledged before the cut missing")
    return {**c, "ok": not problems, "problems": problems,
            "verdict": "; ".join(problems) if problems else "ok: none refused, none closed"
                       + (", every cut client back with resume" if s else "")}


def _equal_load(a: TargetResult, b: TargetResult) -> tuple[PhaseOutcome, PhaseOutcome] | None:
    """The highest rate both targets ran and both held; else the lowest rate both ran."""
    ra = {p.rate: p for p in a.phases}
    rb = {p.rate: p for p in b.phases}
    common = sorted(set(ra) & set(rb))
    if not common:
        return None
    both = [r for r in common if ra[r].held and rb[r].held]
    r = both[-1] if both else common[0]
    return ra[r], rb[r]


def _ratio(x: float | None, y: float | None) -> float | None:
    if x is None or y is None or y == 0:
        return None
    return round(x / y, 3)


def _side(o: PhaseOutcome, kind: str) -> dict[str, Any]:
    h, c = o.accounting.hist(kind), o.accounting.total
    return {"p50_ms": h.percentile_ms(50), "p99_ms": h.percentile_ms(99), "lost": c.lost,
            "duplicated": c.duplicated, "reordered": c.reordered, "order_mismatch": c.order_mismatch}


def comparison(run: BenchRun) -> dict[str, Any] | None:
    if not run.vs or len(run.targets) < 2:
        return None
    peer, base = run.targets[0], run.targets[1]
    out: dict[str, Any] = {"durability": durability(base.name), "bound_ms": run.params.bound_ms,
                           "target": peer.name, "baseline": base.name}
    if run.params.find_max:
        out["max_rate"] = {peer.name: peer.max_held_rate, base.name: base.max_held_rate,
                           "ratio": _ratio(peer.max_held_rate, base.max_held_rate)}
    else:
        out["max_rate"] = {"note": "run with --find-max to compare the largest rate that holds"}
    pair = _equal_load(peer, base)
    if pair is not None:
        pa, pb = pair
        kind = SCENARIO_KINDS[run.params.scenario][0]
        ha, hb = pa.accounting.hist(kind), pb.accounting.hist(kind)
        out["equal_load"] = {
            "rate": pa.rate,
            "both_held": pa.held and pb.held,
            "kind": kind,
            peer.name: _side(pa, kind),
            base.name: _side(pb, kind),
            "p50_ratio": _ratio(ha.percentile_ms(50), hb.percentile_ms(50)),
            "p99_ratio": _ratio(ha.percentile_ms(99), hb.percentile_ms(99)),
        }
    return out


def build_report(run: BenchRun, argv: list[str]) -> dict[str, Any]:
    targets = [target_dict(t, run.params.scenario) for t in run.targets]
    acked = sum(p.accounting.total.expected for t in run.targets for p in t.phases)
    lost = sum(t["lost"] for t in targets)
    return {
        "schema": SCHEMA,
        "created": dt.datetime.fromtimestamp(run.started, dt.UTC).isoformat(timespec="seconds"),
        "elapsed_s": round(run.ended - run.started, 1),
        "command": argv,
        "run_tag": run.run,
        "params": {k: v for k, v in run.params.to_dict().items() if k != "token_secret"},
        "rates": rate_ladder(run.params),
        "losses": {"lost": lost, "acknowledged_deliveries": acked,
                   "by_target": {t["name"]: t["lost"] for t in targets}},
        "targets": targets,
        "comparison": comparison(run),
        "faults": [ph["fault"] for t in targets for ph in t["phases"] if ph.get("fault")],
        "versions": versions(),
        "machine": machine(),
        "notes": run.notes,
    }


# --- Markdown ---------------------------------------------------------------------------------

def _fmt(x: Any, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


_KIND_TITLE = {"dm": "DM delivery", "post": "feed push", "presence": "presence event",
               "group": "group delivery", "group_last": "group, to its last member"}


def render_markdown(report: dict[str, Any]) -> str:
    p = report["params"]
    lines = [f"# bench: `{p['scenario']}` on {', '.join(t['name'] for t in report['targets'])}", ""]
    lines += _losses_section(report)
    lines += _cpu_lines(report)
    faults = report.get("faults") or []
    if faults:
        lines += _fault_table(faults)
    comp = report.get("comparison")
    if comp:
        lines += _comparison_section(comp)
    for t in report["targets"]:
        lines += _target_section(t, p)
    lines += ["## Parameters", "", "```", " ".join(report["command"]), "```", "",
              "| parameter | value |", "|---|---|"]
    for k, v in p.items():
        lines.append(f"| {k} | {json.dumps(v)} |")
    v = report["versions"]
    lines += ["", "## Versions and machine", "",
              ", ".join(f"{k} {val}" for k, val in v.items() if val is not None), "",
              ", ".join(f"{k} {val}" for k, val in report["machine"].items()), ""]
    return "\n".join(lines)


def _losses_section(report: dict[str, Any]) -> list[str]:
    """The summary's lead: what was lost, then every phase's other accounting faults."""
    losses = report["losses"]
    by_t = ", ".join(f"{n} {_fmt(v)}" for n, v in losses["by_target"].items())
    head = "No losses" if losses["lost"] == 0 else "LOSSES"
    lines = [f"**{head}: {losses['lost']:,} lost of {losses['acknowledged_deliveries']:,} acknowledged "
             f"deliveries** ({by_t}).", ""]
    for t in report["targets"]:
        for ph in t["phases"]:
            c = ph["accounting"]["total"]
            if c["duplicated"] or c["reordered"] or c["order_mismatch"] or c["failed"] or ph["inbox_gaps"]:
                lines.append(f"- {t['name']} at {ph['rate_target']:g}/s: {c['duplicated']} duplicated, "
                             f"{c['reordered']} reordered, {c['order_mismatch']} out of conversation order, "
                             f"{c['failed']} failed actions, {ph['inbox_gaps']} inbox seq gaps")
    if lines[-1] != "":
        lines.append("")
    return lines


def _cpu_lines(report: dict[str, Any]) -> list[str]:
    """CPU per message of every phase, per process and in total."""
    scenario = report["params"]["scenario"]
    unit = ACTION_UNIT.get(scenario, "action")
    lines = [f"- {t['name']}: {line}" for t in report["targets"] for ph in t["phases"]
             if (line := cpu_line(ph, unit, deliveries=scenario == "group"))]
    return [*lines, ""] if lines else []


def _comparison_section(comp: dict[str, Any]) -> list[str]:
    lines = [f"## {comp['target']} against {comp['baseline']}", ""]
    mr = comp["max_rate"]
    if "ratio" in mr:
        lines.append(f"- Largest rate with p99 <= {comp['bound_ms']:g} ms and nothing lost: "
                     f"{comp['target']} {_fmt(mr.get(comp['target']))}/s, {comp['baseline']} "
                     f"{_fmt(mr.get(comp['baseline']))}/s, ratio **{_fmt(mr['ratio'], 2)}**.")
    else:
        lines.append(f"- Largest rate: {mr['note']}.")
    eq = comp.get("equal_load")
    if eq:
        a, b = eq[comp["target"]], eq[comp["baseline"]]
        held = "" if eq["both_held"] else ", not held by both"
        lines.append(
            f"- At equal load ({eq['rate']:g}/s{held}): "
            f"p50 {_fmt(a['p50_ms'], 2)} vs {_fmt(b['p50_ms'], 2)} ms "
            f"(ratio **{_fmt(eq['p50_ratio'], 2)}**), "
            f"p99 {_fmt(a['p99_ms'], 2)} vs {_fmt(b['p99_ms'], 2)} ms "
            f"(ratio **{_fmt(eq['p99_ratio'], 2)}**).")
        order = "; ".join(f"{n} {s['reordered']} reordered, {s['order_mismatch']} out of "
                          "conversation order" for n, s in ((comp["target"], a), (comp["baseline"], b)))
        lines.append(f"- Order at that load: {order} (PeerNet promises every participant one order).")
    return [*lines, f"- {comp['durability']}", ""]


def _target_section(t: dict[str, Any], p: dict[str, Any]) -> list[str]:
    lines = [f"## {t['name']}", ""]
    if t["error"]:
        lines += [f"**Failed:** {t['error']}", ""]
    lines.append(f"- URLs: {', '.join(t['urls'])}; {t['connections']:,} connections, set up in "
                 f"{t['setup_s']:.1f} s")
    mem = t["memory"]
    if mem:
        lines.append(f"- Server memory: {_fmt(mem.get('server_rss_before_mib'))} MiB before the clients, "
                     f"{_fmt(mem.get('server_rss_connected_mib'))} MiB connected; per connection "
                     f"{_fmt(mem.get('per_connection_kib'))} KiB (services included), "
                     f"{_fmt(mem.get('per_connection_kib_without_services'))} KiB (without)")
        if "server_rss_after_hold_mib" in mem:
            lines.append(f"- After the hold: {_fmt(mem['server_rss_after_hold_mib'])} MiB; "
                         "per connection "
                         f"{_fmt(mem.get('per_connection_kib_after_hold'))} KiB (services included), "
                         f"{_fmt(mem.get('per_connection_kib_after_hold_without_services'))} KiB "
                         "(without)")
    if ((t["max_held_rate"] is not None or p["find_max"]) and not p.get("chaos")
            and p["scenario"] != "connections"):
        lines.append(f"- Largest rate held (p99 <= {p['bound_ms']:g} ms, nothing lost or failed): "
                     f"{_fmt(t['max_held_rate'])}/s")
    for n in t["notes"]:
        lines.append(f"- Note: {n}")
    lines.append("")
    if t.get("connections_scenario"):
        lines += _connections_section(t["connections_scenario"], p)
    if t["phases"]:
        lines += _phase_table(t["phases"], p["scenario"])
        lines += _server_table(t["phases"][-1])
    return lines


def _ms_row(name: str, s: dict[str, Any]) -> str:
    return (f"| {name} | {_fmt(s.get('count'))} | {_fmt(s.get('p50'), 2)} | {_fmt(s.get('p90'), 2)} "
            f"| {_fmt(s.get('p99'), 2)} | {_fmt(s.get('max'), 2)} |")


def _connections_section(c: dict[str, Any], p: dict[str, Any]) -> list[str]:
    """`connections`: the open, the hold (closes, CPU, memory) and the storm."""
    o, h, cpu = c.get("open", {}), c.get("hold", {}), c.get("cpu", {})
    lines = [f"### Connections: {c['verdict']}", "",
             f"- Opened **{o.get('opened', 0):,} of {p['clients']:,}** at {p['connect_rate']:g}/s "
             f"(scheduled over {o.get('scheduled_s', 0):g} s) with {p['procs']} load process(es); "
             f"refused by the server **{o.get('refused_by_server', 0):,}**, failed in the load "
             f"generator {o.get('refused_in_load_generator', 0):,}"
             + (f" ({', '.join(f'{r} {n:,}' for r, n in sorted(o['refused'].items()))})"
                if o.get("refused") else "")]
    if o.get("generator_behind"):
        lines.append(f"- **The load generator was behind schedule**: connect calls up to "
                     f"{o['start_lag_ms']['p99']:,.1f} ms late at p99 (more than "
                     f"{GENERATOR_LAG_MS:g} ms); the latencies from the scheduled open include that "
                     "delay, and a `timeout` may be its own busy event loop (more --procs, a lower "
                     "--connect-rate, or the load on another machine)")
    for sample in o.get("refused_sample", [])[:3]:
        lines.append(f"  - e.g. `{sample}`")
    oc = o.get("cpu") or {}
    if oc.get("samples"):
        lines.append(f"- CPU during the open (% of one core, mean): server {_fmt(oc['server_pct'])}, "
                     f"load generator {_fmt(oc['load_generator_pct'])} "
                     f"({_fmt(oc['load_generator_per_process_pct'])} per process); the machine "
                     f"{_fmt(oc['system_cpu_pct'])}% of all cores")
        by = oc.get("ms_per_connection_by_category") or {}
        if oc.get("server_ms_per_connection") is not None:
            lines.append(f"- Server CPU per connection opened (idle stack included): "
                         f"**{_fmt(oc['server_ms_per_connection'], 2)} ms** ("
                         + ", ".join(f"{c} {_fmt(v, 2)}" for c, v in by.items() if v) + ")")
    if o.get("replicas"):
        lines.append("- Connections per gateway replica (from `welcome`): "
                     + ", ".join(f"{r} {n:,}" for r, n in o["replicas"].items()))
    lines += ["", "| open-to-`welcome`, ms | count | p50 | p90 | p99 | max |",
              "|---|---:|---:|---:|---:|---:|",
              _ms_row("from the scheduled open", o.get("welcome_ms", {})),
              _ms_row("from the connect call", o.get("handshake_ms", {})),
              _ms_row("connect call after its time (load generator lag)", o.get("start_lag_ms", {})), ""]
    codes = ", ".join(f"{k} x{n}" for k, n in h.get("codes", {}).items())
    lines.append(f"- Held {h.get('seconds', 0):g} s with keep-alive `{p['keepalive']}` "
                 f"({_fmt(h.get('keepalives'))} keep-alives sent since the first open): "
                 f"**closed by the server {h.get('closed', 0):,}** from the first open to the end of "
                 "the hold"
                 + (f" ({codes})" if codes else "") + f"; online at the end {_fmt(h.get('online_after'))}")
    if cpu:
        lines.append(f"- CPU, % of one core (mean over the hold, beside the idle stack over "
                     f"{cpu['idle_samples']} samples with no clients): server "
                     f"{_fmt(cpu['server_hold_pct'])} against {_fmt(cpu['server_idle_pct'])} idle, "
                     f"**{_fmt(cpu['server_above_idle_pct'])} above idle**, "
                     f"{_fmt(cpu['server_above_idle_per_1000_connections_pct'], 2)} per 1,000 "
                     f"connections; load generator {_fmt(cpu['load_generator_pct'])} over "
                     f"{_fmt(cpu['load_generator_processes'])} process(es)")
        lines += ["", "| process | count | idle % | hold % | above idle % |", "|---|---:|---:|---:|---:|"]
        for cat, v in cpu["by_category"].items():
            lines.append(f"| {cat} | {v['processes']} | {v['idle_pct']} | {v['hold_pct']} "
                         f"| {v['above_idle_pct']} |")
        lines.append("")
    s = c.get("storm")
    if s is not None:
        r = s.get("resume") or {}
        lines += [f"- Storm: one gateway replica killed; **{s['cut']:,} connections cut** "
                  f"({', '.join(f'{k} x{n}' for k, n in s['codes'].items()) or 'none'}), "
                  f"{s['back']:,} back, {s['resumed']:,} resumed; every cut client back after "
                  f"**{_fmt(s['all_back_after_s'], 2)} s** and resumed after "
                  f"**{_fmt(s['all_resumed_after_s'], 2)} s** from the kill; online at the end "
                  f"{_fmt(s['online_after'])}",
                  f"- Resume accounting: {r.get('acknowledged', 0):,} DMs acknowledged before the "
                  f"cut owed {r.get('owed', 0):,} deliveries, **{r.get('missing', 0)} missing** "
                  "(the storm phase's whole ledger is the last row below)"]
    lines.append("")
    return lines


def _fault_table(faults: list[dict[str, Any]]) -> list[str]:
    """Chaos mode: one row per fault, losses first."""
    bad = sum(1 for f in faults if not f["ok"])
    lines = [f"## Faults: {len(faults) - bad} of {len(faults)} passed", "",
             "| fault | what was done | acked | lost | delivered | dup | failed (reason) "
             "| back after s | recovered in s | MongoDB caught up after s | verdict |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    for f in faults:
        failed = ", ".join(f"{n} {r}" for r, n in sorted(f["failed"].items())) or "0"
        cells = [f["fault"], f["detail"] or "-", _fmt(f["acknowledged"]), _fmt(f["lost"]),
                 f"{_fmt(f['delivered'])} of {_fmt(f['expected_deliveries'])}", _fmt(f["duplicated"]),
                 failed, _fmt(f["repaired_after_s"]), _fmt(f["recovery_s"]),
                 _fmt(f.get("projections_caught_up_after_s")), f["verdict"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Lost: acknowledged (`ok`) but never delivered to a recipient. Failed: never "
              "acknowledged; `unavailable` and `rate_limited` are answers (the client may retry), "
              "`timeout` is silence, `disconnected_until_timeout` no server to take the request "
              "(every reconnect failed). Back after: the injection until the service or actor ran "
              "again. Recovered in: the injection until the first delivery after the last "
              "disturbed message (failed, lost, or later than 1 s). MongoDB caught up: the "
              "injection until the projector's consumer lag was back to its level before the "
              "fault (at most 10 records more).", ""]
    return lines


_PHASE_HEADER = [
    "| rate/s | acked/s | lost | dup | reord | failed | what | p50 | p90 | p99 | p99.9 | max | ack p99 "
    "| send lag p99 | verdict |",
    "|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
]


def _phase_table(phases: list[dict[str, Any]], scenario: str) -> list[str]:
    lines = list(_PHASE_HEADER)
    for ph in phases:
        c = ph["accounting"]["total"]
        lat = ph["accounting"]["latency_ms"]
        kinds = ph["headline_kinds"] or [SCENARIO_KINDS[scenario][0]]
        # A group message also timed to its last member, under its per-member row.
        kinds = [name for kind in kinds for name in (kind, f"{kind}_last") if name == kind or name in lat]
        for kind in kinds:
            s = lat.get(kind, {})
            ack = lat.get(f"{kind}_ack", {})
            cells = [
                f"{ph['rate_target']:g}", f"{ph['acked_rate']:,.1f}", str(c["lost"]), str(c["duplicated"]),
                str(c["reordered"]), str(c["failed"]), _KIND_TITLE.get(kind, kind),
                *(_fmt(s.get(n), 2) for n in ("p50", "p90", "p99", "p99_9", "max")),
                _fmt(ack.get("p99"), 2), _fmt(ph["send_lag_ms"].get("p99"), 2), ph["verdict"],
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Latencies in ms from each action's scheduled time (open loop), warm-up excluded.", ""]
    return lines


def _server_table(ph: dict[str, Any]) -> list[str]:
    srv = ph.get("server", {})
    if not srv.get("by_category"):
        return []
    lines = [f"Server processes during the {ph['rate_target']:g}/s phase:", "",
             "| process | count | RSS peak MiB | CPU mean % | CPU peak % |",
             "|---|---:|---:|---:|---:|"]
    for cat, v in srv["by_category"].items():
        lines.append(f"| {cat} | {v['processes']} | {v['rss_peak_mib']} | {v['cpu_mean_pct']} "
                     f"| {v['cpu_peak_pct']} |")
    lag = ", ".join(f"{k} peak {v:g}" for k, v in srv["kafka_lag_peak"].items())
    lines += ["", f"System CPU mean {srv.get('system_cpu_mean_pct')}% (100% = all cores). "
              f"Kafka consumer lag: {lag or srv.get('kafka_lag_note', '-')}", ""]
    return lines


# --- plots ------------------------------------------------------------------------------------

def write_plots(report: dict[str, Any], outdir: Path) -> list[str]:
    """latency_cdf.png always (when anything was measured); percentiles_vs_rate.png with more
    than one rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter

    written: list[str] = []
    scenario = report["params"]["scenario"]
    bound = report["params"]["bound_ms"]

    fig, ax = plt.subplots(figsize=(8, 5))
    plotted = False
    # Side by side, both targets at the equal-load rate; alone, the highest rate that held.
    equal = (report.get("comparison") or {}).get("equal_load", {}).get("rate")
    for t in report["targets"]:
        same = [ph for ph in t["phases"] if ph["rate_target"] == equal]
        held = same or [ph for ph in t["phases"] if ph["held"]] or t["phases"]
        if not held:
            continue
        ph = held[-1]
        for kind in ph["headline_kinds"]:
            pts = [(v, pct) for v, pct in ph["cdf_ms"].get(kind, []) if pct < 100.0]
            if not pts:
                continue
            xs = [1.0 / (1.0 - pct / 100.0) for _, pct in pts]
            ax.plot(xs, [v for v, _ in pts], label=f"{t['name']} {kind} @ {ph['rate_target']:g}/s")
            plotted = True
    if plotted:
        ax.set_xscale("log")
        ticks = [1, 2, 10, 100, 1000, 10000]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{100 * (1 - 1 / x):g}%" if x > 1 else "0%"))
        ax.axhline(bound, color="grey", linestyle=":", label=f"bound {bound:g} ms")
        ax.set_xlabel("percentile")
        ax.set_ylabel("latency from scheduled send (ms)")
        ax.set_title(f"{scenario}: latency by percentile")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = outdir / "latency_cdf.png"
        fig.savefig(path, dpi=110)
        written.append(path.name)
    plt.close(fig)

    if any(len(t["phases"]) > 1 for t in report["targets"]):
        fig, ax = plt.subplots(figsize=(8, 5))
        styles = {"p50": "-", "p90": "--", "p99": "-.", "p99_9": ":"}
        for t in report["targets"]:
            kind = SCENARIO_KINDS[scenario][0]
            rows = [(ph["rate_target"], ph["accounting"]["latency_ms"].get(kind)) for ph in t["phases"]]
            rows = [(r, s) for r, s in rows if s]
            if not rows:
                continue
            for name, style in styles.items():
                ax.plot([r for r, _ in rows], [s[name] for _, s in rows], style, marker="o", markersize=3,
                        label=f"{t['name']} {name.replace('_', '.')}")
        ax.axhline(bound, color="grey", linestyle=":", label=f"bound {bound:g} ms")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("offered rate (actions/s)")
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"{scenario}: latency percentiles against rate")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = outdir / "percentiles_vs_rate.png"
        fig.savefig(path, dpi=110)
        written.append(path.name)
        plt.close(fig)
    return written


def results_dir(base: Path, when: float) -> Path:
    stamp = dt.datetime.fromtimestamp(when).strftime("%Y%m%d-%H%M%S")
    path = base / stamp
    n = 1
    while path.exists():
        n += 1
        path = base / f"{stamp}-{n}"
    return path


def write_results(report: dict[str, Any], outdir: Path, *, plots: bool = True) -> list[str]:
    """Write results.json, summary.md and the plots into `outdir`; return the file names."""
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "results.json").write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    (outdir / "summary.md").write_text(render_markdown(report))
    files = ["results.json", "summary.md"]
    if plots:
        files += write_plots(report, outdir)
    return files
