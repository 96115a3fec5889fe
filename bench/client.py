"""The client seam: one simulated user's connection to a target (PeerNet, or the Socket.IO
baseline), with the reconnect-and-resend behaviour both share.

A connection delivers every frame it receives to the load process as a PeerNet-shaped frame
(`{"t": "msg", ...}`) with its arrival time, so the accounting never knows which target it
measured. Requests resolve to the `ok` frame or raise `RequestFailed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import websockets
from websockets.asyncio.client import ClientConnection

Frame = dict[str, Any]
# (user index, frame, arrival time in epoch microseconds)
FrameHandler = Callable[[int, Frame, int], None]

# Retries of a request the server refused without processing (`rate_limited`, `unavailable`).
MAX_RETRIES = 8
# A request that timed out while its connection was down and every reconnect failed: the
# server was unreachable, which is not the same as silence on an open connection (`timeout`).
DISCONNECTED = "disconnected_until_timeout"


def now_us() -> int:
    return time.time_ns() // 1000


class RequestFailed(Exception):
    """A request that will not be acknowledged; `reason` is a protocol error code or one of
    `timeout`, `disconnected_until_timeout`, `connection_lost`, `closed`, `unsupported`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SetupError(Exception):
    """The target cannot be driven (unreachable, dev tokens disabled, handshake refused).
    `reason` is a short code for counting refusals (`refusal_reason`), or empty."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


# Refusals that happen in the load generator itself, not in the server: it ran out of files.
CLIENT_SIDE_REFUSALS = frozenset({"client_out_of_files"})


def refusal_reason(exc: BaseException) -> str:
    """A short code for why a connection could not be opened: `timeout`, `http_<status>` (the
    upgrade refused, e.g. HAProxy's 503), `closed_<code>` (closed before `welcome`),
    `connection_refused`, `connection_reset`, `client_out_of_files` (EMFILE/ENFILE in the load
    process), or the exception's type."""
    if isinstance(exc, SetupError) and exc.reason:
        return exc.reason
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, websockets.InvalidStatus):
        return f"http_{exc.response.status_code}"
    if isinstance(exc, websockets.ConnectionClosed):
        return f"closed_{exc.rcvd.code if exc.rcvd is not None else 'abnormally'}"
    if isinstance(exc, OSError):
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            return "client_out_of_files"
        if isinstance(exc, ConnectionRefusedError):
            return "connection_refused"
        if isinstance(exc, ConnectionResetError):
            return "connection_reset"
    return type(exc).__name__


@dataclass
class Cut:
    """A connection the server (or the network) closed while the client wanted it open: when,
    with which code, and when it was back (the next `welcome`) and resumed (`resumed`)."""

    closed_us: int
    code: int | None
    back_us: int = 0
    resumed_us: int = 0


