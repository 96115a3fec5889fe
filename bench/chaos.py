"""Chaos mode (`--chaos`): the `dm` scenario with one fault injected into the real stack per
phase, and every acknowledged message accounted for afterwards.

A fault is injected `--fault-at` seconds into its phase; the phase then goes on at the same rate
until its end, and drains. What each fault reports: acknowledged, delivered, lost (must be 0),
duplicated, failed actions by reason (`unavailable` is an answer; `timeout` with no answer at all
is silence, which the protocol never allows), and the time to recover: from the injection until
the first message after the last disturbed one arrives (below).

The faults act on this machine: the services of PeerNet's own local stack (through the `peernet`
command, `peernet stack down|up SERVICE`, as `peernet stack` started them), the Ray worker
processes of the target's cluster (found by process title under the raylet of its GCS address)
and its `peernet serve` (`peernet upgrade`). The harness drives the server as an operator would,
through the command and the network, and imports none of its modules. External services (a
`PEERNET_*_URL` set) and other hosts cannot be faulted from here.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import psutil

from bench.client import DISCONNECTED, SetupError, now_us
from bench.ledger import Acked, Failed, Receipt
from peernet.serve_process import is_serve_command

# name -> what it does; the order of `--chaos all`.
FAULTS: dict[str, str] = {
    "kafka": "the Kafka broker SIGKILLed during the send storm, then started again",
    "redis": "Redis SIGKILLed, then started again",
    "mongo": "the MongoDB-wire server stopped for --mongo-down seconds, then started again",
    "replica": "one gateway replica's process SIGKILLed; Serve starts a new one",
    "session-shard": "one SessionShard actor's process SIGKILLed; Ray restarts it",
    "feed-shard": "one FeedShard actor's process SIGKILLed; Ray restarts it",
    "presence-shard": "one PresenceShard actor's process SIGKILLed; Ray restarts it",
    "burst": "--burst-factor times the rate for --burst-s seconds",
    "node": "a worker node of the cluster on this machine killed: its raylet and every process "
            "of it SIGKILLed; Ray restarts its actors on the nodes left",
    "upgrade": "`peernet upgrade`: every shard actor restarted in turn, then the gateway's "
               "replicas rolled one at a time",
}
# What `--chaos all` runs: every fault a one-node deployment can take (`node` needs two).
ALL_FAULTS = tuple(f for f in FAULTS if f != "node")
SERVICE_FAULTS = frozenset({"kafka", "redis", "mongo"})
# Process titles Ray gives the actors' worker processes.
ACTOR_TITLES: dict[str, str] = {
    "replica": "ray::ServeReplica:peernet:Gateway",
    "session-shard": "ray::SessionShardActor",
    "feed-shard": "ray::FeedShardActor",
    "presence-shard": "ray::PresenceShardActor",
}
# A delivery slower than this (from its scheduled send) counts as disturbed by the fault.
RECOVERY_BOUND_MS = 1000.0
# How long a killed service or actor may take to come back before the fault reports failure.
RESTART_TIMEOUT_S = 120.0
# Failure reasons that mean the server said something (the client may retry); anything else
# that is a plain timeout means it said nothing.
SILENT = "timeout"


def parse_faults(text: str) -> tuple[str, ...]:
    """`all`, or a comma-separated list of names from FAULTS (in the order given)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return ALL_FAULTS
    unknown = [n for n in names if n not in FAULTS]
    if unknown or not names:
        raise ValueError(f"--chaos takes all or some of {', '.join(FAULTS)}; got {text!r}")
    return tuple(names)


@dataclass
class FaultEvent:
    """What the injector did, and when (wall-clock microseconds, as the load's timestamps)."""

    name: str
    injected_us: int = 0
    repaired_us: int = 0
    detail: str = ""
    error: str = ""
    # mongo: when the projector's consumer lag was back to what it was before the fault
    caught_up_us: int = 0
    catch_up_note: str = ""

    @property
    def repair_s(self) -> float | None:
        if not self.repaired_us or not self.injected_us:
            return None
        return round((self.repaired_us - self.injected_us) / 1e6, 2)

    @property
    def caught_up_s(self) -> float | None:
        if not self.caught_up_us or not self.injected_us:
            return None
        return round((self.caught_up_us - self.injected_us) / 1e6, 2)


