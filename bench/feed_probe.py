"""An open-loop home-feed READ probe: `python -m bench.feed_probe --url URL`.

Setup (not timed): fresh users (a random tag per run); every reader follows `--follows` of the
`--authors` (each `ok` awaited), every author posts `--posts` times (each `ok` awaited), then
the probe waits until each reader's first page holds what it should (or `--settle-timeout`).

Load: `--rate` reads per second in total, round-robin over the readers. The j-th read is
scheduled at t0 + j / rate and sent then, whatever happened to earlier reads (never waiting for
a reply first), and its latency runs from its SCHEDULED time to the arrival of its `feed_page`,
so a server stall cannot slow the load and hide itself (coordinated omission). `--via ws` sends
`{"t":"feed","rid":j}` on the reader's WebSocket; `--via http` sends `GET /v1/feed` with the
reader's bearer token through one shared HTTP client (aiohttp; `--http-client httpx` for httpx,
which costs several times the client CPU per request). Reads scheduled in the first `--warmup`
seconds are sent and accounted but not timed.

Every measured read ends exactly once: answered (a `feed_page`), or failed (an error reply, an
HTTP status other than 200, a timeout, a lost connection). Failures are counted, never dropped
and never retried; any failed read makes the exit status 1.

One module, longer than the others: it is a program of its own, and its parts (the open-loop
schedule, the read ledger, the set-up, the three readers, the results files) serve this probe
alone, are read top to bottom in the order a run uses them, and are tested through its names
(tests/bench/test_feed_probe.py); bench/go/feedprobe is the same probe in Go.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import math
import re
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import httpx
import websockets
from websockets.asyncio.client import ClientConnection

from bench.latency import LatencyHistogram
from peernet.codec import decode_frame, encode_frame
from peernet.errors import PeerNetError

Frame = dict[str, Any]

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
PROGRESS_INTERVAL_S = 5.0
# Between the end of the setup and the first scheduled read.
LEAD_S = 0.2
# The server's default per-connection frame rate (PEERNET_RATE_PER_S): more reads per second on
# one reader's WebSocket are refused with `rate_limited`.
SERVER_RATE_PER_S = 200.0
# Send lag p99 up to this is the event loop's timer resolution (about 1 ms), not a generator
# falling behind; it is still part of every latency (measured from the schedule).
GENERATOR_FLOOR_MS = 2.0
MAX_PAGE = 100
DEFAULT_PAGE = 20

MARKDOWN_HEADER = ("| via | readers | rate/s | achieved/s | count | errors | p50 ms | p90 ms | p99 ms "
                   "| p99.9 ms | max ms | mean ms | send lag p99 ms |\n"
                   "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def now_ns() -> int:
    return time.monotonic_ns()


class SetupError(Exception):
    """The target cannot be driven (unreachable, no dev tokens, a follow or post refused)."""


class ConnectionLost(Exception):
    """The reader's WebSocket closed while a reply was awaited."""