@dataclass
class ConnStats:
    """What happened on connections, summed over a load process's users."""

    connects: int = 0
    reconnects: int = 0
    resent: int = 0
    retried: int = 0
    frames_in: int = 0
    frames_out: int = 0
    bad_frames: int = 0
    unknown_frames: int = 0
    resumes: int = 0
    resumes_incomplete: int = 0
    keepalives: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    close_codes: Counter[str] = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {
            "connects": self.connects, "reconnects": self.reconnects, "resent": self.resent,
            "retried": self.retried, "frames_in": self.frames_in, "frames_out": self.frames_out,
            "bad_frames": self.bad_frames, "unknown_frames": self.unknown_frames,
            "resumes": self.resumes, "resumes_incomplete": self.resumes_incomplete,
            "keepalives": self.keepalives, "errors": dict(self.errors), "close_codes": dict(self.close_codes),
        }

    @staticmethod
    def merge_dicts(dicts: Sequence[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for d in dicts:
            for k, v in d.items():
                if isinstance(v, dict):
                    sub = out.setdefault(k, {})
                    for kk, vv in v.items():
                        sub[kk] = sub.get(kk, 0) + vv
                else:
                    out[k] = out.get(k, 0) + v
        return out


class Connection(Protocol):
    index: int
    user: str

    @property
    def online(self) -> bool: ...

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def request(self, frame: Frame, *, idempotent: bool) -> Frame: ...

    async def tick(self, now: float) -> None: ...


class Target(Protocol):
    """A server to drive: how to get credentials and how to make a connection."""

    name: str
    kinds: frozenset[str]

    async def prepare(self, users: Sequence[tuple[int, str]]) -> None: ...

    def connection(self, index: int, user: str, on_frame: FrameHandler, stats: ConnStats) -> Connection: ...


@dataclass
class _Pending:
    rid: int
    frame: Frame
    future: asyncio.Future[Frame]
    idempotent: bool
    sent_gen: int | None = None
    attempts: int = 0
    last_code: str = ""


class ReconnectingConnection:
    """The behaviour every adapter shares: keep one WebSocket open until `close()`, reconnect with
    backoff when it drops, and carry requests across reconnects.

    A request not yet written is sent once connected. A request written on a connection that
    dropped is sent again after the reconnect when it is idempotent (a DM with its `cid`), and
    otherwise fails as `connection_lost` (its outcome is unknown).
    """

    def __init__(self, index: int, user: str, on_frame: FrameHandler, stats: ConnStats,
                 request_timeout: float) -> None:
        self.index = index
        self.user = user
        self.on_frame = on_frame
        self.stats = stats
        self.request_timeout = request_timeout
        self._ws: ClientConnection | None = None
        self._want_open = False
        self._runner: asyncio.Task[None] | None = None
        self._pending: dict[int, _Pending] = {}
        self._next_rid = 1
        self.generation = 0
        self._last_send = 0.0
        self._retry_tasks: set[asyncio.Task[None]] = set()
        self.cuts: list[Cut] = []
        self.opened_us = 0  # the first handshake's end

    # --- what an adapter provides -------------------------------------------------------------
    async def _handshake(self) -> ClientConnection:
        """Open a WebSocket and complete the target's handshake; raise on failure."""
        raise NotImplementedError

    def _dispatch(self, data: str | bytes, recv_us: int) -> None:
        raise NotImplementedError

    def _encode_request(self, rid: int, frame: Frame) -> str | bytes:
        raise NotImplementedError

    async def _keepalive(self, ws: ClientConnection, now: float) -> None:
        """Called about once a second while connected."""

    # --- lifecycle ----------------------------------------------------------------------------
    @property
    def online(self) -> bool:
        return self._ws is not None

    async def open(self) -> None:
        """Connect and complete the handshake, or raise SetupError; then stay connected."""
        if self._runner is not None and not self._runner.done():
            return
        self._want_open = True
        try:
            ws = await self._handshake()
        except SetupError:
            self._want_open = False
            raise
        except (OSError, TimeoutError, websockets.WebSocketException) as exc:
            self._want_open = False
            raise SetupError(f"{self.user}: cannot connect: {type(exc).__name__}: {exc}",
                             refusal_reason(exc)) from None
        if not self.opened_us:
            self.opened_us = now_us()
        self._connected(ws)
        self._runner = asyncio.create_task(self._run(ws), name=f"conn-{self.user}")

    async def close(self) -> None:
        self._want_open = False
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()
        if self._runner is not None:
            try:
                await asyncio.wait_for(self._runner, 5)
            except (TimeoutError, asyncio.CancelledError):
                self._runner.cancel()
            self._runner = None
        for p in list(self._pending.values()):
            if not p.future.done():
                p.future.set_exception(RequestFailed("closed"))
        for t in list(self._retry_tasks):
            t.cancel()

    def _connected(self, ws: ClientConnection) -> None:
        self.generation += 1
        self.stats.connects += 1
        self._ws = ws
        self._last_send = time.monotonic()

    async def _run(self, ws: ClientConnection) -> None:
        while True:
            await self._flush_pending()
            try:
                async for data in ws:
                    self.stats.frames_in += 1
                    self._dispatch(data, now_us())
            except websockets.ConnectionClosed:
                pass
            except Exception as exc:  # a bug in dispatch must not silently kill the reader
                self.stats.errors[f"client_bug:{type(exc).__name__}"] += 1
                with contextlib.suppress(Exception):
                    await ws.close()
            self._ws = None
            code = ws.close_code
            self.stats.close_codes[str(code)] += 1
            if not self._want_open:
                return
            cut = Cut(now_us(), code)
            self.cuts.append(cut)
            self._fail_unknown_outcomes()
            self.stats.reconnects += 1
            reconnected = await self._reconnect()
            if reconnected is None:
                return
            cut.back_us = now_us()
            ws = reconnected
            self._connected(ws)

    async def _reconnect(self) -> ClientConnection | None:
        delay = 0.05
        while self._want_open:
            try:
                return await self._handshake()
            except (OSError, TimeoutError, SetupError, websockets.WebSocketException) as exc:
                self.stats.errors[f"reconnect:{type(exc).__name__}"] += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        return None

    def _fail_unknown_outcomes(self) -> None:
        for rid, p in list(self._pending.items()):
            if p.sent_gen is not None and not p.idempotent:
                self._pending.pop(rid, None)
                if not p.future.done():
                    p.future.set_exception(RequestFailed("connection_lost"))

    async def _flush_pending(self) -> None:
        for p in list(self._pending.values()):
            if p.sent_gen != self.generation and not p.future.done():
                if p.sent_gen is not None:
                    self.stats.resent += 1
                await self._write(p)

    # --- requests -----------------------------------------------------------------------------
    async def request(self, frame: Frame, *, idempotent: bool) -> Frame:
        rid = self._next_rid
        self._next_rid += 1
        fut: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        p = _Pending(rid, frame, fut, idempotent)
        self._pending[rid] = p
        if self._ws is not None:
            await self._write(p)
        try:
            return await asyncio.wait_for(fut, self.request_timeout)
        except TimeoutError:
            # Silence, refusals (retried) until the time ran out, or no connection to send it
            # on (every reconnect refused or unanswered): not the same thing.
            if p.attempts:
                reason = f"{p.last_code}_until_timeout"
            elif self._ws is None:
                reason = DISCONNECTED
            else:
                reason = "timeout"
            raise RequestFailed(reason) from None
        finally:
            self._pending.pop(rid, None)

    async def _write(self, p: _Pending) -> None:
        ws = self._ws
        if ws is None:
            return
        p.sent_gen = self.generation
        try:
            await ws.send(self._encode_request(p.rid, p.frame))
        except websockets.ConnectionClosed:
            return  # the reader notices, reconnects and resends what may be resent
        self.stats.frames_out += 1
        self._last_send = time.monotonic()

    async def send_raw(self, data: str | bytes) -> None:
        ws = self._ws
        if ws is None:
            return
        with contextlib.suppress(websockets.ConnectionClosed):
            await ws.send(data)
            self.stats.frames_out += 1
            self._last_send = time.monotonic()

    def _resolve(self, rid: Any, frame: Frame) -> bool:
        p = self._pending.get(rid) if isinstance(rid, int) else None
        if p is None or p.future.done():
            return False
        p.future.set_result(frame)
        return True

    def _refused(self, rid: Any, code: str, retriable: bool) -> None:
        """The server answered the request with an error. A retriable refusal (nothing was
        processed) is sent again after a backoff, up to MAX_RETRIES times."""
        self.stats.errors[code] += 1
        p = self._pending.get(rid) if isinstance(rid, int) else None
        if p is None or p.future.done():
            return
        if retriable and p.attempts < MAX_RETRIES:
            p.attempts += 1
            p.last_code = code
            self.stats.retried += 1
            task = asyncio.create_task(self._retry_later(rid, p, 0.05 * 2 ** min(p.attempts, 5)))
            self._retry_tasks.add(task)
            task.add_done_callback(self._retry_tasks.discard)
            return
        p.future.set_exception(RequestFailed(code))

    async def _retry_later(self, rid: int, p: _Pending, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._pending.get(rid) is p and not p.future.done():
            await self._write(p)

    async def tick(self, now: float) -> None:
        ws = self._ws
        if ws is not None:
            await self._keepalive(ws, now)