@dataclass
class FaultOutcome:
    """One fault's phase, accounted."""

    event: FaultEvent
    acknowledged: int
    failed: dict[str, int]
    expected: int
    delivered: int
    lost: int
    duplicated: int
    recovery_s: float | None
    ok: bool = False
    verdict: str = ""
    memory_peak_mib: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "fault": self.event.name, "what": FAULTS.get(self.event.name, ""),
            "detail": self.event.detail, "injector_error": self.event.error or None,
            "repaired_after_s": self.event.repair_s,
            "projections_caught_up_after_s": self.event.caught_up_s,
            "catch_up_note": self.event.catch_up_note or None, "acknowledged": self.acknowledged,
            "failed": self.failed, "expected_deliveries": self.expected,
            "delivered": self.delivered, "lost": self.lost, "duplicated": self.duplicated,
            "recovery_s": self.recovery_s, "ok": self.ok, "verdict": self.verdict,
            "memory_peak_mib": self.memory_peak_mib,
        }


def recovery_time(acked: Sequence[Acked], failed: Sequence[Failed], receipts: Iterable[Receipt],
                  injected_us: int, bound_ms: float = RECOVERY_BOUND_MS) -> float | None:
    """Seconds from the injection until the service was whole again, or None if it never was
    within the phase.

    Actions scheduled from the injection on are taken in schedule order. One is disturbed when
    it failed, when a recipient never got it, or when its last recipient got it more than
    `bound_ms` after its scheduled time. Recovery is the arrival of the first undisturbed action
    after the last disturbed one (0.0 when none was disturbed); None when the last action of the
    phase was still disturbed.
    """
    first: dict[tuple[int, int], int] = {}
    for r in receipts:
        key = (r.k, r.recipient)
        if key not in first or r.recv_us < first[key]:
            first[key] = r.recv_us
    bound_us = bound_ms * 1000
    # (scheduled, disturbed, arrived)
    timeline: list[tuple[int, bool, int]] = []
    for a in acked:
        if a.sched_us < injected_us:
            continue
        arrivals = [first.get((a.k, rcp)) for rcp in a.recipients]
        if any(t is None for t in arrivals) or not arrivals:
            timeline.append((a.sched_us, True, 0))
            continue
        last = max(t for t in arrivals if t is not None)
        timeline.append((a.sched_us, last - a.sched_us > bound_us, last))
    timeline.extend((f.sched_us, True, 0) for f in failed if f.sched_us >= injected_us)
    timeline.sort(key=lambda t: t[0])
    last_bad = max((i for i, t in enumerate(timeline) if t[1]), default=None)
    if last_bad is None:
        return 0.0
    after = [t for t in timeline[last_bad + 1:] if not t[1]]
    if not after:
        return None
    return round(max(0, after[0][2] - injected_us) / 1e6, 3)


def judge(event: FaultEvent, acked: Sequence[Acked], failed: Sequence[Failed],
          receipts: Sequence[Receipt], expected: int, delivered: int, lost: int,
          duplicated: int) -> FaultOutcome:
    """The fault's figures and verdict: it passes when the injection worked, nothing
    acknowledged was lost, no request went unanswered, and the service recovered in the phase."""
    reasons: dict[str, int] = {}
    for f in failed:
        reasons[f.reason] = reasons.get(f.reason, 0) + 1
    recovery = (recovery_time(acked, failed, receipts, event.injected_us)
                if event.injected_us else None)
    out = FaultOutcome(event, len(acked), reasons, expected, delivered, lost, duplicated, recovery)
    silent = reasons.get(SILENT, 0)
    problems = []
    if event.error:
        problems.append(f"injection failed: {event.error}")
    if lost:
        problems.append(f"{lost} lost")
    if silent:
        problems.append(f"{silent} requests never answered")
    unreachable = reasons.get(DISCONNECTED, 0)
    if unreachable:
        problems.append(f"{unreachable} requests found no server to take them until timeout")
    if recovery is None and not event.error:
        problems.append("not recovered by the end of the phase")
    if event.catch_up_note:
        problems.append(event.catch_up_note)
    out.ok = not problems
    out.verdict = "; ".join(problems) if problems else f"ok: 0 lost, recovered in {recovery:.1f} s"
    return out


