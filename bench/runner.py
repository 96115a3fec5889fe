"""The coordinator: starts the load processes, runs phases (one rate each, or a `--find-max`
ladder), merges what every process saw into one accounting, and samples the server meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import httpx

from bench.baseline_socketio import BaselineCluster
from bench.chaos import FaultOutcome, Injector, gcs_address_of, judge
from bench.client import ConnStats, SetupError, now_us
from bench.control import Channel, Message, PipeChannel, queue_pair
from bench.latency import LatencyHistogram
from bench.ledger import Accounting, Acked, Failed, PresenceSeen, Receipt, Transition, account, match_presence
from bench.params import BenchParams
from bench.peernet_client import http_url
from bench.plan import (
    CHURN,
    DM,
    GROUP,
    POST,
    Plan,
    build_plan,
    churn_interval_s,
    new_run_tag,
    per_sender_rate,
)
from bench.probe import (
    CENTRIFUGO_CATEGORIES,
    LOAD_GENERATOR,
    PEERNET_CATEGORIES,
    SOCKETIO_CATEGORIES,
    ServerProbe,
)
from bench.progress import ProgressLine
from bench.worker import GROUP_NOTES_WAIT_S, LoadWorker, WorkerSpec, process_main

# Lead time between announcing a phase and its first action, so every process starts together.
PHASE_LEAD_S = 1.0
# Pause between connecting and the idle-memory sample, so the server's allocations settle.
SETTLE_S = 1.0
# Send lag (actual minus scheduled send time) above which the load generator, not the server, may
# be what limits the run: latencies then include the generator's own delay (still measured from
# the schedule, so never hidden, but not all the server's).
GENERATOR_LAG_MS = 10.0
# How long chaos mode waits for /healthz to answer 200 again before the next fault.
CHAOS_HEALTH_TIMEOUT_S = 120.0
# Per-connection frame rate above which PeerNet's default limit (200/s) would refuse frames.
RATE_LIMIT_WARN = 150.0

SCENARIO_KINDS = {"dm": (DM,), "fanout": (POST,), "presence": (CHURN,), "mixed": (DM, POST, CHURN),
                  "connections": (DM,), "group": (GROUP,)}
# connections: how long the coordinator waits for the last `welcome` beyond the open schedule
# (a handshake gives up after 10 s, bench/peernet_client.py).
OPEN_GRACE_S = 60.0


@dataclass
class PhaseOutcome:
    """One phase at one rate, merged over every load process."""

    phase: int
    rate: float
    seconds: float
    started_us: int
    ended_us: int
    accounting: Accounting
    send_lag: LatencyHistogram
    sent: int
    late: int
    foreign: int
    stray: int
    unexplained_presence: int
    inbox_gaps: int
    conn_stats: dict[str, Any]
    server: dict[str, Any]
    held: bool = False
    verdict: str = ""
    headline_p99_ms: float = 0.0
    generator_behind: bool = False
    fault: FaultOutcome | None = None
    # With a fault: the DMs acknowledged before its injection and their deliveries still missing
    # at the end (the resume accounting of `connections --storm`).
    before_fault: dict[str, int] = field(default_factory=dict)

    def headline_kinds(self, scenario: str) -> list[str]:
        return [k for k in SCENARIO_KINDS[scenario] if self.accounting.hist(k).count > 0]


@dataclass
class TargetResult:
    name: str
    urls: list[str]
    connections: int = 0
    setup_s: float = 0.0
    memory: dict[str, Any] = field(default_factory=dict)
    phases: list[PhaseOutcome] = field(default_factory=list)
    processes: list[dict[str, Any]] = field(default_factory=list)
    health: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str = ""
    # The `connections` scenario's open, hold and storm (Coordinator.run_connections).
    conns: dict[str, Any] = field(default_factory=dict)

    @property
    def max_held_rate(self) -> float | None:
        held = [p.rate for p in self.phases if p.held]
        return max(held) if held else None


@dataclass
class BenchRun:
    params: BenchParams
    run: str
    vs: str | None
    targets: list[TargetResult]
    started: float
    ended: float
    notes: list[str] = field(default_factory=list)


class WorkerHandle:
    """The coordinator's side of one load process (or in-process worker task)."""

    def __init__(self, channel: Channel, *, process: Any = None,
                 task: asyncio.Task[None] | None = None) -> None:
        self.channel = channel
        self.process = process
        self.task = task
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.latest: Message | None = None
        self.reader = asyncio.create_task(self._read())
        if task is not None:
            task.add_done_callback(self._task_done)

    @property
    def pid(self) -> int | None:
        return getattr(self.process, "pid", None)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self.inbox.put_nowait({"op": "failed", "error": f"load worker crashed: {exc!r}"})

    async def _read(self) -> None:
        while True:
            try:
                msg = await self.channel.recv()
            except (EOFError, OSError) as exc:
                await self.inbox.put({"op": "failed", "error": f"load process exited ({type(exc).__name__})"})
                return
            if msg.get("op") == "progress":
                self.latest = msg
                continue
            await self.inbox.put(msg)
            if msg.get("op") in ("bye", "failed"):
                return

    async def expect(self, op: str, within_s: float) -> Message:
        try:
            msg = await asyncio.wait_for(self.inbox.get(), within_s)
        except TimeoutError:
            raise SetupError(f"no {op!r} from a load process within {within_s:.0f} s") from None
        if msg.get("op") == "failed":
            raise SetupError(str(msg.get("error")))
        if msg.get("op") != op:
            raise SetupError(f"load process sent {msg.get('op')!r}, expected {op!r}")
        return msg

    async def send(self, msg: Message) -> None:
        await self.channel.send(msg)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.channel.send({"op": "stop"})
            await self.expect("bye", 30)
        if self.task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.task, 10)
        if self.process is not None:
            await asyncio.to_thread(self.process.join, 10)
            if self.process.is_alive():
                self.process.terminate()
                await asyncio.to_thread(self.process.join, 5)
            if isinstance(self.channel, PipeChannel):
                self.channel.close()
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.reader


