"""The `connections` scenario: many idle connections rather than many messages.

It samples the stack with no clients (the idle baseline), opens `--clients` connections at
`--connect-rate` a second spread over the load processes (each connection once, open loop,
timed from its scheduled open to its `welcome`), holds them idle for `--hold` seconds with the
chosen keep-alive, and records every connection the server closed meanwhile. Then, optionally,
DMs among them at `--rate` (the `dm` phase of bench/runner.py), and a reconnect storm
(`--storm replica`: bench/chaos.py's replica kill under a DM phase, every cut client back with
`resume`, every DM acknowledged before the cut delivered).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from typing import Any

from bench.chaos import Injector
from bench.client import CLIENT_SIDE_REFUSALS, SetupError, now_us
from bench.latency import LatencyHistogram
from bench.probe import LOAD_GENERATOR, ServerProbe
from bench.runner import (
    GENERATOR_LAG_MS,
    OPEN_GRACE_S,
    PHASE_LEAD_S,
    Coordinator,
    TargetResult,
    WorkerHandle,
    start_workers,
)

# The storm's phase number (the DM phase after the hold is 0).
STORM_PHASE = 1
MIB = 1024 * 1024


class ConnectionsCoordinator(Coordinator):
    """Drives PeerNet through the `connections` scenario (see the module docstring)."""

    async def run_target(self, probe: ServerProbe) -> TargetResult:
        p = self.params
        result = TargetResult(p.target, list(p.urls))
        out = result.conns
        await probe.start()
        handles: list[WorkerHandle] = []
        try:
            injector = self._injector_for("replica") if p.storm else None
            started = time.monotonic()
            self.progress.say(f"[connections] {p.procs} load process(es): dev tokens for "
                              f"{p.clients:,} users")
            handles = start_workers(p, self.run)
            probe.add_load_pids(h.pid for h in handles if h.pid is not None)
            await asyncio.gather(*(h.expect("ready", 60 + p.clients / 20) for h in handles))
            result.setup_s = round(time.monotonic() - started, 2)

            idle_from = now_us()
            if p.idle_baseline > 0:
                self.progress.say(f"[connections] the idle stack, no clients: {p.idle_baseline:g} s")
                await asyncio.sleep(p.idle_baseline)
            before = await probe.mark("idle")
            idle = probe.window(idle_from, now_us())

            open_from = now_us()
            out["open"] = await self._open(handles)
            open_to = now_us()
            opened = out["open"]["opened"]
            out["open"]["cpu"] = open_cpu(probe.window(open_from, open_to),
                                          (open_to - open_from) / 1e6, opened)
            result.connections = opened
            await asyncio.sleep(1.0)  # the server's allocations settle
            connected = await probe.mark("connected")

            hold_from = now_us()
            await self._hold(handles)
            hold_to = now_us()
            held = await probe.mark("held")
            out["hold"] = await self._closes(handles, open_from, hold_to)
            out["hold"]["seconds"] = round((hold_to - hold_from) / 1e6, 1)
            out["cpu"] = cpu_above_idle(idle, probe.window(hold_from, hold_to), opened)
            result.memory = self._memory(probe, before, connected, opened)
            result.memory.update(memory_after_hold(probe, before, held, opened))

            refused = sum(out["open"]["refused"].values())
            if refused and (p.rate > 0 or p.storm):
                note = (f"DMs and storm skipped: {refused:,} connections were refused, and DMs "
                        "to users without a connection could not be delivered")
                result.notes.append(note)
                self.progress.say(f"[connections] {note}")
                return result
            if p.rate > 0:
                self.progress.say(f"[connections] DMs among them at {p.rate:g}/s")
                outcome = await self.run_phase(handles, probe, 0, p.rate)
                result.phases.append(outcome)
                self.progress.say(self._phase_line(outcome))
            if injector is not None:
                self.progress.say(f"[connections] storm: one gateway replica killed {p.fault_at:g} s "
                                  f"into DMs at {p.rate:g}/s")
                outcome = await self.run_phase(handles, probe, STORM_PHASE, p.rate, fault="replica",
                                               injector=injector)
                result.phases.append(outcome)
                self.progress.say(self._phase_line(outcome))
                injected = outcome.fault.event.injected_us if outcome.fault is not None else 0
                out["storm"] = await self._storm(handles, injected, outcome.ended_us,
                                                 out["open"]["replicas"])
                out["storm"]["resume"] = dict(outcome.before_fault)
                self.progress.say(storm_line(out["storm"]))
        except SetupError as exc:
            result.error = str(exc)
            self.progress.say(f"[connections] failed: {exc}")
        finally:
            await self._stop_load(handles, probe, result)
        return result

    def _injector_for(self, fault: str) -> Injector:
        """The chaos module's injector, checked before any client connects."""
        injector = self._injector()
        injector.check((fault,))
        return injector

    async def _open(self, handles: list[WorkerHandle]) -> dict[str, Any]:
        p = self.params
        t0_us = now_us() + int(PHASE_LEAD_S * 1e6)
        span_s = p.clients / p.connect_rate
        self.progress.say(f"[connections] opening {p.clients:,} at {p.connect_rate:g}/s "
                          f"(about {span_s:.0f} s), keep-alive {p.keepalive}")
        for h in handles:
            await h.send({"op": "open", "t0_us": t0_us, "rate": p.connect_rate})
        ticker = asyncio.create_task(self._show("opening", handles))
        try:
            msgs = await asyncio.gather(*(h.expect("opened", span_s + PHASE_LEAD_S + OPEN_GRACE_S)
                                          for h in handles))
        finally:
            await _cancel(ticker)
            self.progress.done()
        return merge_opened(msgs, span_s)

    async def _hold(self, handles: list[WorkerHandle]) -> None:
        p = self.params
        self.progress.say(f"[connections] holding them idle for {p.hold:g} s ({p.keepalive})")
        ticker = asyncio.create_task(self._show("holding", handles))
        try:
            await asyncio.sleep(p.hold)
        finally:
            await _cancel(ticker)
            self.progress.done()

    async def _show(self, what: str, handles: list[WorkerHandle]) -> None:
        started = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            msgs = [h.latest for h in handles if h.latest is not None and "online" in h.latest]
            online = sum(int(m["online"]) for m in msgs)
            refused = sum(int(m.get("refused", 0)) for m in msgs)
            line = f"[connections {what}] {time.monotonic() - started:6.1f}s  online {online:,}"
            self.progress.update(line + (f"  refused {refused:,}" if what == "opening" else ""))

    async def _cuts(self, handles: list[WorkerHandle], since_us: int) -> list[dict[str, Any]]:
        for h in handles:
            await h.send({"op": "cuts", "since_us": since_us})
        return list(await asyncio.gather(*(h.expect("cuts", 60) for h in handles)))

    async def _closes(self, handles: list[WorkerHandle], from_us: int, to_us: int) -> dict[str, Any]:
        """Every connection the server closed from the open's start to the hold's end (`at_s`
        from the open's start)."""
        msgs = await self._cuts(handles, from_us)
        cuts = [c for m in msgs for c in m["cuts"] if c[2] <= to_us]
        return {"closed": len(cuts), "connections_closed": len({c[0] for c in cuts}),
                "codes": dict(Counter(str(c[1]) for c in cuts)),
                "closes": [{"user": c[0], "code": c[1], "at_s": round((c[2] - from_us) / 1e6, 3),
                            "back_after_s": round((c[3] - c[2]) / 1e6, 3) if c[3] else None}
                           for c in cuts[:1000]],
                "online_after": sum(int(m["online"]) for m in msgs),
                "keepalives": sum(int(m["stats"].get("keepalives", 0)) for m in msgs)}

    async def _storm(self, handles: list[WorkerHandle], injected_us: int, ended_us: int,
                     replicas: dict[str, int]) -> dict[str, Any]:
        msgs = await self._cuts(handles, injected_us) if injected_us else []
        return storm_figures([c for m in msgs for c in m["cuts"]], injected_us, ended_us, replicas,
                             sum(int(m["online"]) for m in msgs))


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def merge_opened(msgs: list[dict[str, Any]], span_s: float) -> dict[str, Any]:
    """One figure for the open over every load process: counts, refusals by reason (the load
    generator's own apart), and the latency histograms."""
    hists = {name: LatencyHistogram() for name in ("welcome", "handshake", "start_lag")}
    refused: Counter[str] = Counter()
    replicas: Counter[str] = Counter()
    sample: list[str] = []
    for m in msgs:
        for name, h in hists.items():
            h.merge(LatencyHistogram.decode(m[name]))
        refused.update(m["refused"])
        replicas.update(m.get("replicas", {}))
        sample.extend(m.get("refused_sample", [])[: max(0, 5 - len(sample))])
    by_server = {r: n for r, n in refused.items() if r not in CLIENT_SIDE_REFUSALS}
    by_client = {r: n for r, n in refused.items() if r in CLIENT_SIDE_REFUSALS}
    welcome = hists["welcome"]
    lag_p99 = hists["start_lag"].percentile_ms(99.0)
    return {
        "opened": welcome.count,
        "refused": dict(refused),
        "refused_by_server": sum(by_server.values()),
        "refused_in_load_generator": sum(by_client.values()),
        "refused_sample": sample,
        "online": sum(int(m["online"]) for m in msgs),
        "replicas": dict(sorted(replicas.items())),
        "scheduled_s": round(span_s, 2),
        "welcome_ms": welcome.summary(),
        "handshake_ms": hists["handshake"].summary(),
        "start_lag_ms": hists["start_lag"].summary(),
        # The load generator started connects late: their latencies hold its own delay, and a
        # `timeout` may be its own event loop too busy to finish the handshake in time.
        "generator_behind": lag_p99 > GENERATOR_LAG_MS,
        "histograms": {name: h.encode() for name, h in hists.items()},
    }