# --- parameters ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeedProbeParams:
    url: str = "http://127.0.0.1:8000"
    readers: int = 100
    authors: int = 20
    follows: int = 10
    posts: int = 5
    rate: float = 1000.0
    duration: float = 20.0
    warmup: float = 3.0
    via: str = "ws"
    http_client: str = "aiohttp"
    limit: int | None = None  # None: the server's default page (20)
    json_frames: bool = False
    timeout: float = 10.0
    connections: int = 100
    setup_concurrency: int = 16
    settle_timeout: float = 30.0
    bound_ms: float = 10.0
    run_tag: str | None = None

    def problems(self) -> list[str]:
        out = []
        for name in ("readers", "authors", "follows", "posts", "connections", "setup_concurrency"):
            if getattr(self, name) < 1:
                out.append(f"--{name.replace('_', '-')} must be at least 1")
        if self.follows > self.authors:
            out.append("--follows cannot exceed --authors (each reader follows distinct authors)")
        if self.rate <= 0 or self.duration <= 0 or self.warmup < 0 or self.timeout <= 0:
            out.append("--rate, --duration and --timeout must be positive, --warmup not negative")
        if self.via not in ("ws", "http"):
            out.append("--via must be ws or http")
        if self.http_client not in ("aiohttp", "httpx"):
            out.append("--http-client must be aiohttp or httpx")
        if self.limit is not None and not 1 <= self.limit <= MAX_PAGE:
            out.append(f"--limit must be from 1 to {MAX_PAGE}")
        if self.run_tag is not None and re.fullmatch(r"[a-z0-9]{1,12}", self.run_tag) is None:
            out.append("--run-tag must be at most 12 lowercase letters or digits")
        return out

    def warnings(self) -> list[str]:
        out = []
        per_reader = self.rate / self.readers
        if self.via == "ws" and per_reader > SERVER_RATE_PER_S * 0.75:
            out.append(f"{per_reader:.0f} reads/s per reader's WebSocket is near or over the server's "
                       f"default frame rate per connection ({SERVER_RATE_PER_S:.0f}/s): add --readers")
        if self.via == "ws" and self.readers / self.rate > 20:
            out.append(f"each reader reads only every {self.readers / self.rate:.0f} s: the server "
                       "closes a connection silent for 2 x heartbeat (50 s by default)")
        return out

    @property
    def expected_items(self) -> int:
        """Items on each reader's first page once the posts are in its feed."""
        return min(self.follows * self.posts, self.limit or DEFAULT_PAGE)


# --- the schedule and the accounting (pure) -----------------------------------------------------


def _ceil(x: float) -> int:
    return math.ceil(x - 1e-9)  # 1000 * 0.3 is 300.00000000000006, and means 300


@dataclass(frozen=True)
class Schedule:
    """Read j is due at t0 + j / rate on reader j mod readers; reads due before `warmup`
    seconds are warm-up, the rest (up to `warmup + duration`, exclusive) are measured."""

    rate: float
    warmup: float
    duration: float
    readers: int

    @property
    def total(self) -> int:
        return _ceil(self.rate * (self.warmup + self.duration))

    @property
    def first_measured(self) -> int:
        return _ceil(self.rate * self.warmup)

    @property
    def measured(self) -> int:
        return self.total - self.first_measured

    def offset_ns(self, j: int) -> int:
        return round(j * 1e9 / self.rate)

    def reader(self, j: int) -> int:
        return j % self.readers

    def is_measured(self, j: int) -> bool:
        return j >= self.first_measured