# --- finding the target's processes ----------------------------------------------------------


class ProcInfo(NamedTuple):
    pid: int
    title: str
    parent_cmdline: str


def pick_processes(procs: Iterable[ProcInfo], title: str, gcs_address: str) -> list[int]:
    """Pids of the processes titled `title` (a Ray actor's process title, with or without the
    method it is running) whose parent is the raylet of the cluster at `gcs_address`."""
    out = []
    for p in procs:
        head = p.title.split(" ", 1)[0]
        if head != title and not head.startswith(title + "."):
            continue
        if f"--gcs-address={gcs_address}" not in p.parent_cmdline.split():
            continue
        out.append(p.pid)
    return sorted(out)


def _scan() -> list[ProcInfo]:
    # Own Process objects, not process_iter's: that one shares its objects (and their `info`)
    # between threads, and the server probe scans from another thread meanwhile.
    procs = []
    for pid in psutil.pids():
        try:
            proc = psutil.Process(pid)
            cmd = " ".join(proc.cmdline()).strip()
            if not cmd.startswith("ray::"):
                continue
            parent = " ".join(psutil.Process(proc.ppid()).cmdline())
        except psutil.Error:
            continue
        procs.append(ProcInfo(pid, cmd, parent))
    return procs


def actor_pids(fault: str, gcs_address: str) -> list[int]:
    return pick_processes(_scan(), ACTOR_TITLES[fault], gcs_address)


def is_worker_raylet(cmdline: Sequence[str], gcs_address: str) -> bool:
    """A raylet of the cluster at `gcs_address` that is not the head's."""
    return (bool(cmdline) and cmdline[0].endswith("/raylet")
            and f"--gcs-address={gcs_address}" in cmdline and "--head" not in cmdline)


def worker_raylets(gcs_address: str) -> list[int]:
    out = []
    for pid in psutil.pids():
        try:
            if is_worker_raylet(psutil.Process(pid).cmdline(), gcs_address):
                out.append(pid)
        except psutil.Error:
            continue
    return sorted(out)


def serve_driver(gcs_address: str) -> tuple[int, dict[str, str]]:
    """The `peernet serve` process on this machine connected to the cluster's GCS, and its
    environment (in which `peernet upgrade` finds the same state file it keeps)."""
    gcs_port = int(gcs_address.rsplit(":", 1)[1])
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if not is_serve_command(proc.info.get("cmdline") or []):
                continue
            if any(c.raddr and c.raddr.port == gcs_port for c in proc.net_connections("tcp")):
                return proc.pid, proc.environ()
        except psutil.Error:
            continue
    raise SetupError(f"--chaos upgrade: no `peernet serve` of the cluster at {gcs_address} runs "
                     "on this machine")


def actor_counts(gcs_address: str) -> dict[str, int]:
    """How many processes of each PeerNet actor kind the cluster runs on this machine."""
    procs = _scan()
    return {name: len(pick_processes(procs, title, gcs_address)) for name, title in ACTOR_TITLES.items()}


def gcs_address_of(url: str, state_file: Path) -> str:
    """The GCS address of the `peernet serve` answering at `url`, from its state file."""
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        raise SetupError(f"no `peernet serve` state in {state_file}: pass --ray-address") from None
    if str(state.get("url", "")).rstrip("/") != url.rstrip("/"):
        raise SetupError(f"{state_file} describes {state.get('url')}, not {url}: pass --ray-address")
    return str(state["gcs_address"])


# --- the `peernet` command --------------------------------------------------------------------

# `peernet` of the installation the harness runs from: the same interpreter, so no PATH lookup.
PEERNET_COMMAND = (sys.executable, "-m", "cli")


def peernet(*args: str, env: Mapping[str, str] | None = None, check: bool = True) -> str:
    """Run `peernet ARGS` and return what it printed; SetupError with its error output when it
    fails (unless not `check`)."""
    done = subprocess.run([*PEERNET_COMMAND, *args], env=None if env is None else dict(env),
                          capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip()).splitlines()[-3:]
        raise SetupError(f"`peernet {' '.join(args)}` failed ({done.returncode}): {' | '.join(said)}")
    return done.stdout