def cpu_above_idle(idle: dict[str, Any], hold: dict[str, Any], connections: int) -> dict[str, Any]:
    """Mean CPU (% of one core) per process category over the hold, beside the idle stack's,
    and the server's increase per 1,000 connections. The load generator is reported apart."""
    idle_by = idle.get("by_category") or {}
    hold_by = hold.get("by_category") or {}
    rows: dict[str, Any] = {}
    for cat in sorted(set(idle_by) | set(hold_by)):
        i = idle_by.get(cat, {}).get("cpu_mean_pct", 0.0)
        h = hold_by.get(cat, {}).get("cpu_mean_pct", 0.0)
        rows[cat] = {"idle_pct": i, "hold_pct": h, "above_idle_pct": round(h - i, 1),
                     "processes": hold_by.get(cat, {}).get("processes", 0)}
    server = {c: v for c, v in rows.items() if c != LOAD_GENERATOR}
    above = round(sum(v["above_idle_pct"] for v in server.values()), 1)
    gen = rows.get(LOAD_GENERATOR, {})
    return {
        "idle_samples": idle.get("samples", 0),
        "hold_samples": hold.get("samples", 0),
        "server_idle_pct": round(sum(v["idle_pct"] for v in server.values()), 1),
        "server_hold_pct": round(sum(v["hold_pct"] for v in server.values()), 1),
        "server_above_idle_pct": above if idle.get("samples") else None,
        "server_above_idle_per_1000_connections_pct": (round(above * 1000 / connections, 2)
                                                       if connections and idle.get("samples") else None),
        "load_generator_pct": gen.get("hold_pct"),
        "load_generator_processes": gen.get("processes"),
        "system_cpu_idle_pct": idle.get("system_cpu_mean_pct"),
        "system_cpu_hold_pct": hold.get("system_cpu_mean_pct"),
        "by_category": rows,
    }