class ReadLedger:
    """Every read's outcome, exactly once; latencies of measured reads from their due time."""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self.t0_ns = 0
        self.latency = LatencyHistogram()
        self.send_lag = LatencyHistogram()
        self.recent = LatencyHistogram()  # every answered read since the last progress line
        self.dispatched = 0
        self.sent = 0
        self.ok = 0
        self.errors: Counter[str] = Counter()
        self.warmup_ok = 0
        self.warmup_errors: Counter[str] = Counter()
        self.late = 0  # replies that came after their read was concluded (timed out)
        self.items = 0
        self.empty_pages = 0
        self.last_arrival_ns = 0
        self._open: set[int] = set()

    def start(self, t0_ns: int) -> None:
        self.t0_ns = t0_ns

    def due_ns(self, j: int) -> int:
        return self.t0_ns + self.schedule.offset_ns(j)

    def dispatch(self, j: int) -> None:
        self._open.add(j)
        self.dispatched += 1

    def mark_sent(self, j: int, sent_ns: int) -> None:
        self.sent += 1
        if self.schedule.is_measured(j):
            self.send_lag.record_us((sent_ns - self.due_ns(j)) // 1000)

    def answered(self, j: int, arrival_ns: int, items: int) -> bool:
        """A `feed_page` for read j; False when j was already concluded (a late reply)."""
        if j not in self._open:
            self.late += 1
            return False
        self._open.discard(j)
        us = (arrival_ns - self.due_ns(j)) // 1000
        self.recent.record_us(us)
        if not self.schedule.is_measured(j):
            self.warmup_ok += 1
            return True
        self.ok += 1
        self.latency.record_us(us)
        self.items += items
        self.empty_pages += items == 0
        self.last_arrival_ns = max(self.last_arrival_ns, arrival_ns)
        return True

    def failed(self, j: int, reason: str) -> bool:
        if j not in self._open:
            return False
        self._open.discard(j)
        (self.errors if self.schedule.is_measured(j) else self.warmup_errors)[reason] += 1
        return True

    @property
    def in_flight(self) -> int:
        return len(self._open)

    @property
    def failures(self) -> int:
        return sum(self.errors.values()) + sum(self.warmup_errors.values())

    def achieved_rate(self) -> float:
        """Measured reads answered per second over the measured window (the warm-up's end to
        `warmup + duration`), stretched to the last measured reply when that came later."""
        s = self.schedule
        start = self.t0_ns + round(s.warmup * 1e9)
        end = max(self.t0_ns + round((s.warmup + s.duration) * 1e9), self.last_arrival_ns)
        return self.ok / ((end - start) / 1e9) if self.ok else 0.0

    def summary(self) -> dict[str, Any]:
        s = self.schedule
        return {
            "scheduled": s.total, "measured": s.measured, "sent": self.sent,
            "answered": self.ok, "errors": sum(self.errors.values()),
            "errors_by_reason": dict(sorted(self.errors.items())),
            "warmup": {"reads": s.first_measured, "answered": self.warmup_ok,
                       "errors": sum(self.warmup_errors.values()),
                       "errors_by_reason": dict(sorted(self.warmup_errors.items()))},
            "late_replies": self.late, "unconcluded": self.in_flight,
            "items_per_page_mean": round(self.items / self.ok, 2) if self.ok else 0.0,
            "empty_pages": self.empty_pages,
            "achieved_rate": round(self.achieved_rate(), 1),
        }


def progress_line(ledger: ReadLedger, elapsed_s: float) -> str:
    """One line for the operator; takes (and resets) the recent histogram."""
    s = ledger.schedule
    phase = "warm-up" if elapsed_s < s.warmup else "measuring"
    recent, ledger.recent = ledger.recent, LatencyHistogram()
    return (f"feed probe {elapsed_s:5.1f}s {phase}: sent {ledger.sent}/{s.total}, answered "
            f"{ledger.ok + ledger.warmup_ok}, errors {ledger.failures}, in flight {ledger.in_flight}, "
            f"p99 {recent.percentile_ms(99.0):.2f} ms over the last {recent.count} replies, "
            f"send lag p99 {ledger.send_lag.percentile_ms(99.0):.2f} ms")


ReadFn = Callable[[int], Awaitable[None]]


async def run_load(ledger: ReadLedger, read: ReadFn, *, progress: TextIO | None = None,
                   progress_every: float = PROGRESS_INTERVAL_S, lead_s: float = LEAD_S) -> None:
    """Start read(j) at each read's due time without waiting for earlier reads, then wait for
    every read to conclude. `read` must conclude its read in the ledger (answered or failed)."""
    schedule = ledger.schedule
    t0 = now_ns() + int(lead_s * 1e9)
    ledger.start(t0)
    inflight: set[asyncio.Task[None]] = set()

    async def report() -> None:
        for k in itertools.count(1):
            await asyncio.sleep(max(0.0, (t0 + k * progress_every * 1e9 - now_ns()) / 1e9))
            if progress is not None:
                progress.write(progress_line(ledger, (now_ns() - t0) / 1e9) + "\n")
                progress.flush()

    async def guarded(j: int) -> None:
        try:
            await read(j)
        except Exception as exc:  # a bug or an unexpected failure still concludes the read
            ledger.failed(j, type(exc).__name__)
        finally:
            ledger.failed(j, "unconcluded")  # no-op when the read concluded itself

    reporter = asyncio.create_task(report())
    try:
        unyielded = 0
        for j in range(schedule.total):
            due = t0 + schedule.offset_ns(j)
            # Never early: a timer may fire a little before its time, so sleep until it is due.
            while (wait := due - now_ns()) > 0:
                await asyncio.sleep(wait / 1e9)
                unyielded = 0
            if unyielded >= 50:  # behind schedule: let replies in, or they queue up unmeasured
                await asyncio.sleep(0)
                unyielded = 0
            unyielded += 1
            ledger.dispatch(j)
            task = asyncio.create_task(guarded(j))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
        if inflight:
            await asyncio.gather(*list(inflight))
    finally:
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
        for task in list(inflight):
            task.cancel()


# --- transports ---------------------------------------------------------------------------------


class Peer:
    """One WebSocket past its `welcome`, with replies matched to requests by `rid`."""

    def __init__(self, ws: ClientConnection, binary: bool) -> None:
        self.ws = ws
        self.binary = binary
        self.pending: dict[Any, asyncio.Future[tuple[Frame, int]]] = {}
        self.late = 0
        self.other = 0
        self._rids = itertools.count(1)
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, ws_url: str, token: str, binary: bool, timeout: float) -> Peer:
        try:
            async with asyncio.timeout(timeout):
                ws = await websockets.connect(ws_url, ping_interval=None, compression=None,
                                              max_size=None, open_timeout=timeout)
                await ws.send(encode_frame({"t": "hello", "token": token}, binary))
                while True:
                    frame = decode_frame(await ws.recv())
                    if frame.get("t") == "welcome":
                        break
                    if frame.get("t") == "error":
                        raise SetupError(f"hello refused: {frame.get('code')}: {frame.get('message')}")
        except (OSError, TimeoutError, websockets.WebSocketException) as exc:
            raise SetupError(f"cannot connect to {ws_url}: {type(exc).__name__}: {exc}") from None
        return cls(ws, binary)

    async def _read(self) -> None:
        try:
            async for data in self.ws:
                arrival = now_ns()
                try:
                    frame = decode_frame(data)
                except PeerNetError:
                    self.other += 1
                    continue
                fut = self.pending.pop(frame.get("rid"), None) if "rid" in frame else None
                if fut is None:
                    if "rid" in frame:
                        self.late += 1
                    else:
                        self.other += 1  # feed pushes, notes
                elif not fut.done():
                    fut.set_result((frame, arrival))
        except websockets.ConnectionClosed:
            pass
        finally:
            pending, self.pending = self.pending, {}
            for fut in pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionLost())

    def expect(self, rid: Any) -> asyncio.Future[tuple[Frame, int]]:
        fut: asyncio.Future[tuple[Frame, int]] = asyncio.get_running_loop().create_future()
        if self._reader.done():
            fut.set_exception(ConnectionLost())
        else:
            self.pending[rid] = fut
        return fut

    def forget(self, rid: Any) -> None:
        fut = self.pending.pop(rid, None)
        if fut is not None and not fut.done():
            fut.cancel()

    async def send(self, frame: Frame) -> None:
        await self.ws.send(encode_frame(frame, self.binary))

    async def request(self, frame: Frame, timeout: float) -> Frame:
        """A setup request: the reply frame; SetupError for an error reply or no reply."""
        rid = f"s{next(self._rids)}"
        fut = self.expect(rid)
        try:
            async with asyncio.timeout(timeout):
                await self.send({**frame, "rid": rid})
                reply, _ = await fut
        except (TimeoutError, ConnectionLost, websockets.ConnectionClosed) as exc:
            raise SetupError(f"{frame['t']!r}: no reply ({type(exc).__name__})") from None
        finally:
            self.forget(rid)
        if reply.get("t") == "error":
            raise SetupError(f"{frame['t']!r} refused: {reply.get('code')}: {reply.get('message')}")
        return reply

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader


def ws_url_of(url: str) -> str:
    return url.rstrip("/").replace("http", "ws", 1) + "/v1/ws"


@dataclass
class Setup:
    tag: str
    readers: list[str]
    authors: list[str]
    tokens: dict[str, str]
    peers: list[Peer]  # the readers' connections, in reader order
    seconds: float = 0.0
    items_at_start: list[int] | None = None


def followed(reader: int, params: FeedProbeParams) -> list[int]:
    """The authors reader `reader` follows: `follows` consecutive ones, so each author has
    about readers * follows / authors followers."""
    return [(reader + k) % params.authors for k in range(params.follows)]


async def setup(params: FeedProbeParams, http: httpx.AsyncClient, log: TextIO) -> Setup:
    started = time.monotonic()
    tag = params.run_tag or uuid.uuid4().hex[:8]
    readers = [f"fr{tag}_{i}" for i in range(params.readers)]
    authors = [f"fa{tag}_{i}" for i in range(params.authors)]
    sem = asyncio.Semaphore(params.setup_concurrency)
    binary = not params.json_frames
    ws_url = ws_url_of(params.url)

    async def token(user: str) -> tuple[str, str]:
        async with sem:
            try:
                reply = await http.post("/v1/dev/token", json={"user": user})
            except httpx.HTTPError as exc:
                raise SetupError(f"cannot reach {params.url}: {type(exc).__name__}: {exc}") from None
            if reply.status_code != 200:
                raise SetupError(f"POST /v1/dev/token: {reply.status_code} {reply.text[:200]} "
                                 "(is the server running with dev tokens?)")
            return user, str(reply.json()["token"])

    tokens = dict(await asyncio.gather(*(token(u) for u in readers + authors)))

    async def connect(user: str) -> Peer:
        async with sem:
            return await Peer.open(ws_url, tokens[user], binary, params.timeout)

    peers: list[Peer] = []
    author_peers: list[Peer] = []
    try:
        await _connect_all(peers, [connect(u) for u in readers])
        await _connect_all(author_peers, [connect(u) for u in authors])

        async def ask(peer: Peer, frame: Frame) -> Frame:
            async with sem:
                return await peer.request(frame, params.timeout)

        await asyncio.gather(*(ask(peers[i], {"t": "follow", "user": authors[a]})
                               for i in range(params.readers) for a in followed(i, params)))
        log.write(f"feed probe: {params.readers} readers follow {params.follows} of {params.authors} "
                  f"authors each\n")
        await asyncio.gather(*(ask(author_peers[a], {"t": "post", "body": f"feed probe {tag} post {k}"})
                               for k in range(params.posts) for a in range(params.authors)))
        log.write(f"feed probe: {params.authors * params.posts} posts acknowledged; waiting for the "
                  f"feeds (up to {params.settle_timeout:g} s)\n")
        log.flush()
        items = await settle(params, peers, ask)
    except BaseException:
        await asyncio.gather(*(p.close() for p in peers + author_peers))
        raise
    await asyncio.gather(*(p.close() for p in author_peers))
    short = sum(1 for n in items if n < params.expected_items)
    if short:
        log.write(f"feed probe: WARNING {short} of {params.readers} readers' first page had fewer than "
                  f"{params.expected_items} items after {params.settle_timeout:g} s "
                  f"(min {min(items)}); measuring anyway\n")
    return Setup(tag, readers, authors, tokens, peers, round(time.monotonic() - started, 2), items)


