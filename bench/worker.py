"""A load process: owns every user whose index is its own modulo the process count, keeps their
connections, performs their scheduled actions open-loop and records what arrives.

It speaks to the coordinator over a control channel:
  -> ready | failed          after setup (tokens, connections, follows, watches, groups: each
                             known by its `g:ID`; for the `connections` scenario tokens only)
  <- open                    `connections`: open every connection at its time (rank / rate
                             after t0), each once, and time it from then to its `welcome`
  -> opened                  what opened and what was refused, and the latencies
  <- cuts                    `connections`: every connection the server closed since a time
  -> cuts                    those closes, whether each came back (and resumed), and who is online
  <- phase                   run one phase at a rate, starting at t0
  -> progress                about once a second while a phase runs
  -> sent                    its actions resolved: what was acknowledged, what failed
  <- expect                  every process's acknowledged actions, and the drain deadline
  -> result                  what its users received
  <- stop, -> bye
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from bench.client import (
    Connection,
    ConnStats,
    Frame,
    RequestFailed,
    SetupError,
    Target,
    now_us,
    refusal_reason,
)
from bench.control import Channel, Message
from bench.latency import LatencyHistogram
from bench.ledger import Acked, Failed, PresenceSeen, Receipt, Transition
from bench.params import BenchParams
from bench.plan import (
    CHURN,
    DM,
    GROUP,
    POST,
    Event,
    Plan,
    build_plan,
    encode_body,
    group_from_title,
    group_title,
    parse_body,
    schedule,
)

T = TypeVar("T")
PROGRESS_INTERVAL_S = 1.0
# Actions due within this much are performed now rather than after a sleep.
DISPATCH_SLACK_US = 1000
# How long a load process waits, after creating its own groups, for the `group` notes of the
# groups other processes create (each creates those whose owner it holds).
GROUP_NOTES_WAIT_S = 60.0


def make_target(name: str, urls: list[str], params: BenchParams) -> Target:
    if name == "socketio":
        from bench.socketio_client import SocketIOTarget

        return SocketIOTarget(urls, request_timeout=params.request_timeout)
    if name == "centrifugo":
        from bench.centrifugo_client import CentrifugoTarget

        return CentrifugoTarget(urls, secret=params.token_secret, request_timeout=params.request_timeout,
                                feeds=params.scenario in ("fanout", "mixed"))
    from bench.peernet_client import PeerNetTarget

    # A group's note may reach a member before the member's process has connected it: the
    # first `hello` asks for the whole inbox so that it arrives all the same.
    return PeerNetTarget(urls, binary=params.binary, request_timeout=params.request_timeout,
                         keepalive=params.keepalive, replay_inbox=params.scenario == "group")


@dataclass
class WorkerSpec:
    params: dict[str, Any]
    run: str
    index: int
    count: int

    def to_dict(self) -> dict[str, Any]:
        return {"params": self.params, "run": self.run, "index": self.index, "count": self.count}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkerSpec:
        return cls(d["params"], d["run"], d["index"], d["count"])


@dataclass
class PhaseState:
    """What one phase has done and seen so far in this process."""

    phase: int
    t0_us: int
    warm_end_us: int
    acked: list[Acked] = field(default_factory=list)
    failed: list[Failed] = field(default_factory=list)
    transitions: list[Transition] = field(default_factory=list)
    receipts: list[Receipt] = field(default_factory=list)
    seen: list[PresenceSeen] = field(default_factory=list)
    first: set[tuple[int, int]] = field(default_factory=set)
    owed: dict[int, int] = field(default_factory=dict)
    sent: int = 0
    late: int = 0
    hist: LatencyHistogram = field(default_factory=LatencyHistogram)
    send_lag: LatencyHistogram = field(default_factory=LatencyHistogram)


class LoadWorker:
    def __init__(self, spec: WorkerSpec, channel: Channel, target: Target | None = None) -> None:
        self.spec = spec
        self.channel = channel
        self.params = BenchParams.from_dict(spec.params)
        self.plan: Plan = build_plan(self.params, spec.run)
        self.user_index = self.plan.user_index()
        self.owned = [i for i in range(len(self.plan.users)) if i % spec.count == spec.index]
        self.target = target or make_target(self.params.target, list(self.params.urls), self.params)
        self.stats = ConnStats()
        self.conns: dict[int, Connection] = {}
        self.state: PhaseState | None = None
        self.foreign = 0
        self.stray = 0
        self._churn_locks: dict[int, asyncio.Lock] = {}
        self.opening: dict[str, int] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # group index -> its `g:ID`, from the owner's `ok` or a member's `group` note
        self.group_convs: dict[int, str] = {}

    def owns(self, i: int) -> bool:
        return i % self.spec.count == self.spec.index

    # --- the control loop ---------------------------------------------------------------------
    async def run(self) -> None:
        started = time.monotonic()
        try:
            await self.setup()
        except (SetupError, RequestFailed) as exc:
            await self.channel.send({"op": "failed", "error": str(exc)})
            await self.teardown()
            return
        # The connections made so far live until teardown: kept out of every later collection,
        # the load generator's own GC pauses (which would count as server latency) stay short.
        gc.collect()
        gc.freeze()
        online = sum(1 for c in self.conns.values() if c.online)
        await self.channel.send({"op": "ready", "connections": online,
                                 "setup_s": round(time.monotonic() - started, 3)})
        ticker = asyncio.create_task(self._tick_loop())
        try:
            while True:
                cmd = await self.channel.recv()
                op = cmd.get("op")
                if op == "phase":
                    await self.run_phase(cmd)
                elif op == "open":
                    await self.channel.send(await self.open_all(cmd))
                elif op == "cuts":
                    await self.channel.send(self.cuts(cmd))
                else:
                    break
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            await self.teardown()
        await self.channel.send({"op": "bye"})

    async def setup(self) -> None:
        plan = self.plan
        await self.target.prepare([(i, plan.users[i]) for i in self.owned])
        for i in self.owned:
            self.conns[i] = self.target.connection(i, plan.users[i], self.on_frame, self.stats)
        if self.params.scenario == "connections":
            return  # opened by the coordinator's `open`, at the connect rate
        sem = asyncio.Semaphore(self.params.connect_concurrency)
        churning = set(plan.churners)

        async def opened(i: int) -> None:
            async with sem:
                await self.conns[i].open()

        await asyncio.gather(*(opened(i) for i in self.owned if i not in churning))

        async def ask(i: int, frame: Frame) -> None:
            async with sem:
                try:
                    await self.conns[i].request(frame, idempotent=True)
                except RequestFailed as exc:
                    raise SetupError(f"{frame['t']!r} from {plan.users[i]} refused: {exc.reason}") from None

        jobs = []
        for author, followers in plan.followers.items():
            for f in followers:
                if self.owns(f):
                    jobs.append(ask(f, {"t": "follow", "user": plan.users[author]}))
        for watcher, watched in plan.watching.items():
            if self.owns(watcher):
                jobs.append(ask(watcher, {"t": "watch", "users": [plan.users[c] for c in watched]}))
        await asyncio.gather(*jobs)
        if plan.groups:
            await self.create_groups(sem)
            await self.await_group_convs(GROUP_NOTES_WAIT_S)

    async def create_groups(self, sem: asyncio.Semaphore) -> None:
        """`group_create` from the owner of every group whose owner this process holds. The cid
        is the run's and the group's, so a create resent after a reconnect makes no second
        group."""
        plan = self.plan

        async def create(g: int, members: tuple[int, ...]) -> None:
            owner = members[0]
            frame: Frame = {"t": "group_create", "title": group_title(plan.run, g),
                            "members": [plan.users[m] for m in members[1:]],
                            "cid": f"{plan.run}-g{g}"}
            async with sem:
                try:
                    ok = await self.conns[owner].request(frame, idempotent=True)
                except RequestFailed as exc:
                    raise SetupError(f"group_create of group {g} by {plan.users[owner]} refused: "
                                     f"{exc.reason}") from None
            conv = ok.get("conv")
            if not isinstance(conv, str):
                raise SetupError(f"group_create of group {g}: no conv in {ok!r:.200}")
            self.group_convs[g] = conv

        await asyncio.gather(*(create(g, members) for g, members in enumerate(plan.groups)
                               if self.owns(members[0])))

    async def await_group_convs(self, within_s: float) -> None:
        """Return once the conv of every group an owned user is in is known; SetupError when
        `within_s` passes first (a group never made, or a note never delivered)."""
        need = {self.plan.group_of[i] for i in self.owned}
        deadline = time.monotonic() + within_s
        while not need <= self.group_convs.keys():
            if time.monotonic() > deadline:
                missing = sorted(need - self.group_convs.keys())
                raise SetupError(f"no `group` note for {len(missing)} of the {len(need)} groups "
                                 f"this load process's users are in within {within_s:.0f} s "
                                 f"(e.g. {group_title(self.plan.run, missing[0])!r})")
            await asyncio.sleep(0.05)

    async def open_all(self, cmd: Message) -> Message:
        """Open every owned connection once, open loop: user i's at t0 + i / rate, whatever the
        earlier ones are doing. A connection that fails is counted by reason and left closed."""
        t0_us = int(cmd["t0_us"])
        rate = float(cmd["rate"])
        welcome = LatencyHistogram()      # from the scheduled open to `welcome`
        handshake = LatencyHistogram()    # from the connect call to `welcome`
        start_lag = LatencyHistogram()    # the connect call after its scheduled time
        refused: dict[str, int] = {}
        sample: list[str] = []
        tasks: list[asyncio.Task[None]] = []
        counts = self.opening = {"opened": 0, "refused": 0}

        async def one(i: int, due_us: int) -> None:
            started = now_us()
            start_lag.record_us(max(1, started - due_us))
            try:
                await self.conns[i].open()
            except SetupError as exc:
                reason = refusal_reason(exc)
                refused[reason] = refused.get(reason, 0) + 1
                counts["refused"] += 1
                if len(sample) < 5:
                    sample.append(str(exc)[:200])
                return
            at = getattr(self.conns[i], "opened_us", 0) or now_us()
            welcome.record_us(max(1, at - due_us))
            handshake.record_us(max(1, at - started))
            counts["opened"] += 1

        for i in self.owned:
            due_us = t0_us + round(i * 1e6 / rate)
            wait_us = due_us - now_us()
            if wait_us > DISPATCH_SLACK_US:
                await asyncio.sleep(wait_us / 1e6)
            tasks.append(asyncio.create_task(one(i, due_us)))
        await asyncio.gather(*tasks)
        self.opening = None
        gc.collect()
        gc.freeze()
        replicas: dict[str, int] = {}
        for c in self.conns.values():
            name = getattr(c, "replica", "")
            if c.online and name:
                replicas[name] = replicas.get(name, 0) + 1
        return {"op": "opened", "opened": welcome.count, "refused": refused, "refused_sample": sample,
                "welcome": welcome.encode(), "handshake": handshake.encode(),
                "start_lag": start_lag.encode(), "replicas": replicas,
                "online": sum(1 for c in self.conns.values() if c.online)}

    def cuts(self, cmd: Message) -> Message:
        """Every close the client did not ask for since `since_us`, as (user, code, closed,
        back, resumed) in epoch microseconds (0: not back, or no `resumed` yet)."""
        since = int(cmd.get("since_us", 0))
        out = [[i, cut.code, cut.closed_us, cut.back_us, cut.resumed_us]
               for i, c in self.conns.items() for cut in getattr(c, "cuts", ())
               if cut.closed_us >= since]
        return {"op": "cuts", "cuts": out, "online": sum(1 for c in self.conns.values() if c.online),
                "stats": self.stats.to_dict()}

    async def teardown(self) -> None:
        await asyncio.gather(*(c.close() for c in self.conns.values()), return_exceptions=True)

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            now = time.monotonic()
            for c in list(self.conns.values()):
                if c.online:
                    await c.tick(now)
            if self.opening is not None:
                await self.channel.send({"op": "progress", **self.opening,
                                         "online": sum(1 for c in self.conns.values() if c.online)})
                continue
            st = self.state
            if st is None and self.params.scenario == "connections":
                await self.channel.send({"op": "progress", "opened": 0, "refused": 0,
                                         "online": sum(1 for c in self.conns.values() if c.online)})
            if st is not None:
                await self.channel.send({
                    "op": "progress", "sent": st.sent, "acked": len(st.acked), "failed": len(st.failed),
                    "delivered": len(st.first) + len(st.seen), "hist": st.hist.encode(),
                })

    # --- a phase ------------------------------------------------------------------------------
    async def run_phase(self, cmd: Message) -> None:
        p = self.params
        phase = int(cmd["phase"])
        rate = float(cmd["rate"])
        t0_us = int(cmd["t0_us"])
        st = PhaseState(phase, t0_us, t0_us + int(p.warmup * 1e6))
        self.state = st
        inflight: set[asyncio.Task[None]] = set()
        unyielded = 0
        burst = cmd.get("burst")
        for ev in schedule(self.plan, p.seed, phase, rate, p.warmup + p.duration,
                           burst=tuple(burst) if burst else None):
            mine = sum(1 for r in self.plan.recipients(ev) if self.owns(r))
            if mine:
                st.owed[ev.k] = mine
            if not self.owns(ev.actor):
                continue
            due_us = t0_us + ev.at_us
            wait_us = due_us - now_us()
            if wait_us > DISPATCH_SLACK_US:
                await asyncio.sleep(wait_us / 1e6)
                unyielded = 0
            elif unyielded >= 50:
                # Behind schedule: still let the readers run, or arrivals queue up unmeasured.
                await asyncio.sleep(0)
                unyielded = 0
            unyielded += 1
            task = asyncio.create_task(self._act(st, ev, due_us))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
        if inflight:
            await asyncio.gather(*list(inflight))
        await self.channel.send({
            "op": "sent",
            "acked": [list(a) for a in st.acked],
            "failed": [list(f) for f in st.failed],
            "transitions": [list(t) for t in st.transitions],
            "sent": st.sent,
            "send_lag": st.send_lag.encode(),
        })
        expect = await self.channel.recv()
        acked_ks = set(expect.get("acked", []))
        deadline_us = int(expect["deadline_us"])
        need = sum(n for k, n in st.owed.items() if k in acked_ks)
        while now_us() < deadline_us:
            have = sum(1 for k, _ in st.first if k in acked_ks) + len(st.seen)
            if have >= need:
                break
            await asyncio.sleep(0.05)
        self.state = None
        # Every churner ends the phase offline, as the next phase's schedule assumes.
        await asyncio.gather(*(self.conns[c].close() for c in self.plan.churners
                               if self.owns(c) and self.conns[c].online), return_exceptions=True)
        gaps = sum(int(getattr(c, "inbox_gaps", lambda: 0)()) for c in self.conns.values())
        await self.channel.send({
            "op": "result",
            "receipts": [list(r) for r in st.receipts],
            "seen": [list(s) for s in st.seen],
            "late": st.late,
            "foreign": self.foreign,
            "stray": self.stray,
            "inbox_gaps": gaps,
            "stats": self.stats.to_dict(),
        })

    async def _act(self, st: PhaseState, ev: Event, due_us: int) -> None:
        st.send_lag.record_us(max(1, now_us() - due_us))
        st.sent += 1
        warm = due_us < st.warm_end_us
        conn = self.conns[ev.actor]
        plan = self.plan
        if ev.kind == CHURN:
            await self._churn(st, ev, due_us, warm)
            return
        body = encode_body(plan.run, st.phase, ev.k, due_us, self.params.size)
        frame: Frame
        if ev.kind == DM:
            frame = {"t": "dm", "to": plan.users[ev.target], "body": body,
                     "cid": f"{plan.run}-{st.phase}-{ev.k}"}
        elif ev.kind == GROUP:
            frame = {"t": "dm", "conv": self.group_convs[ev.target], "body": body,
                     "cid": f"{plan.run}-{st.phase}-{ev.k}"}
        else:
            frame = {"t": "post", "body": body}
        try:
            # A DM carries a cid, so it may be sent again after a reconnect; a post may not.
            await conn.request(frame, idempotent=ev.kind != POST)
        except RequestFailed as exc:
            st.failed.append(Failed(ev.k, ev.kind, exc.reason, due_us))
            return
        st.acked.append(Acked(ev.k, ev.kind, plan.conv(ev), ev.actor, plan.recipients(ev),
                              due_us, now_us(), warm))

    async def _churn(self, st: PhaseState, ev: Event, due_us: int, warm: bool) -> None:
        lock = self._churn_locks.setdefault(ev.actor, asyncio.Lock())
        conn = self.conns[ev.actor]
        async with lock:
            online = bool(ev.target)
            start = now_us()
            st.transitions.append(Transition(ev.k, ev.actor, online, start))
            try:
                if online:
                    await conn.open()
                else:
                    await conn.close()
            except SetupError as exc:
                st.failed.append(Failed(ev.k, CHURN, f"connect: {exc}"[:120], due_us))
                return
            st.acked.append(Acked(ev.k, CHURN, self.plan.conv(ev), ev.actor, self.plan.recipients(ev),
                                  due_us, now_us(), warm))

    # --- what arrives -------------------------------------------------------------------------
    def on_frame(self, index: int, frame: Frame, recv_us: int) -> None:
        t = frame.get("t")
        if t == "msg":
            kind = GROUP if str(frame.get("conv", "")).startswith("g:") else DM
            self._message(index, kind, frame.get("body"), frame.get("from"), recv_us)
        elif t == "note":
            if frame.get("kind") == "group":
                self._group_note(frame)
        elif t == "feed":
            item = frame.get("item")
            if isinstance(item, dict):
                self._message(index, POST, item.get("body"), item.get("author"), recv_us)
        elif t == "presence":
            st = self.state
            user = self.user_index.get(str(frame.get("user")))
            if user is None:
                self.foreign += 1
            elif st is None:
                self.stray += 1
            else:
                st.seen.append(PresenceSeen(index, user, frame.get("status") == "online", recv_us))

    def _group_note(self, frame: Frame) -> None:
        """Learn a group's conv from the note its creation put in a member's inbox, when the note
        is of one of this run's groups (its title, and the owner the plan gave it)."""
        g = group_from_title(self.plan.run, frame.get("title"))
        conv = frame.get("conv")
        if g is None or g >= len(self.plan.groups) or not isinstance(conv, str):
            return
        if frame.get("owner") == self.plan.users[self.plan.groups[g][0]]:
            self.group_convs.setdefault(g, conv)

    def _message(self, index: int, kind: str, body: Any, sender: Any, recv_us: int) -> None:
        tag = parse_body(body)
        if tag is None or tag.run != self.plan.run:
            self.foreign += 1
            return
        st = self.state
        if st is None:
            self.stray += 1
            return
        if tag.phase != st.phase:
            st.late += 1
            return
        st.receipts.append(Receipt(tag.k, kind, index, recv_us))
        key = (tag.k, index)
        if key in st.first:
            return
        st.first.add(key)
        if tag.sched_us >= st.warm_end_us and sender != self.plan.users[index]:
            st.hist.record_us(recv_us - tag.sched_us)


def event_loop_name() -> str:
    """uvloop when installed (as uvicorn's servers use it): less client overhead per frame."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run_async(main: Coroutine[Any, Any, T]) -> T:
    if event_loop_name() == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


def process_main(spec_dict: dict[str, Any], end: Any) -> None:
    """Entry point of a load process (multiprocessing, spawn)."""
    from bench.control import PipeChannel

    channel = PipeChannel(end)
    worker = LoadWorker(WorkerSpec.from_dict(spec_dict), channel)
    try:
        run_async(worker.run())
    finally:
        channel.close()