async def start_go_worker(params: BenchParams, plan: Plan, say: Any) -> WorkerHandle:
    """The Go driver as the one load process (built first if need be: not part of the setup time)."""
    from bench.go_driver import ensure_built, start_go_driver

    binary = await ensure_built(say)
    channel, process = await start_go_driver(params, plan, binary)
    return WorkerHandle(channel, process=process)


def start_workers(params: BenchParams, run: str) -> list[WorkerHandle]:
    """One worker in this process when --procs is 1, else that many spawned load processes."""
    if params.procs == 1:
        mine, theirs = queue_pair()
        worker = LoadWorker(WorkerSpec(params.to_dict(), run, 0, 1), theirs)
        return [WorkerHandle(mine, task=asyncio.create_task(worker.run(), name="load-worker"))]
    ctx = mp.get_context("spawn")
    handles = []
    for i in range(params.procs):
        parent_end, child_end = ctx.Pipe()
        spec = WorkerSpec(params.to_dict(), run, i, params.procs)
        proc = ctx.Process(target=process_main, args=(spec.to_dict(), child_end), daemon=True,
                           name=f"bench-load-{i}")
        proc.start()
        child_end.close()
        handles.append(WorkerHandle(PipeChannel(parent_end), process=proc))
    return handles


def rate_ladder(params: BenchParams) -> list[float]:
    """The rates of a run: `--rate` alone, or for --find-max `--rate` times `--step-factor` to
    the n-th power, up to `--max-rate` and `--max-steps` steps."""
    if not params.find_max:
        return [params.rate]
    rates: list[float] = []
    r = params.rate
    while len(rates) < params.max_steps and r <= params.max_rate * (1 + 1e-9):
        rates.append(float(f"{r:.3g}"))
        r *= params.step_factor
    return rates


def plan_notes(plan: Plan, params: BenchParams, rate: float) -> list[str]:
    notes = []
    per_conn = per_sender_rate(plan, rate)
    if params.target == "peernet" and per_conn > RATE_LIMIT_WARN:
        notes.append(f"each sender sends {per_conn:.0f} frames/s at {rate:g}/s; PeerNet's default limit "
                     "is 200/s per connection: use more --clients")
    gap = churn_interval_s(plan, rate)
    if gap < 1.0:
        notes.append(f"each churner changes state every {gap:.2f} s at {rate:g}/s; below 1 s presence "
                     "events may be coalesced or mismatched: use more --clients or --churners")
    return notes