async def _connect_all(into: list[Peer], opening: list[Awaitable[Peer]]) -> None:
    """Every connection that opened goes into `into` (to be closed), even when others failed."""
    results = await asyncio.gather(*opening, return_exceptions=True)
    into.extend(r for r in results if isinstance(r, Peer))
    for r in results:
        if isinstance(r, BaseException):
            raise r


async def settle(params: FeedProbeParams, peers: list[Peer],
                 ask: Callable[[Peer, Frame], Awaitable[Frame]]) -> list[int]:
    """Each reader's first-page size once it holds the expected items, or at the deadline.
    Errors (the feed not readable yet) are retried until the deadline."""
    deadline = time.monotonic() + params.settle_timeout
    frame: Frame = {"t": "feed"} if params.limit is None else {"t": "feed", "limit": params.limit}

    async def one(peer: Peer) -> int:
        n = 0
        while True:
            with contextlib.suppress(SetupError):
                n = len((await ask(peer, frame)).get("items") or [])
            if n >= params.expected_items or time.monotonic() >= deadline:
                return n
            await asyncio.sleep(0.2)

    return list(await asyncio.gather(*(one(p) for p in peers)))


def ws_reader(params: FeedProbeParams, ledger: ReadLedger, peers: list[Peer]) -> ReadFn:
    """A read over the reader's WebSocket: `{"t":"feed","rid":j}`."""
    extra: Frame = {} if params.limit is None else {"limit": params.limit}

    async def read(j: int) -> None:
        peer = peers[ledger.schedule.reader(j)]
        fut = peer.expect(j)
        try:
            async with asyncio.timeout(params.timeout):
                ledger.mark_sent(j, now_ns())
                await peer.send({"t": "feed", "rid": j, **extra})
                reply, arrival = await fut
        except TimeoutError:
            ledger.failed(j, "timeout")
            return
        except (ConnectionLost, websockets.ConnectionClosed):
            ledger.failed(j, "connection_lost")
            return
        finally:
            peer.forget(j)
        if reply.get("t") == "feed_page":
            ledger.answered(j, arrival, len(reply.get("items") or []))
        elif reply.get("t") == "error":
            ledger.failed(j, str(reply.get("code")))
        else:
            ledger.failed(j, f"unexpected_{reply.get('t')}")

    return read