def stack_pids() -> dict[str, int | None]:
    """The pid of each service of this machine's stack, from `peernet stack status --json`
    (None when it is stopped or external)."""
    out = peernet("stack", "status", "--json", check=False)  # exits 1 when one is unhealthy
    try:
        return {row["name"]: row["pid"] for row in json.loads(out)}
    except (ValueError, KeyError, TypeError):
        raise SetupError(f"`peernet stack status --json` said: {out[:200]!r}") from None


# --- injecting ---------------------------------------------------------------------------------


# The consumer group that writes MongoDB, and how long its catch-up after `mongo` is awaited.
PROJECTIONS_GROUP = "peernet.projections@"
CATCH_UP_TIMEOUT_S = 180.0


def projections_lag(metrics_text: str) -> float | None:
    """The projector's consumer lag summed over partitions, from Prometheus text (None when the
    server exports none)."""
    total, seen = 0.0, False
    for line in metrics_text.splitlines():
        if line.startswith("peernet_kafka_consumer_lag{") and f'group="{PROJECTIONS_GROUP}' in line:
            try:
                total += float(line.rsplit(" ", 1)[1])
            except ValueError:
                continue
            seen = True
    return total if seen else None


class Injector:
    """Injects one fault at a time into the local stack and the target's Ray cluster."""

    def __init__(self, gcs_address: str, mongo_down_s: float, metrics_url: str = "") -> None:
        self.gcs_address = gcs_address
        self.mongo_down_s = mongo_down_s
        self.metrics_url = metrics_url

    async def _projections_lag(self) -> float | None:
        try:
            async with httpx.AsyncClient(timeout=5.0) as client:
                resp = await client.get(self.metrics_url)
            return projections_lag(resp.text) if resp.status_code == 200 else None
        except httpx.HTTPError:
            return None

    async def _await_catch_up(self, event: FaultEvent, before: float | None) -> None:
        """mongo: wait until the projector's lag is back to where it was before the fault
        (or 10 records, whichever is more: under load it never reads 0 for long)."""
        if not self.metrics_url or before is None:
            event.catch_up_note = "projector lag not readable: catch-up not measured"
            return
        bound = max(10.0, before)
        deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
        while time.monotonic() < deadline:
            lag = await self._projections_lag()
            if lag is not None and lag <= bound:
                event.caught_up_us = now_us()
                return
            await asyncio.sleep(0.5)
        event.catch_up_note = f"projections not caught up within {CATCH_UP_TIMEOUT_S:.0f} s"

    def check(self, faults: Sequence[str]) -> None:
        """Fail before the run, not in the middle, when a fault cannot be injected here."""
        pids = stack_pids() if SERVICE_FAULTS.intersection(faults) else {}
        for name in faults:
            if name in SERVICE_FAULTS and pids.get(name) is None:
                raise SetupError(f"--chaos {name}: no {name} of PeerNet's local stack runs here "
                                 "(chaos mode faults `peernet stack` services only)")
            if name in ACTOR_TITLES and not actor_pids(name, self.gcs_address):
                raise SetupError(f"--chaos {name}: no {ACTOR_TITLES[name]} process of the Ray "
                                 f"cluster at {self.gcs_address} on this machine")
            if name == "upgrade":
                serve_driver(self.gcs_address)  # raises when there is none here
            if name == "node" and not worker_raylets(self.gcs_address):
                raise SetupError(f"--chaos node: the Ray cluster at {self.gcs_address} has no "
                                 "worker node on this machine to kill")

    async def inject(self, name: str, at_us: int) -> FaultEvent:
        """Wait until `at_us`, inject `name`, and return once it is repaired (or has failed)."""
        event = FaultEvent(name)
        await asyncio.sleep(max(0.0, (at_us - now_us()) / 1e6))
        try:
            if name in SERVICE_FAULTS:
                await self._service(name, event)
            elif name in ACTOR_TITLES:
                await self._actor(name, event)
            elif name == "node":
                await self._node(event)
            elif name == "upgrade":
                await self._upgrade(event)
            else:  # burst: the schedule carries it
                event.injected_us = now_us()
                event.repaired_us = event.injected_us
                event.detail = "rate raised in the schedule"
        except Exception as exc:  # reported as the fault's failure, never a crash of the run
            event.error = f"{type(exc).__name__}: {exc}"[:300]
        return event

    async def _service(self, name: str, event: FaultEvent) -> None:
        pid = (await asyncio.to_thread(stack_pids)).get(name)
        if pid is None:
            raise SetupError(f"{name} is not running")
        before = await self._projections_lag() if name == "mongo" else None
        event.injected_us = now_us()
        if name == "mongo":
            await asyncio.to_thread(peernet, "stack", "down", name)
            event.detail = f"pid {pid} stopped (SIGTERM) for {self.mongo_down_s:g} s"
            await asyncio.sleep(self.mongo_down_s)
        else:
            await asyncio.to_thread(peernet, "stack", "down", name, "--kill")
            event.detail = f"pid {pid} SIGKILLed"
        await asyncio.to_thread(peernet, "stack", "up", name, "--timeout", str(RESTART_TIMEOUT_S))
        event.repaired_us = now_us()
        if name == "mongo":
            await self._await_catch_up(event, before)

    async def _actor(self, name: str, event: FaultEvent) -> None:
        before = await asyncio.to_thread(actor_pids, name, self.gcs_address)
        if not before:
            raise SetupError(f"no {ACTOR_TITLES[name]} process to kill")
        victim = before[0]
        event.injected_us = now_us()
        os.kill(victim, signal.SIGKILL)
        event.detail = f"pid {victim} of {len(before)} SIGKILLed"
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while time.monotonic() < deadline:
            now = await asyncio.to_thread(actor_pids, name, self.gcs_address)
            if len(now) >= len(before) and victim not in now:
                event.repaired_us = now_us()
                return
            await asyncio.sleep(0.2)
        raise SetupError(f"no new {ACTOR_TITLES[name]} process within {RESTART_TIMEOUT_S:.0f} s")

    async def _upgrade(self, event: FaultEvent) -> None:
        """What `peernet upgrade` does, to the serve process of this cluster; repaired once it
        reports the upgrade done."""
        pid, env = await asyncio.to_thread(serve_driver, self.gcs_address)
        event.injected_us = now_us()
        # Fails (SetupError, with the upgrade's error) unless the upgrade is done and ok.
        out = await asyncio.to_thread(peernet, "upgrade", "--json", env=env)
        try:
            record: dict[str, Any] = json.loads(out)
        except ValueError:
            raise SetupError(f"`peernet upgrade --json` said: {out[-300:]!r}") from None
        event.repaired_us = now_us()
        event.detail = (f"serve pid {pid}: {len(record['actors_restarted'])} actors restarted, "
                        f"gateway rolled to {record['gateway_version']} in {record['took_s']} s")

    async def _node(self, event: FaultEvent) -> None:
        """Kill a worker node as a crashed host would go: its raylet and every process under
        it at once. Repaired once the cluster runs as many of each shard actor as before, none
        on it, and a gateway replica; the gateway's lost replicas come back only where Serve's
        `max_replicas_per_node` leaves room (the count after is in the detail)."""
        raylets = await asyncio.to_thread(worker_raylets, self.gcs_address)
        if not raylets:
            raise SetupError("no worker node to kill")
        before = await asyncio.to_thread(actor_counts, self.gcs_address)
        victim = psutil.Process(raylets[0])
        doomed = [victim, *victim.children(recursive=True)]
        gone = {p.pid for p in doomed}
        on_it = {k: len(pick_processes([i for i in _scan() if i.pid in gone], t, self.gcs_address))
                 for k, t in ACTOR_TITLES.items()}
        event.injected_us = now_us()
        for proc in reversed(doomed):
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        event.detail = (f"raylet {victim.pid} and {len(doomed) - 1} processes SIGKILLed ("
                        + ", ".join(f"{n} {k}" for k, n in on_it.items() if n) + ")")
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while time.monotonic() < deadline:
            now = await asyncio.to_thread(actor_counts, self.gcs_address)
            if now["replica"] >= 1 and all(now[k] >= before[k] for k in before if k != "replica"):
                event.repaired_us = now_us()
                event.detail += f"; gateway replicas after: {now['replica']} of {before['replica']}"
                return
            await asyncio.sleep(0.25)
        raise SetupError(f"the killed node's actors were not all back within "
                         f"{RESTART_TIMEOUT_S:.0f} s: {now} against {before} before")