class Coordinator:
    """Drives one target through its phases."""

    def __init__(self, params: BenchParams, run: str, progress: ProgressLine) -> None:
        self.params = params
        self.run = run
        self.plan = build_plan(params, run)
        self.progress = progress

    async def run_target(self, probe: ServerProbe) -> TargetResult:
        p = self.params
        result = TargetResult(p.target, list(p.urls))
        await probe.start()
        handles: list[WorkerHandle] = []
        # The Go driver speaks PeerNet's protocol only: a --vs peer runs with the Python workers.
        go = p.driver == "go" and p.target == "peernet"
        try:
            injector = self._injector() if p.chaos else None
            before = probe.samples[-1]
            started = time.monotonic()
            self.progress.say(f"[{p.target}] connecting {p.clients} clients "
                              f"({len(self.plan.always_connected)} stay connected"
                              + (f"; {len(self.plan.groups)} group(s) to create" if self.plan.groups else "")
                              + ") "
                              + ("with the Go driver" if go else f"with {p.procs} load process(es)"))
            if go:
                handles = [await start_go_worker(p, self.plan, self.progress.say)]
                result.notes.append("load generator: the Go driver (bench/go/dmdriver), one process, "
                                    "and this coordinator")
            else:
                handles = start_workers(p, self.run)
            probe.add_load_pids(h.pid for h in handles if h.pid is not None)
            # A process that waits for other processes' groups gives up by itself first, saying so.
            ready_timeout = 60 + p.clients / 20 + (GROUP_NOTES_WAIT_S if self.plan.groups else 0)
            readies = await asyncio.gather(*(h.expect("ready", ready_timeout) for h in handles))
            result.setup_s = round(time.monotonic() - started, 2)
            result.connections = sum(int(r["connections"]) for r in readies)
            await asyncio.sleep(SETTLE_S)
            after = await probe.mark("connected")
            result.memory = self._memory(probe, before, after, result.connections)
            if injector is not None:
                await self._chaos(handles, probe, injector, result)
            for i, rate in enumerate(rate_ladder(p) if injector is None else []):
                result.notes.extend(n for n in plan_notes(self.plan, p, rate) if n not in result.notes)
                outcome = await self.run_phase(handles, probe, i, rate)
                result.phases.append(outcome)
                self.progress.say(self._phase_line(outcome))
                if p.find_max and not outcome.held:
                    break
        except SetupError as exc:
            result.error = str(exc)
            self.progress.say(f"[{p.target}] failed: {exc}")
        finally:
            await self._stop_load(handles, probe, result)
            if probe.lag_note not in ("ok", "no metrics URL for this target"):
                result.notes.append(f"Kafka consumer lag not measured: {probe.lag_note}")
        return result

    @staticmethod
    async def _stop_load(handles: list[WorkerHandle], probe: ServerProbe,
                         result: TargetResult) -> None:
        """The end of a target's run, however it ended: the load processes stopped, the probe
        stopped, the processes it saw recorded."""
        await asyncio.gather(*(h.stop() for h in handles), return_exceptions=True)
        await probe.stop()
        result.processes = probe.processes()

    def _injector(self) -> Injector:
        """The fault injector, checked against what runs here before any client connects."""
        from peernet.config import load_config
        from peernet.serve_process import state_file

        p = self.params
        gcs = p.ray_address or gcs_address_of(http_url(p.urls[0]), state_file(load_config()))
        injector = Injector(gcs, p.mongo_down, metrics_url=http_url(p.urls[0]) + "/metrics")
        injector.check(p.chaos)
        return injector

    async def _chaos(self, handles: list[WorkerHandle], probe: ServerProbe, injector: Injector,
                     result: TargetResult) -> None:
        """One phase per fault at --rate, each after the server is healthy again."""
        p = self.params
        for i, name in enumerate(p.chaos):
            if i:
                await self._until_healthy(CHAOS_HEALTH_TIMEOUT_S)
                await asyncio.sleep(p.fault_gap)
            self.progress.say(f"[chaos {name}] {p.rate:g}/s; the fault at {p.fault_at:g} s")
            outcome = await self.run_phase(handles, probe, i, p.rate, fault=name, injector=injector)
            result.phases.append(outcome)
            self.progress.say(self._phase_line(outcome))
        await self._until_healthy(CHAOS_HEALTH_TIMEOUT_S)

    async def _until_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if (await peernet_health(self.params.urls[0])).get("http_status") == 200:
                return
            await asyncio.sleep(0.5)
        self.progress.say(f"[chaos] /healthz not 200 within {timeout_s:.0f} s; going on")

    @staticmethod
    def _memory(probe: ServerProbe, before: Any, after: Any, connections: int) -> dict[str, Any]:
        mib = 1024 * 1024
        out: dict[str, Any] = {
            "server_rss_before_mib": round(probe.server_rss(before) / mib, 1),
            "server_rss_connected_mib": round(probe.server_rss(after) / mib, 1),
            "by_category_connected_mib": {k: round(v / mib, 1) for k, v in sorted(after.rss.items())},
        }
        if connections:
            for label, services in (("per_connection_kib", True),
                                    ("per_connection_kib_without_services", False)):
                delta = probe.server_rss(after, services) - probe.server_rss(before, services)
                out[label] = round(delta / connections / 1024, 1)
        return out

    def _phase_line(self, o: PhaseOutcome) -> str:
        t = o.accounting.total
        if o.fault is not None:
            f = o.fault
            return (f"[chaos {f.event.name}] {f.event.detail or '-'}; acknowledged {f.acknowledged}, "
                    f"lost {f.lost} of {f.expected}, dup {f.duplicated}, failed {sum(f.failed.values())} "
                    f"{dict(f.failed) if f.failed else ''}-> {f.verdict}")
        cpu = ""
        per = o.server.get("by_category") or {}
        if per and t.acked:
            server = sum(v["cpu_mean_pct"] for c, v in per.items() if c != LOAD_GENERATOR)
            cpu = f"; server CPU {server * 10 * o.seconds / t.acked:.2f} ms per action"
        if self.params.scenario == "group":
            # A group message is many deliveries: the rate the members were served at.
            cpu += f", {t.delivered / o.seconds:,.0f} deliveries/s"
        return (f"[{self.params.target} {o.rate:g}/s] lost {t.lost} of {t.expected} deliveries, "
                f"dup {t.duplicated}, reordered {t.reordered}, failed {t.failed}; "
                f"p99 {o.headline_p99_ms:.1f} ms{cpu} -> {o.verdict}")

    async def run_phase(self, handles: list[WorkerHandle], probe: ServerProbe, phase: int,
                        rate: float, *, fault: str | None = None,
                        injector: Injector | None = None) -> PhaseOutcome:
        p = self.params
        seconds = p.warmup + p.duration
        t0_us = now_us() + int(PHASE_LEAD_S * 1e6)
        cmd: dict[str, Any] = {"op": "phase", "phase": phase, "rate": rate, "t0_us": t0_us}
        if fault == "burst":
            cmd["burst"] = [p.fault_at, p.burst_s, p.burst_factor]
        for h in handles:
            await h.send(cmd)
        injecting = (asyncio.create_task(injector.inject(fault, t0_us + int(p.fault_at * 1e6)))
                     if fault is not None and injector is not None else None)
        ticker = asyncio.create_task(self._show_progress(handles, rate, t0_us))
        try:
            send_wait = seconds + PHASE_LEAD_S + p.request_timeout + 60
            sent_msgs = await asyncio.gather(*(h.expect("sent", send_wait) for h in handles))
            acked = [Acked(a[0], a[1], a[2], a[3], tuple(a[4]), a[5], a[6], bool(a[7]))
                     for m in sent_msgs for a in m["acked"]]
            failed = [Failed(*f) for m in sent_msgs for f in m["failed"]]
            transitions = [Transition(t[0], t[1], bool(t[2]), t[3])
                           for m in sent_msgs for t in m["transitions"]]
            acked_ks = [a.k for a in acked]
            deadline_us = now_us() + int(p.drain * 1e6)
            for h in handles:
                await h.send({"op": "expect", "acked": acked_ks, "deadline_us": deadline_us})
            results = await asyncio.gather(*(h.expect("result", p.drain + 60) for h in handles))
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            self.progress.done()
        ended_us = now_us()
        receipts = [Receipt(r[0], r[1], r[2], r[3]) for m in results for r in m["receipts"]]
        seen = [PresenceSeen(s[0], s[1], bool(s[2]), s[3]) for m in results for s in m["seen"]]
        matched, unexplained = match_presence(transitions, seen)
        accounting = account(acked, failed, receipts + matched)
        send_lag = LatencyHistogram()
        for m in sent_msgs:
            send_lag.merge(LatencyHistogram.decode(m["send_lag"]))
        outcome = PhaseOutcome(
            phase=phase, rate=rate, seconds=seconds, started_us=t0_us, ended_us=ended_us,
            accounting=accounting, send_lag=send_lag,
            sent=sum(int(m["sent"]) for m in sent_msgs),
            late=sum(int(m["late"]) for m in results),
            foreign=sum(int(m["foreign"]) for m in results),
            stray=sum(int(m["stray"]) for m in results),
            unexplained_presence=unexplained,
            inbox_gaps=sum(int(m["inbox_gaps"]) for m in results),
            conn_stats=ConnStats.merge_dicts([m["stats"] for m in results]),
            server=probe.window(t0_us, ended_us),
        )
        self._judge(outcome)
        if injecting is not None:
            event = await injecting
            t = accounting.total
            outcome.fault = judge(event, acked, failed, receipts, t.expected, t.delivered, t.lost,
                                  t.duplicated)
            per = outcome.server.get("by_category") or {}
            outcome.fault.memory_peak_mib = {c: v["rss_peak_mib"] for c, v in per.items()}
            if "server_rss_peak_mib" in outcome.server:
                outcome.fault.memory_peak_mib["server"] = outcome.server["server_rss_peak_mib"]
            outcome.held = outcome.fault.ok
            outcome.verdict = outcome.fault.verdict
            outcome.before_fault = owed_before(acked, receipts, event.injected_us)
        return outcome

    def _judge(self, o: PhaseOutcome) -> None:
        """A phase holds when nothing is lost, nothing fails, and the worst p99 of its delivery
        latencies is within the bound."""
        kinds = o.headline_kinds(self.params.scenario)
        o.headline_p99_ms = max((o.accounting.hist(k).percentile_ms(99.0) for k in kinds), default=0.0)
        t = o.accounting.total
        lag_p99 = o.send_lag.percentile_ms(99.0)
        o.generator_behind = lag_p99 > max(GENERATOR_LAG_MS, self.params.bound_ms / 10)
        if t.lost:
            o.verdict = f"{t.lost} lost"
        elif t.failed:
            o.verdict = f"{t.failed} actions failed"
        elif not kinds:
            o.verdict = "nothing measured"
        elif o.headline_p99_ms > self.params.bound_ms:
            o.verdict = f"p99 {o.headline_p99_ms:.1f} ms > {self.params.bound_ms:g} ms"
        else:
            o.held = True
            o.verdict = "held"
        if o.generator_behind:
            o.verdict += f" (load generator behind schedule: send lag p99 {lag_p99:.0f} ms)"

    async def _show_progress(self, handles: list[WorkerHandle], rate: float, t0_us: int) -> None:
        name = self.params.target
        while True:
            await asyncio.sleep(1.0)
            msgs = [h.latest for h in handles if h.latest is not None and "hist" in h.latest]
            hist = LatencyHistogram()
            for m in msgs:
                hist.merge(LatencyHistogram.decode(m["hist"]))
            elapsed = (now_us() - t0_us) / 1e6
            sent = sum(int(m["sent"]) for m in msgs)
            acked = sum(int(m["acked"]) for m in msgs)
            failed = sum(int(m["failed"]) for m in msgs)
            delivered = sum(int(m["delivered"]) for m in msgs)
            self.progress.update(
                f"[{name} {rate:g}/s] {elapsed:6.1f}s  sent {sent}  acked {acked}  failed {failed}  "
                f"delivered {delivered}  p99 {hist.percentile_ms(99.0):.1f} ms")


