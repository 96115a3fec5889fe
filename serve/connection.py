"""One client connection: the handshake, the read loop with its limits, and the writer that
keeps the inbox in seq order on the socket.

States: opened -> (hello within the deadline) -> live -> closed. The writer owns the order of
inbox items: it drops seqs the socket already had and fills any gap from the inbox cache, so a
lost pub/sub message costs a read, never an item.

Memory: an idle connection holds no writer task and no asyncio.Queue. The outbox is a plain
deque and the writer is a task started when something is queued, which ends when the outbox is
empty (an asyncio.Queue is four deques, ~3 KiB; a parked writer task with its frames ~1.5 KiB;
per idle connection that is a tenth of the replica's share, docs/benchmarks.md).

Liveness: no timer per socket. The connection notes when it last heard from its client (and the
replica's WebSocket server notes WebSocket pings beside it); the replica's one `Liveness` wheel
asks for the deadline once a tick and expires it when it passed (serve/liveness.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from peernet.codec import Frame, decode_frame, encodable
from peernet.errors import CloseCode, ErrorCode, PeerNetError
from peernet.ids import new_id, now_ms
from peernet.tokens import TokenError, verify_token
from serve import metrics
from serve.hub import Hub, Outgoing
from serve.limits import FloodDetector, TokenBucket
from serve.liveness import HEARD_EXTENSION, HEARD_MESSAGE_KEY

if TYPE_CHECKING:
    from serve.deps import GatewayDeps
    from serve.handlers import HandlerTable
    from serve.liveness import DirectSocket, HeardFrom, Liveness
    from serve.presence import Presence

log = logging.getLogger("peernet.connection")

# What uvicorn's RuntimeError says when the app sends on a socket the server already closed.
SERVER_CLOSED = "after sending 'websocket.close'"

REPLAY_PAGE = 500
# How long the writer keeps trying to read the inbox (Redis restarting, loading its data) before
# it gives up and closes with 1001, leaving the client to reconnect with `resume`.
INBOX_READ_PATIENCE_S = 15.0


@dataclass(frozen=True, slots=True)
class Replay:
    """Send the inbox from `after` to `upto`, then `resumed`."""

    after: int
    upto: int
    complete: bool


@dataclass(frozen=True, slots=True)
class CatchUp:
    """Send whatever the inbox cache holds past `last_seq` (pushes may have been lost)."""


class _Closed(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Connection:
    # Slots: a connection lives as long as its socket, and thousands idle in each replica.
    __slots__ = ("_attached", "_close_code", "_closer", "_direct", "_early", "_ended", "_expired",
                 "_live", "_liveness", "_outbox", "_pings", "_reading", "_task", "_watching",
                 "_writer", "binary", "cfg", "deps", "handlers", "heard_at", "hub",
                 "last_seq", "liveness_tick", "presence", "user", "ws")

    def __init__(self, ws: WebSocket, deps: GatewayDeps, hub: Hub, handlers: HandlerTable,
                 presence: Presence, liveness: Liveness) -> None:
        self.ws = ws
        self.deps = deps
        self.cfg = deps.cfg.gateway
        self.hub = hub
        self.handlers = handlers
        self.presence = presence
        self.user = ""
        self.binary = True
        self.last_seq = 0  # the newest inbox seq this socket has been sent (or had on resume)
        self._watching: set[str] | None = None  # made by the first `watch`
        # What waits for the socket, in order; None asks the writer to stop. At most
        # `outbound_queue` items: one more closes the connection (slow consumer). Made when
        # something has to wait (a deque is ~760 bytes; most frames go out at once, and an idle
        # connection has none).
        self._outbox: deque[Outgoing | Replay | CatchUp | None] | None = None
        self._early: list[Outgoing] | None = []  # pushes that arrive before the welcome
        self._writer: asyncio.Task[None] | None = None
        self._close_code: int | None = None
        self._closer: asyncio.Future[None] | None = None
        self._attached = False
        self._ended = False  # the read loop is over: nothing more is queued
        # Liveness (serve/liveness.py): the wheel's clock, the hello's deadline, then silence.
        self._liveness = liveness
        self.liveness_tick: int | None = None
        self.heard_at = 0.0  # the last frame read; the hello deadline runs from the open
        self._live = False  # past the hello: the deadline is 2 x heartbeat after the last word
        self._pings: HeardFrom | None = (ws.scope.get("extensions") or {}).get(HEARD_EXTENSION)
        # The server's own socket when it can take a frame without ASGI (serve/ws_server.py).
        self._direct: DirectSocket | None = (
            self._pings if callable(getattr(self._pings, "write_now", None)) else None)
        # The read loop's task, and whether it waits for a frame now: `expire` cancels that wait.
        self._task: asyncio.Task[Any] | None = None
        self._reading = False
        self._expired = False

    @property
    def watching(self) -> set[str]:
        """The users this connection watches (serve/presence.py's Watchers keep it)."""
        if self._watching is None:
            self._watching = set()
        return self._watching

    # -- outbound ----------------------------------------------------------------------------

    def push(self, out: Outgoing) -> None:
        if self._early is not None:
            self._early.append(out)
            return
        self._enqueue(out)

    def send(self, frame: Frame) -> None:
        self._enqueue(Outgoing(frame))

    def catch_up(self) -> None:
        """Pub/sub messages may have been lost (the broker reconnected): read the inbox."""
        if self._early is None:
            self._enqueue(CatchUp())

    def _enqueue(self, item: Outgoing | Replay | CatchUp | None) -> None:
        if self._close_code is not None or self._ended:
            return
        if (self._direct is not None and not self._outbox and type(item) is Outgoing
                and (self._writer is None or self._writer.done()) and self._write_now(item)):
            return
        outbox = self._outbox
        if outbox is None:
            outbox = self._outbox = deque()
        if len(outbox) >= self.cfg.outbound_queue:
            self.close(CloseCode.SLOW_OR_FLOODING, "slow consumer")
            return
        outbox.append(item)
        self._wake_writer()

    def _write_now(self, out: Outgoing) -> bool:
        """The writer's work for one frame, done at once when nothing waits before it and the
        server can write it without waiting (`DirectSocket.write_now`): no task, no ASGI hop.
        False when the writer must do it (a gap to fill from the inbox, or a full buffer)."""
        seq = out.seq
        if seq is not None:
            if seq <= self.last_seq:
                return True  # already sent, as the writer would drop it
            if seq > self.last_seq + 1:
                return False
        assert self._direct is not None
        if not self._direct.write_now(out.encoded(self.binary)):
            return False
        if seq is not None:
            self._delivered(out, seq)
        metrics.frame_out(out.frame.get("t", "?"))
        return True

    def _delivered(self, out: Outgoing, seq: int) -> None:
        """Inbox item `seq` is on its way to the socket: the next one expected is seq + 1."""
        self.last_seq = seq
        ts = out.frame.get("ts")
        if isinstance(ts, int):
            metrics.DELIVERY_LATENCY.observe(max(0, now_ms() - ts) / 1000)

    def _wake_writer(self) -> None:
        """Start the writer unless it runs: it sends the outbox in order and ends once the
        outbox is empty (it checks and returns in one step, so an item queued after that finds
        it done and starts the next one; two writers never run at once)."""
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_loop())

    def close(self, code: int, reason: str) -> None:
        """Close the socket now, from any task; frames still queued are dropped."""
        if self._close_code is not None:
            return
        self._close_code = code
        metrics.CLOSES.labels(str(code)).inc()
        log.info("closing connection of %s: %d %s", self.user or "?", code, reason)
        self._closer = asyncio.ensure_future(self._close_now(code, reason))

    async def _close_now(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close(code, reason)

    async def _write_loop(self) -> None:
        try:
            await self._write_forever()
        except PeerNetError as exc:
            # The inbox cannot be read (Redis down): the client reconnects with resume later.
            metrics.BACKGROUND_ERRORS.labels("writer").inc()
            log.warning("writer of %s stopped: %s", self.user, exc)
            self.close(CloseCode.GOING_AWAY, "backend unavailable")
        except Exception as exc:
            if self._socket_closed(exc):
                # The socket went away under the writer (the client left, or `close` sent the
                # close frame while frames were still queued): the read loop ends the connection.
                log.debug("writer of %s: the socket is closed", self.user)
                return
            metrics.BACKGROUND_ERRORS.labels("writer").inc()
            log.exception("writer of %s failed", self.user)
            self.close(CloseCode.GOING_AWAY, "internal error")

    def _socket_closed(self, exc: Exception) -> bool:
        # Starlette raises WebSocketDisconnect when the client is gone, and RuntimeError
        # (WebSocketDisconnected in 1.x) on a send after the close frame went out. The server
        # (uvicorn) refuses a send with RuntimeError once it has closed the socket itself: a
        # replica that stops closes its sockets with 1012 before the app hears of it.
        if isinstance(exc, WebSocketDisconnect):
            return True
        return isinstance(exc, RuntimeError) and (
            self.ws.application_state == WebSocketState.DISCONNECTED
            or SERVER_CLOSED in str(exc))

    async def _write_forever(self) -> None:
        while outbox := self._outbox:
            item = outbox.popleft()
            if not outbox:
                self._outbox = None  # the next item to wait makes a new one
            if item is None:
                return
            if isinstance(item, Replay):
                await self._replay(item)
                continue
            if isinstance(item, CatchUp):
                await self._fill(None)
                continue
            seq = item.seq
            if seq is not None:
                if seq <= self.last_seq:
                    continue  # already sent (a replay overlapped a push, or a republish)
                if seq > self.last_seq + 1:
                    await self._fill(seq - 1)
                self._delivered(item, seq)
            await self._send(item)

    async def _send(self, out: Outgoing) -> None:
        data = out.encoded(self.binary)
        if isinstance(data, bytes):
            await self.ws.send_bytes(data)
        else:
            await self.ws.send_text(data)
        metrics.frame_out(out.frame.get("t", "?"))

    async def _fill(self, upto: int | None) -> None:
        """Send the inbox items after `last_seq` up to `upto` (None: all there are) from the
        cache."""
        while upto is None or self.last_seq < upto:
            want = REPLAY_PAGE if upto is None else min(REPLAY_PAGE, upto - self.last_seq)
            items = await self._read_inbox(want)
            if upto is not None:
                items = [i for i in items if int(i["seq"]) <= upto]
            if not items:
                if upto is not None:
                    log.warning("inbox of %s lacks seq %d..%d; skipped", self.user,
                                self.last_seq + 1, upto)
                    self.last_seq = upto
                return
            for item in items:
                self.last_seq = int(item["seq"])
                await self._send(Outgoing(item))

    async def _read_inbox(self, count: int) -> list[Frame]:
        """The next `count` inbox items after `last_seq`, retrying a retriable failure with
        backoff for up to INBOX_READ_PATIENCE_S: a connection that stayed open through a Redis
        restart keeps its place instead of being closed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + INBOX_READ_PATIENCE_S
        delay = 0.1
        while True:
            try:
                return await self.deps.inbox.read(self.user, self.last_seq, count)
            except PeerNetError as exc:
                if not exc.retriable or loop.time() + delay > deadline:
                    raise
                log.info("inbox of %s not readable (%s); retry in %.1fs", self.user, exc, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 2.0)

    async def _replay(self, job: Replay) -> None:
        self.last_seq = job.after
        await self._fill(job.upto)
        self.last_seq = max(self.last_seq, job.upto)
        await self._send(Outgoing({"t": "resumed", "from": job.after, "to": job.upto,
                                   "complete": job.complete}))

    # -- inbound -----------------------------------------------------------------------------

    def deadline(self) -> float:
        if not self._live:
            # WebSocket pings before the hello do not count: the hello must come in time.
            return self.heard_at + self.cfg.hello_timeout_s
        heard = self.heard_at
        pings = self._pings
        if pings is not None and pings.heard_at > heard:
            heard = pings.heard_at
        return heard + 2 * self.cfg.heartbeat_ms / 1000

    def expire(self) -> None:
        """The deadline passed (the wheel says so): the read loop closes with 4408, now if it
        waits for a frame, else before it reads the next."""
        if self._expired:
            return
        self._expired = True
        if self._reading and self._task is not None:
            self._task.cancel()  # the wait ends at once; `_receive` turns it into the close

    async def run(self) -> None:
        self._task = asyncio.current_task()
        await self.ws.accept()
        metrics.CONNECTIONS.inc()
        self.heard_at = self._liveness.now()
        self._liveness.watch(self)
        try:
            await self._serve()
        except _Closed as closed:
            self.close(closed.code, closed.reason)
        except WebSocketDisconnect:
            pass
        finally:
            self._liveness.forget(self)
            metrics.CONNECTIONS.dec()
            if self._attached:
                self.hub.detach_now(self)
                # Every way out (close, 4408 heartbeat lost, disconnect, error) counts it out.
                self.presence.disconnected(self)
            await self._finish()

    async def _finish(self) -> None:
        self._ended = True
        writer = self._writer
        if writer is not None and not writer.done():
            if self._close_code is None:
                writer.cancel()
            else:
                if self._outbox is None:
                    self._outbox = deque()
                self._outbox.append(None)
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(writer, 5)
        if self._closer is not None:
            # The server drops the socket once the app returns: the close frame (its code is
            # the client's only explanation) must be out before that.
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._closer, 5)

    async def _receive(self) -> bytes | str:
        if self._expired:
            raise _Closed(CloseCode.TIMEOUT, "no frame in time")
        # No timer and no timeout context per frame: `expire` cancels this wait when the wheel
        # says, which is told from any other cancellation as asyncio.timeout does (uncancel).
        while True:
            self._reading = True
            try:
                message = await self.ws.receive()
            except asyncio.CancelledError:
                task = self._task
                if self._expired and task is not None and task.uncancel() == 0:
                    raise _Closed(CloseCode.TIMEOUT, "no frame in time") from None
                raise
            finally:
                self._reading = False
            if HEARD_MESSAGE_KEY not in message:
                break
            # A WebSocket ping, told by Serve's proxy (the `proxy` ingress): traffic once past
            # the hello, as pings are on the replica's own server; no frame to read.
            if self._live:
                self.heard_at = self._liveness.now()
        self.heard_at = self._liveness.now()
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        data: bytes | str | None = message.get("bytes")
        if data is None:
            data = message.get("text") or ""
        size = len(data) if isinstance(data, bytes) else len(data.encode())
        if size > self.cfg.max_frame_bytes:
            raise _Closed(CloseCode.MESSAGE_TOO_BIG, "frame too large")
        return data

    async def _serve(self) -> None:
        # The hello and its raw frame are locals of `_hello`, gone once it returns: not kept in
        # this frame for the connection's life.
        await self._hello()
        bucket = TokenBucket(self.cfg.rate_per_s, self.cfg.rate_burst)
        flood: FloodDetector | None = None  # made at the first refusal: most never see one
        while True:
            data = await self._receive()
            if not bucket.take():
                metrics.ERRORS.labels(ErrorCode.RATE_LIMITED.value).inc()
                if flood is None:
                    flood = FloodDetector(self.cfg.flood_close_after)
                if flood.refuse():
                    raise _Closed(CloseCode.SLOW_OR_FLOODING, "persistent flooding")
                self._error(PeerNetError(ErrorCode.RATE_LIMITED, "rate limit exceeded"),
                            _rid_of(data))
                continue
            await self._dispatch(data)

    async def _hello(self) -> None:
        first = await self._receive()
        self._live = True
        self.binary = isinstance(first, bytes)
        try:
            hello = decode_frame(first)
        except PeerNetError:
            raise _Closed(CloseCode.BAD_TOKEN, "the first frame must be hello") from None
        if hello.get("t") != "hello":
            raise _Closed(CloseCode.BAD_TOKEN, "the first frame must be hello")
        try:
            self.user = verify_token(hello.get("token"), self.cfg)
        except TokenError as exc:
            raise _Closed(CloseCode.BAD_TOKEN, str(exc)) from None
        await self._welcome(hello)

    async def _welcome(self, hello: Frame) -> None:
        resume = hello.get("resume")
        bad_resume = resume is not None and (not isinstance(resume, int) or isinstance(resume, bool)
                                             or resume < 0)
        try:
            await self.hub.attach(self)
            self._attached = True
            self.presence.connected(self)
            bounds = await self.deps.inbox.bounds(self.user)
        except PeerNetError as exc:
            self._error(exc, None)
            raise _Closed(CloseCode.GOING_AWAY, "backend unavailable") from None
        self.last_seq = bounds.latest
        self.send({"t": "welcome", "user": self.user, "session": new_id(), "seq": bounds.latest,
                   "heartbeat": self.cfg.heartbeat_ms, "replica": self.deps.replica})
        if bad_resume:
            # Replaying everything the inbox holds loses nothing; the client drops duplicates.
            self._error(PeerNetError(ErrorCode.BAD_REQUEST,
                                     "resume must be a non-negative integer; replaying the inbox"),
                        None)
            resume = 0
        if resume is not None:
            after = min(int(resume), bounds.latest)
            complete = bounds.oldest == 0 or after >= bounds.oldest - 1
            self._enqueue(Replay(after, bounds.latest, complete))
        early, self._early = self._early or [], None
        for out in early:
            self._enqueue(out)

    async def _dispatch(self, data: bytes | str) -> None:
        rid: Any = None
        try:
            frame = decode_frame(data)
            t = frame["t"]
            metrics.frame_in(t if t in self.handlers else "unknown")
            rid = frame.get("rid")
            if rid is not None and not _valid_rid(rid):
                rid = None
                raise PeerNetError(ErrorCode.BAD_REQUEST,
                                   "rid must be an int or a string of at most 64 characters")
            if not encodable(frame, data):
                raise PeerNetError(ErrorCode.BAD_REQUEST,
                                   "strings must be valid Unicode (no lone surrogates)")
            handler = self.handlers.get(t)
            if handler is None:
                raise PeerNetError(ErrorCode.UNKNOWN_TYPE, f"unknown frame type {t!r}"[:200])
            reply = await handler(self, frame)
        except PeerNetError as exc:
            self._error(exc, rid)
            return
        except Exception:
            log.exception("handler failed for a frame from %s", self.user)
            self._error(PeerNetError(ErrorCode.BAD_REQUEST, "the request could not be processed"),
                        rid)
            return
        if reply is not None:
            if rid is not None:
                reply["rid"] = rid
            self.send(reply)

    def _error(self, exc: PeerNetError, rid: Any) -> None:
        metrics.ERRORS.labels(exc.code.value).inc()
        frame: Frame = {"t": "error", "code": exc.code.value, "message": exc.message}
        if rid is not None:
            frame["rid"] = rid
        self.send(frame)


def _rid_of(data: bytes | str) -> Any:
    """The valid `rid` of a frame that will not be processed, or None."""
    try:
        rid = decode_frame(data).get("rid")
    except PeerNetError:
        return None
    return rid if rid is not None and _valid_rid(rid) else None


def _valid_rid(rid: Any) -> bool:
    if isinstance(rid, bool):
        return False
    if isinstance(rid, str):
        try:
            rid.encode("utf-8")  # a lone surrogate could never be echoed
        except UnicodeEncodeError:
            return False
        return len(rid) <= 64
    return isinstance(rid, int)