def open_cpu(window: dict[str, Any], seconds: float, opened: int) -> dict[str, Any]:
    """CPU during the open (% of one core): the server's, and the load generator's per process,
    which tells whether the generator or the server was the one short of CPU; and what a
    connection cost each server process (ms of CPU per connection opened, idle included: the
    open's price at this rate)."""
    per = window.get("by_category") or {}
    gen = per.get(LOAD_GENERATOR, {})
    procs = max(1, int(gen.get("processes", 1)))
    server = {c: v["cpu_mean_pct"] for c, v in per.items() if c != LOAD_GENERATOR}
    server_pct = sum(server.values())

    def per_connection(pct: float) -> float | None:
        return round(pct / 100 * seconds * 1000 / opened, 3) if opened else None

    return {"samples": window.get("samples", 0),
            "server_pct": round(server_pct, 1),
            "load_generator_pct": gen.get("cpu_mean_pct"),
            "load_generator_per_process_pct": (round(gen["cpu_mean_pct"] / procs, 1) if gen else None),
            "system_cpu_pct": window.get("system_cpu_mean_pct"),
            "server_ms_per_connection": per_connection(server_pct),
            "ms_per_connection_by_category": {
                c: per_connection(pct) for c, pct in sorted(server.items(), key=lambda kv: -kv[1])}}