def owed_before(acked: list[Acked], receipts: list[Receipt], at_us: int) -> dict[str, int]:
    """The actions acknowledged before `at_us`, the deliveries they owe, and how many of those
    never arrived."""
    got = {(r.k, r.recipient) for r in receipts}
    before = [a for a in acked if a.ack_us < at_us] if at_us else []
    owed = [(a.k, r) for a in before for r in a.recipients]
    return {"acknowledged": len(before), "owed": len(owed),
            "missing": sum(1 for key in owed if key not in got)}


async def peernet_health(url: str) -> dict[str, Any]:
    """GET /healthz, or why it could not be read."""
    try:
        async with httpx.AsyncClient(timeout=5.0) as client:
            resp = await client.get(http_url(url) + "/healthz")
    except httpx.HTTPError as exc:
        return {"status": "unreachable", "error": f"{type(exc).__name__}: {exc}"}
    try:
        body: Any = resp.json()
    except ValueError:
        body = resp.text[:200]
    return {"http_status": resp.status_code, "body": body}


async def _run_centrifugo(p: BenchParams, run: str, progress: ProgressLine, redis_url: str,
                          log_dir: Any) -> TargetResult:
    """Install Centrifugo if need be, start its nodes, drive them, and stop them (also on failure)."""
    from bench.centrifugo import CentrifugoCluster

    cluster = CentrifugoCluster(redis_url=redis_url, log_dir=log_dir, say=progress.say)
    try:
        progress.say("[centrifugo] starting 2 nodes")
        await cluster.start()
    except SetupError as exc:
        progress.say(f"[centrifugo] failed to start: {exc}")
        return TargetResult("centrifugo", cluster.urls, error=str(exc))
    try:
        p = p.with_(urls=tuple(cluster.urls), token_secret=cluster.secret)
        redis_port = urlparse(redis_url).port or 6379
        probe = ServerProbe(CENTRIFUGO_CATEGORIES, service_ports={"redis": redis_port},
                            own_pids=dict.fromkeys(cluster.pids, "centrifugo"))
        result = await Coordinator(p, run, progress).run_target(probe)
        result.notes.append(f"peer: {cluster.describe()}")
        return result
    finally:
        await cluster.stop()