def _conclude_http(ledger: ReadLedger, j: int, status: int, body: bytes, arrival: int) -> None:
    if status != 200:
        ledger.failed(j, f"http_{status}")
        return
    try:
        page = json.loads(body)
    except ValueError:
        page = None
    if not isinstance(page, dict) or page.get("t") != "feed_page":
        ledger.failed(j, "unexpected_body")
        return
    ledger.answered(j, arrival, len(page.get("items") or []))


def aiohttp_reader(params: FeedProbeParams, ledger: ReadLedger, session: aiohttp.ClientSession,
                   tokens: list[str]) -> ReadFn:
    """A read over HTTP: `GET /v1/feed` with the reader's bearer token, through aiohttp."""
    query = {} if params.limit is None else {"limit": str(params.limit)}
    headers = [{"Authorization": f"Bearer {t}"} for t in tokens]
    path = params.url.rstrip("/") + "/v1/feed"

    async def read(j: int) -> None:
        try:
            async with asyncio.timeout(params.timeout):
                ledger.mark_sent(j, now_ns())
                async with session.get(path, params=query,
                                       headers=headers[ledger.schedule.reader(j)]) as reply:
                    body = await reply.read()
                    arrival = now_ns()
        except TimeoutError:
            ledger.failed(j, "timeout")
            return
        except aiohttp.ClientError as exc:
            ledger.failed(j, f"http_{type(exc).__name__}")
            return
        _conclude_http(ledger, j, reply.status, body, arrival)

    return read


def httpx_reader(params: FeedProbeParams, ledger: ReadLedger, http: httpx.AsyncClient,
                 tokens: list[str]) -> ReadFn:
    """The same read through the shared httpx client (`--http-client httpx`)."""
    query = {} if params.limit is None else {"limit": str(params.limit)}
    headers = [{"authorization": f"Bearer {t}"} for t in tokens]

    async def read(j: int) -> None:
        try:
            async with asyncio.timeout(params.timeout):
                ledger.mark_sent(j, now_ns())
                reply = await http.get("/v1/feed", params=query,
                                       headers=headers[ledger.schedule.reader(j)])
                arrival = now_ns()
        except (TimeoutError, httpx.TimeoutException):
            ledger.failed(j, "timeout")
            return
        except httpx.HTTPError as exc:
            ledger.failed(j, f"http_{type(exc).__name__}")
            return
        _conclude_http(ledger, j, reply.status_code, reply.content, arrival)

    return read


# --- the run ------------------------------------------------------------------------------------