def memory_after_hold(probe: ServerProbe, before: Any, held: Any, connections: int) -> dict[str, Any]:
    out: dict[str, Any] = {"server_rss_after_hold_mib": round(probe.server_rss(held) / MIB, 1)}
    if connections:
        for label, services in (("per_connection_kib_after_hold", True),
                                ("per_connection_kib_after_hold_without_services", False)):
            delta = probe.server_rss(held, services) - probe.server_rss(before, services)
            out[label] = round(delta / connections / 1024, 1)
    return out


def storm_figures(cuts: list[list[Any]], injected_us: int, ended_us: int, replicas: dict[str, int],
                  online: int) -> dict[str, Any]:
    """The storm: how many connections the kill cut, and when the last of them was back
    (`welcome`) and had resumed (`resumed`), from the injection. A connection cut twice counts
    once, by its last cut."""
    last: dict[int, list[Any]] = {}
    for c in cuts:
        if c[2] >= injected_us and (c[0] not in last or c[2] > last[c[0]][2]):
            last[c[0]] = c
    back = [c for c in last.values() if c[3]]
    resumed = [c for c in last.values() if c[4]]
    out: dict[str, Any] = {
        "injected": bool(injected_us),
        "connections_per_replica_before": replicas,
        "cut": len(last),
        "cuts_total": sum(1 for c in cuts if c[2] >= injected_us),
        "codes": dict(Counter(str(c[1]) for c in cuts if c[2] >= injected_us)),
        "back": len(back),
        "resumed": len(resumed),
        "not_back": sorted(u for u, c in last.items() if not c[3])[:20],
        "online_after": online,
        "all_back_after_s": None,
        "all_resumed_after_s": None,
        "phase_s": round((ended_us - injected_us) / 1e6, 1) if injected_us else None,
    }
    if last and len(back) == len(last):
        out["all_back_after_s"] = round((max(c[3] for c in back) - injected_us) / 1e6, 3)
    if last and len(resumed) == len(last):
        out["all_resumed_after_s"] = round((max(c[4] for c in resumed) - injected_us) / 1e6, 3)
    return out


def storm_line(s: dict[str, Any]) -> str:
    if not s.get("injected"):
        return "[storm] no replica was killed"
    back = (f"all back in {s['all_back_after_s']:.1f} s, resumed in {s['all_resumed_after_s']:.1f} s"
            if s["all_resumed_after_s"] is not None
            else f"back {s['back']}, resumed {s['resumed']}")
    r = s.get("resume", {})
    return (f"[storm] cut {s['cut']:,} connections ({s['codes']}); {back}; acknowledged before the "
            f"cut {r.get('acknowledged', 0):,}, deliveries missing {r.get('missing', 0)}")