async def run_bench(params: BenchParams, *, vs: str | None = None, progress: ProgressLine | None = None,
                    baseline_ports: tuple[int, ...] = (8101, 8102),
                    redis_url: str = "redis://127.0.0.1:6379/0", log_dir: Any = None) -> BenchRun:
    """Run the scenario against the target, then (with `vs`) the same against that peer."""
    params.validate()
    progress = progress or ProgressLine(enabled=False)
    run = params.run_tag or new_run_tag()
    started = time.time()
    out = BenchRun(params, run, vs, [], started, started)
    names = [params.target] + ([vs] if vs and vs != params.target else [])
    for name in names:
        p = params.with_(target=name)
        if name == "socketio":
            cluster = BaselineCluster(baseline_ports, redis_url=redis_url, log_dir=log_dir)
            try:
                await cluster.start()
            except SetupError as exc:
                out.targets.append(TargetResult(name, cluster.urls, error=str(exc)))
                progress.say(f"[socketio] failed to start the baseline: {exc}")
                continue
            try:
                p = p.with_(urls=tuple(cluster.urls))
                redis_port = urlparse(redis_url).port or 6379
                probe = ServerProbe(SOCKETIO_CATEGORIES, service_ports={"redis": redis_port},
                                    own_pids=dict.fromkeys(cluster.pids, "socketio"))
                result = await Coordinator(p, run, progress).run_target(probe)
                result.notes.append(
                    f"baseline: python-socketio AsyncServer + AsyncRedisManager ({redis_url}) under uvicorn, "
                    f"{len(cluster.urls)} server processes on ports {', '.join(map(str, baseline_ports))}; "
                    "messages are not stored anywhere (at-most-once)")
            finally:
                await cluster.stop()
        elif name == "centrifugo":
            result = await _run_centrifugo(p, run, progress, redis_url, log_dir)
        else:
            health = await peernet_health(p.urls[0])
            if health.get("status") == "unreachable":
                result = TargetResult(name, list(p.urls), error=f"PeerNet at {p.urls[0]} is unreachable: "
                                                                 f"{health.get('error')}")
                progress.say(f"[peernet] {result.error}")
            else:
                base = http_url(p.urls[0])
                probe = ServerProbe(PEERNET_CATEGORIES, metrics_url=base + "/metrics",
                                    server_port=urlparse(base).port or 80, service_ports=p.service_ports)
                coordinator = Coordinator
                if p.scenario == "connections":
                    from bench.connections import ConnectionsCoordinator

                    coordinator = ConnectionsCoordinator
                result = await coordinator(p, run, progress).run_target(probe)
            result.health = health
        out.targets.append(result)
    out.ended = time.time()
    return out