async def probe(params: FeedProbeParams, *, log: TextIO | None = None,
                progress_every: float = PROGRESS_INTERVAL_S) -> dict[str, Any]:
    """Set up, run the load, and return the results (raises SetupError)."""
    log = log or sys.stderr
    for warning in params.warnings():
        log.write(f"feed probe: WARNING {warning}\n")
    limits = httpx.Limits(max_connections=params.connections,
                          max_keepalive_connections=params.connections)
    schedule = Schedule(params.rate, params.warmup, params.duration, params.readers)
    ledger = ReadLedger(schedule)
    async with httpx.AsyncClient(base_url=params.url.rstrip("/"), limits=limits,
                                 timeout=httpx.Timeout(params.timeout)) as http:
        s = await setup(params, http, log)
        peers = s.peers
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(_close_all, peers)
            tokens = [s.tokens[u] for u in s.readers]
            read: ReadFn
            if params.via == "ws":
                read = ws_reader(params, ledger, peers)
            else:
                await _close_all(peers)
                if params.http_client == "httpx":
                    read = httpx_reader(params, ledger, http, tokens)
                else:
                    connector = aiohttp.TCPConnector(limit=params.connections,
                                                     limit_per_host=params.connections)
                    session = await stack.enter_async_context(aiohttp.ClientSession(
                        connector=connector, timeout=aiohttp.ClientTimeout(total=params.timeout)))
                    read = aiohttp_reader(params, ledger, session, tokens)
            via = params.via if params.via == "ws" else f"http ({params.http_client})"
            log.write(f"feed probe: {schedule.total} reads at {params.rate:g}/s over {via} "
                      f"({params.warmup:g} s warm-up, {params.duration:g} s measured)\n")
            log.flush()
            started = time.time()
            cpu = time.process_time()
            await run_load(ledger, read, progress=log, progress_every=progress_every)
            cpu_s = time.process_time() - cpu
            wall_s = time.time() - started
    late = ledger.late + sum(p.late for p in peers)
    reads = ledger.summary()
    reads["late_replies"] = late
    latency = ledger.latency.summary()
    send_lag = ledger.send_lag.summary()
    items = s.items_at_start or [0]
    result: dict[str, Any] = {
        "probe": "feed",
        "created": dt.datetime.fromtimestamp(started, dt.UTC).isoformat(timespec="seconds"),
        "params": asdict(params),
        "run_tag": s.tag,
        "setup": {"seconds": s.seconds, "follows": params.readers * params.follows,
                  "posts": params.authors * params.posts, "expected_items": params.expected_items,
                  "first_page_items_min": min(items),
                  "readers_short": sum(1 for n in items if n < params.expected_items)},
        "reads": reads,
        "latency_ms": latency,
        "send_lag_ms": send_lag,
        "offered_rate": params.rate,
        "achieved_rate": reads["achieved_rate"],
        "bound_ms": params.bound_ms,
        # The probe's own CPU while the load ran (100 = one core): near 100, its event loop
        # queues replies, and that queueing is inside the latencies.
        "generator_cpu_percent": round(100 * cpu_s / wall_s, 1) if wall_s > 0 else None,
        "within_bound": reads["errors"] == 0 and latency["count"] > 0
        and latency["p99"] <= params.bound_ms,
        # As the main harness: send lag p99 above a tenth of the bound means the generator fell
        # behind, and latencies include its own delay (still measured from the schedule). The
        # event loop's timers wake up to 1 ms late, so never less than GENERATOR_FLOOR_MS.
        "generator_behind": send_lag["p99"] > max(params.bound_ms / 10, GENERATOR_FLOOR_MS),
        "histograms": {"latency": ledger.latency.encode(), "send_lag": ledger.send_lag.encode()},
    }
    result["markdown"] = markdown_row(result)
    return result


async def _close_all(peers: list[Peer]) -> None:
    await asyncio.gather(*(p.close() for p in peers))


def _ms(x: float) -> str:
    return f"{x:.2f}"


def markdown_row(result: dict[str, Any]) -> str:
    p, lat, reads = result["params"], result["latency_ms"], result["reads"]
    return (f"| {p['via']} | {p['readers']} | {result['offered_rate']:g} | {result['achieved_rate']:.1f} "
            f"| {lat['count']} | {reads['errors']} | {_ms(lat['p50'])} | {_ms(lat['p90'])} "
            f"| {_ms(lat['p99'])} | {_ms(lat['p99_9'])} | {_ms(lat['max'])} | {_ms(lat['mean'])} "
            f"| {_ms(result['send_lag_ms']['p99'])} |")


def results_dir(base: Path, when: float) -> Path:
    stamp = dt.datetime.fromtimestamp(when).strftime("%Y%m%d-%H%M%S")
    path = base / f"{stamp}-feed"
    n = 1
    while path.exists():
        n += 1
        path = base / f"{stamp}-feed-{n}"
    return path


def write_results(result: dict[str, Any], base: Path) -> Path:
    from bench.report import machine, versions

    result = {**result, "versions": {**versions(), "aiohttp": aiohttp.__version__},
              "machine": machine()}
    outdir = results_dir(base, time.time())
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / "results.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


