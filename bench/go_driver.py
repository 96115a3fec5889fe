"""The Go DM driver (bench/go/dmdriver) as the `dm` scenario's load process (`--driver go`): built
on first use with the machine's Go, started as a subprocess and spoken to over its stdin/stdout.

This side keeps what the Python workers keep: the plan, the schedule (streamed to the driver as
it is computed) and the ledger's records. The driver connects the users, sends each DM at its
due time and reports raw events (send lag, `ok` time or failure reason, each `msg` received);
`GoDriverChannel` turns them into the worker messages of bench/worker.py, so the coordinator and
bench/ledger.py account for them exactly as for the Python load processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO

import msgpack

from bench.centrifugo import home_dir
from bench.client import SetupError
from bench.control import Message
from bench.latency import LatencyHistogram
from bench.params import BenchParams
from bench.peernet_client import http_url, ws_url
from bench.plan import DM, Event, Plan, schedule

SOURCE = Path(__file__).resolve().parent / "go" / "dmdriver"
SOURCE_FILES = ("main.go", "go.mod", "go.sum")
BUILD_TIMEOUT_S = 600.0
# Scheduled DMs per `events` message: small enough that the first arrive at once, large enough
# that the messages cost little.
CHUNK = 2000
_LEN = struct.Struct(">I")


def source_digest() -> str:
    h = hashlib.sha256()
    for name in SOURCE_FILES:
        h.update(name.encode() + b"\0" + (SOURCE / name).read_bytes())
    return h.hexdigest()[:12]


def binary_path(home: Path | None = None) -> Path:
    """Where the driver of these sources is built: a new build whenever they change."""
    return (home or home_dir()) / "dmdriver" / source_digest() / "dmdriver"


async def ensure_built(say: Callable[[str], None], home: Path | None = None) -> Path:
    return await asyncio.to_thread(build, say, home)


def build(say: Callable[[str], None], home: Path | None = None) -> Path:
    """Build the driver unless this version of it is built already; return its path. The build
    goes to a staging file renamed into place under a lock, as Centrifugo's install does."""
    binary = binary_path(home)
    if binary.is_file():
        return binary
    go = shutil.which("go")
    if go is None:
        raise SetupError("--driver go builds bench/go/dmdriver with the Go toolchain, and `go` is not on "
                         "PATH: install Go (1.26 or newer) or use --driver python")
    binary.parent.mkdir(parents=True, exist_ok=True)
    with open(binary.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not binary.is_file():  # else another harness built it meanwhile
                say(f"[go driver] building bench/go/dmdriver into {binary.parent} (first use only)")
                staging = binary.with_suffix(".staging")
                # -C: the driver is a module of its own; -trimpath: no build paths in the binary.
                proc = subprocess.run([go, "build", "-C", str(SOURCE), "-trimpath", "-o", str(staging), "."],
                                      capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
                if proc.returncode != 0:
                    raise SetupError(f"go build of bench/go/dmdriver failed:\n{proc.stdout}{proc.stderr}")
                staging.replace(binary)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return binary


def _spawn(binary: Path) -> subprocess.Popen[bytes]:
    # stderr is inherited: the driver writes there only when it cannot go on.
    return subprocess.Popen([str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)


class DriverProcess:
    """The driver's subprocess, with the handle a multiprocessing load process has."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen

    @property
    def pid(self) -> int:
        return self.popen.pid

    def join(self, timeout: float | None = None) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout)
        if self.popen.poll() is not None:
            for pipe in (self.popen.stdin, self.popen.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def terminate(self) -> None:
        self.popen.terminate()


class GoDriverChannel:
    """The coordinator's channel to the driver: worker messages in, worker messages out.

    Blocking pipe I/O runs in a thread (as PipeChannel's does), so the event loop never waits
    on the driver."""

    def __init__(self, popen: subprocess.Popen[bytes], plan: Plan, params: BenchParams) -> None:
        assert popen.stdin is not None and popen.stdout is not None
        self._in: IO[bytes] = popen.stdout
        self._out: IO[bytes] = popen.stdin
        self._popen = popen
        self.plan = plan
        self.params = params
        self._write_lock = asyncio.Lock()
        self._events: list[Event] = []
        self._t0_us = 0
        self._warm_end_us = 0
        self._hist = LatencyHistogram()
        self._streaming: asyncio.Task[None] | None = None
        self._convs: dict[tuple[int, int], str] = {}

    async def setup(self) -> None:
        p, plan = self.params, self.plan
        https = [http_url(u) for u in p.urls]
        await self._write({
            "op": "setup", "http_urls": https, "ws_urls": [ws_url(u) for u in https],
            "users": list(plan.users), "connect": list(plan.always_connected), "run": plan.run,
            "size": p.size, "connect_concurrency": p.connect_concurrency,
            "request_timeout": p.request_timeout,
        })

    # --- coordinator -> driver ----------------------------------------------------------------
    async def send(self, msg: Message) -> None:
        op = msg.get("op")
        if op == "phase":
            await self._phase(msg)
        elif op == "expect":
            # One driver owns every user, so the DMs it saw acknowledged are all that is owed.
            await self._write({"op": "expect", "deadline_us": int(msg["deadline_us"])})
        else:
            await self._write({"op": "stop"})

    async def _phase(self, cmd: Message) -> None:
        p = self.params
        self._t0_us = int(cmd["t0_us"])
        self._warm_end_us = self._t0_us + int(p.warmup * 1e6)
        self._events = []
        self._hist = LatencyHistogram()
        await self._write({"op": "phase", "phase": int(cmd["phase"]), "t0_us": self._t0_us,
                           "warm_end_us": self._warm_end_us})
        self._streaming = asyncio.create_task(self._stream(cmd), name="go-driver-schedule")
        self._streaming.add_done_callback(self._streamed)

    async def _stream(self, cmd: Message) -> None:
        """The phase's schedule (bench.plan.schedule, as every worker computes it), sent on in
        chunks as it is computed: the driver starts on the first while the rest follow."""
        p = self.params
        burst = cmd.get("burst")
        events = self._events
        start = 0
        for ev in schedule(self.plan, p.seed, int(cmd["phase"]), float(cmd["rate"]), p.warmup + p.duration,
                           burst=tuple(burst) if burst else None):
            if ev.kind != DM:
                raise ValueError(f"the Go driver sends DMs only, not {ev.kind!r}")
            events.append(ev)
            if len(events) - start == CHUNK:
                await self._chunk(events[start:])
                start = len(events)
        if len(events) > start:
            await self._chunk(events[start:])
        await self._write({"op": "events_end"})

    async def _chunk(self, evs: list[Event]) -> None:
        await self._write({"op": "events", "at": [e.at_us for e in evs], "actor": [e.actor for e in evs],
                           "target": [e.target for e in evs]})

    def _streamed(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # The driver would wait for the rest of its schedule: end it, so the coordinator
            # hears that its load process is gone instead of waiting out its timeouts.
            print(f"go driver: streaming the schedule failed: {task.exception()!r}", file=sys.stderr)
            with contextlib.suppress(OSError):
                self._popen.terminate()

    async def _write(self, msg: Message) -> None:
        data = msgpack.packb(msg, use_bin_type=True)
        async with self._write_lock:
            await asyncio.to_thread(self._write_blocking, _LEN.pack(len(data)) + data)

    def _write_blocking(self, data: bytes) -> None:
        self._out.write(data)
        self._out.flush()

    # --- driver -> coordinator ----------------------------------------------------------------
    async def recv(self) -> Message:
        msg = await asyncio.to_thread(self._read_blocking)
        op = msg.get("op")
        if op == "progress":
            return self._progress(msg)
        if op == "sent":
            return self._sent(msg)
        if op == "result":
            return self._result(msg)
        return msg

    def _read_blocking(self) -> Message:
        head = self._in.read(_LEN.size)
        if len(head) < _LEN.size:
            raise EOFError("the Go driver exited")
        (n,) = _LEN.unpack(head)
        data = self._in.read(n)
        if len(data) < n:
            raise EOFError("the Go driver exited mid-message")
        msg = msgpack.unpackb(data, raw=False, strict_map_key=False)
        if not isinstance(msg, dict):
            raise TypeError("control message is not a map")
        return msg

    def _progress(self, msg: Message) -> Message:
        for us in msg.pop("lat_us") or ():
            self._hist.record_us(us)
        return {**msg, "hist": self._hist.encode()}

    def _conv(self, ev: Event) -> str:
        key = (ev.actor, ev.target)
        conv = self._convs.get(key)
        if conv is None:
            conv = self._convs[key] = self.plan.conv(ev)
        return conv

    def _sent(self, msg: Message) -> Message:
        """Each acknowledged or failed DM as worker.LoadWorker._act records it."""
        events, t0, warm_end, plan = self._events, self._t0_us, self._warm_end_us, self.plan
        acked = []
        for k, ack_us in zip(msg["acked_k"] or (), msg["acked_us"] or (), strict=True):
            ev = events[k]
            due = t0 + ev.at_us
            acked.append([k, DM, self._conv(ev), ev.actor, list(plan.recipients(ev)), due, ack_us,
                          due < warm_end])
        failed = [[k, DM, reason, t0 + events[k].at_us]
                  for k, reason in zip(msg["failed_k"] or (), msg["failed_reason"] or (), strict=True)]
        lag = LatencyHistogram()
        for us in msg["lag_us"] or ():
            lag.record_us(us)
        return {"op": "sent", "acked": acked, "failed": failed, "transitions": [], "sent": msg["sent"],
                "send_lag": lag.encode()}

    def _result(self, msg: Message) -> Message:
        receipts = [[k, DM, idx, us] for k, idx, us in zip(msg.pop("recv_k") or (), msg.pop("recv_idx") or (),
                                                            msg.pop("recv_us") or (), strict=True)]
        msg.pop("recv_seq", None)  # what the driver's inbox-gap count is made of; not accounted here
        return {**msg, "receipts": receipts, "seen": []}


async def start_go_driver(params: BenchParams, plan: Plan,
                          binary: Path) -> tuple[GoDriverChannel, DriverProcess]:
    """Start the driver and hand it the users; it answers `ready` (or `failed`) once connected."""
    popen = await asyncio.to_thread(_spawn, binary)
    channel = GoDriverChannel(popen, plan, params)
    try:
        await channel.setup()
    except OSError as exc:
        popen.kill()
        raise SetupError(f"the Go driver did not start: {exc}") from None
    return channel, DriverProcess(popen)