async def run_cli(params: FeedProbeParams, out: Path, argv: Sequence[str], *,
                  stdout: TextIO | None = None, log: TextIO | None = None,
                  progress_every: float = PROGRESS_INTERVAL_S) -> int:
    """The probe as the command runs it: 0 when every read was answered, 1 otherwise."""
    stdout = stdout or sys.stdout
    log = log or sys.stderr
    try:
        result = await probe(params, log=log, progress_every=progress_every)
    except SetupError as exc:
        log.write(f"feed probe: setup failed: {exc}\n")
        return 1
    result["command"] = ["python", "-m", "bench.feed_probe", *argv]
    path = write_results(result, out)
    reads = result["reads"]
    log.write(MARKDOWN_HEADER + "\n")
    log.flush()
    stdout.write(result["markdown"] + "\n")
    stdout.flush()
    failed = reads["errors"] + reads["warmup"]["errors"]
    if failed:
        log.write(f"feed probe: {failed} reads FAILED: {reads['errors_by_reason']} "
                  f"(warm-up: {reads['warmup']['errors_by_reason']})\n")
    if result["generator_behind"]:
        log.write(f"feed probe: the load generator fell behind (send lag p99 "
                  f"{result['send_lag_ms']['p99']:.2f} ms): latencies include its own delay\n")
    log.write(f"feed probe: results in {path}\n")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    d = FeedProbeParams()
    parser = argparse.ArgumentParser(prog="python -m bench.feed_probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=d.url, help="the PeerNet (with dev tokens) (%(default)s)")
    parser.add_argument("--readers", type=int, default=d.readers, help="reading users (%(default)s)")
    parser.add_argument("--authors", type=int, default=d.authors, help="posting users (%(default)s)")
    parser.add_argument("--follows", type=int, default=d.follows,
                        help="authors each reader follows (%(default)s)")
    parser.add_argument("--posts", type=int, default=d.posts, help="posts per author (%(default)s)")
    parser.add_argument("--rate", type=float, default=d.rate,
                        help="reads per second in total (%(default)s)")
    parser.add_argument("--duration", type=float, default=d.duration,
                        help="measured seconds (%(default)s)")
    parser.add_argument("--warmup", type=float, default=d.warmup,
                        help="seconds of reads first, accounted but not timed (%(default)s)")
    parser.add_argument("--via", choices=("ws", "http"), default=d.via,
                        help="feed frames on the WebSocket, or GET /v1/feed (%(default)s)")
    parser.add_argument("--http-client", choices=("aiohttp", "httpx"), default=d.http_client,
                        help="--via http: the client library; httpx costs several times the CPU "
                             "per request (%(default)s)")
    parser.add_argument("--limit", type=int, default=None,
                        help="page size to ask for (default: none sent, the server's 20)")
    parser.add_argument("--json-frames", action="store_true",
                        help="JSON text frames instead of MessagePack")
    parser.add_argument("--timeout", type=float, default=d.timeout,
                        help="seconds before a read without reply counts as failed (%(default)s)")
    parser.add_argument("--connections", type=int, default=d.connections,
                        help="--via http: the shared client's connections (%(default)s)")
    parser.add_argument("--setup-concurrency", type=int, default=d.setup_concurrency,
                        help="setup requests at once (%(default)s)")
    parser.add_argument("--settle-timeout", type=float, default=d.settle_timeout,
                        help="seconds to wait for the posts to reach the feeds (%(default)s)")
    parser.add_argument("--bound-ms", type=float, default=d.bound_ms,
                        help="the p99 target, for within_bound in the results (%(default)s)")
    parser.add_argument("--run-tag", default=None, help="user-name tag (default: random)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="results go to OUT/<timestamp>-feed/ (default bench/results)")
    return parser


def params_from_args(args: argparse.Namespace) -> FeedProbeParams:
    fields = FeedProbeParams.__dataclass_fields__
    return FeedProbeParams(**{k: v for k, v in vars(args).items() if k in fields})


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    params = params_from_args(args)
    problems = params.problems()
    if problems:
        parser.error("; ".join(problems))
    from bench.worker import run_async

    return run_async(run_cli(params, args.out, argv))


if __name__ == "__main__":
    raise SystemExit(main())
