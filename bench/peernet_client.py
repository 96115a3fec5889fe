"""The PeerNet adapter: the public client protocol (docs in /v1/ws), MessagePack binary frames by
default, dev tokens from `POST /v1/dev/token`, `resume` from the last inbox seq on reconnect."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import httpx
import websockets
from websockets.asyncio.client import ClientConnection

from bench.client import (
    ConnStats,
    Frame,
    FrameHandler,
    ReconnectingConnection,
    SetupError,
    now_us,
)
from bench.plan import CHURN, DM, POST
from peernet.codec import decode_frame, encode_frame
from peernet.errors import PeerNetError

HANDSHAKE_TIMEOUT_S = 10.0
MAX_FRAME_BYTES = 1 << 20
# Errors after which the same request may simply be sent again (the server processed nothing).
RETRIABLE = frozenset({"rate_limited", "unavailable"})
INBOX_TYPES = frozenset({"msg", "note"})


def ws_url(http_url: str) -> str:
    base = http_url.rstrip("/")
    if base.startswith("https://"):
        return "wss://" + base[len("https://"):] + "/v1/ws"
    if base.startswith("http://"):
        return "ws://" + base[len("http://"):] + "/v1/ws"
    if base.startswith(("ws://", "wss://")):
        return base if base.endswith("/v1/ws") else base + "/v1/ws"
    return "ws://" + base + "/v1/ws"


def http_url(url: str) -> str:
    base = url.rstrip("/")
    if base.endswith("/v1/ws"):
        base = base[: -len("/v1/ws")]
    if base.startswith("ws://"):
        return "http://" + base[len("ws://"):]
    if base.startswith("wss://"):
        return "https://" + base[len("wss://"):]
    return base if "://" in base else "http://" + base


def direct_urls(url: str, timeout_s: float = 10.0) -> list[str]:
    """The replicas' own base URLs that `GET /v1/endpoints` at `url` lists (docs/protocol.md),
    for connecting to them straight, past the ingress. ValueError when it lists none."""
    resp = httpx.get(http_url(url) + "/v1/endpoints", timeout=timeout_s)
    resp.raise_for_status()
    urls = [str(e["url"]) for e in resp.json().get("endpoints", [])]
    if not urls:
        raise ValueError(f"{http_url(url)}/v1/endpoints lists no replica (PEERNET_DIRECT_ENDPOINTS=0, "
                         "the proxy ingress, or the replicas have not published yet)")
    return urls


class PeerNetTarget:
    """A running PeerNet at one or more addresses; user i connects to address i mod n."""

    name = "peernet"
    kinds = frozenset({DM, POST, CHURN})

    def __init__(self, urls: Sequence[str], *, binary: bool = True, request_timeout: float = 15.0,
                 http_concurrency: int = 32, keepalive: str = "frame", replay_inbox: bool = False) -> None:
        self.http_urls = [http_url(u) for u in urls]
        self.ws_urls = [ws_url(u) for u in self.http_urls]
        self.binary = binary
        self.request_timeout = request_timeout
        self.http_concurrency = http_concurrency
        self.keepalive = keepalive
        self.replay_inbox = replay_inbox
        self.tokens: dict[str, str] = {}

    async def prepare(self, users: Sequence[tuple[int, str]]) -> None:
        """Fetch a dev token for every user."""
        sem = asyncio.Semaphore(self.http_concurrency)
        limits = httpx.Limits(max_connections=self.http_concurrency)
        async with httpx.AsyncClient(timeout=30.0, limits=limits) as client:

            async def one(index: int, user: str) -> None:
                url = self.http_urls[index % len(self.http_urls)] + "/v1/dev/token"
                async with sem:
                    try:
                        resp = await client.post(url, json={"user": user})
                    except httpx.HTTPError as exc:
                        raise SetupError(f"{url}: {type(exc).__name__}: {exc}") from None
                if resp.status_code in (403, 404):
                    raise SetupError(f"{url} answered {resp.status_code}: start the server with dev "
                                     "tokens enabled (`peernet serve --dev-tokens`)")
                if resp.status_code != 200:
                    raise SetupError(f"{url} answered {resp.status_code}: {resp.text[:200]}")
                token = resp.json().get("token")
                if not isinstance(token, str):
                    raise SetupError(f"{url}: no token in {resp.text[:200]}")
                self.tokens[user] = token

            await asyncio.gather(*(one(i, u) for i, u in users))

    def connection(
        self, index: int, user: str, on_frame: FrameHandler, stats: ConnStats
    ) -> PeerNetConnection:
        return PeerNetConnection(self.ws_urls[index % len(self.ws_urls)], index, user,
                                 self.tokens[user], on_frame, stats, self.binary, self.request_timeout,
                                 self.keepalive, self.replay_inbox)


class PeerNetConnection(ReconnectingConnection):
    """One user's connection. Tracks the newest inbox seq seen (for `resume` and `ack`) and every
    seq seen, so the load process can report gaps in the inbox stream.

    `keepalive` is how it stays alive while idle: `frame` sends the protocol's `ping` frames,
    `ws-ping` WebSocket pings (control frames), each after half a heartbeat without a send.

    `replay_inbox` makes the first `hello` ask for the whole inbox (`resume` 0) too: whatever
    reached the user before it first connected (a `group` note sent by another load process)
    arrives then, and the seqs it tracks start at 1."""

    def __init__(self, url: str, index: int, user: str, token: str, on_frame: FrameHandler,
                 stats: ConnStats, binary: bool, request_timeout: float,
                 keepalive: str = "frame", replay_inbox: bool = False) -> None:
        super().__init__(index, user, on_frame, stats, request_timeout)
        self.url = url
        self.token = token
        self.binary = binary
        self.last_seq = 0
        self.acked_seq = 0
        self.seqs: set[int] = set()
        self.heartbeat_s = 25.0
        self.keepalive = keepalive
        self.replay_inbox = replay_inbox
        self.replica = ""  # the gateway replica named in the latest `welcome`, when it names one
        self._welcomed = False
        # The `resumed` expected next ends the replay of a first connection, not a comeback
        # after a cut: not counted as a resume.
        self._first_replay = False

    async def _handshake(self) -> ClientConnection:
        ws = await websockets.connect(self.url, compression=None, max_size=MAX_FRAME_BYTES,
                                      open_timeout=HANDSHAKE_TIMEOUT_S, ping_interval=None,
                                      close_timeout=2)
        try:
            hello: Frame = {"t": "hello", "token": self.token}
            if self._welcomed or self.replay_inbox:
                hello["resume"] = self.last_seq
            self._first_replay = not self._welcomed
            await ws.send(encode_frame(hello, self.binary))
            data = await asyncio.wait_for(ws.recv(), HANDSHAKE_TIMEOUT_S)
        except websockets.ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None
            raise SetupError(f"{self.user}: handshake closed with {code}",
                             f"closed_{code or 'abnormally'}") from None
        except BaseException:
            await ws.close()
            raise
        frame = self._decode(data)
        if frame is None or frame.get("t") != "welcome":
            await ws.close()
            raise SetupError(f"{self.user}: expected welcome, got {frame!r:.200}", "no_welcome")
        self._welcomed = True
        self.replica = str(frame.get("replica") or "")
        hb = frame.get("heartbeat")
        if isinstance(hb, int) and hb > 0:
            self.heartbeat_s = hb / 1000.0
        self.on_frame(self.index, frame, now_us())
        return ws

    def _decode(self, data: str | bytes) -> Frame | None:
        try:
            return decode_frame(data)
        except PeerNetError:
            self.stats.bad_frames += 1
            return None

    def _dispatch(self, data: str | bytes, recv_us: int) -> None:
        frame = self._decode(data)
        if frame is None:
            return
        t = frame["t"]
        if t == "ok":
            self._resolve(frame.get("rid"), frame)
            return
        if t == "error":
            code = str(frame.get("code", "unknown"))
            if "rid" in frame:
                self._refused(frame["rid"], code, code in RETRIABLE)
            else:
                self.stats.errors[code] += 1
            return
        if t in INBOX_TYPES:
            seq = frame.get("seq")
            if isinstance(seq, int):
                self.seqs.add(seq)
                if seq > self.last_seq:
                    self.last_seq = seq
        elif t in ("presence_state", "feed_page", "pong"):
            self._resolve(frame.get("rid"), frame)
        elif t == "resumed":
            if self._first_replay:
                self._first_replay = False
            else:
                self.stats.resumes += 1
            if self.cuts and not self.cuts[-1].resumed_us:
                self.cuts[-1].resumed_us = recv_us
            if frame.get("complete") is False:  # part of the gap is past retention: history over HTTP
                self.stats.resumes_incomplete += 1
        self.on_frame(self.index, frame, recv_us)

    def _encode_request(self, rid: int, frame: Frame) -> str | bytes:
        return encode_frame({**frame, "rid": rid}, self.binary)

    async def _keepalive(self, ws: ClientConnection, now: float) -> None:
        # Acks drive unread counts; a ping keeps an otherwise idle connection alive (the server
        # closes a connection silent for two heartbeats).
        if self.last_seq > self.acked_seq:
            self.acked_seq = self.last_seq
            await self.send_raw(encode_frame({"t": "ack", "seq": self.last_seq}, self.binary))
        elif now - self._last_send > self.heartbeat_s / 2:
            self._last_send = now
            self.stats.keepalives += 1
            if self.keepalive == "ws-ping":
                # Not awaiting the pong: a dead peer shows as the connection closing.
                with contextlib.suppress(websockets.ConnectionClosed):
                    await ws.ping()
                return
            # A `ping` frame by default: on PEERNET_INGRESS=proxy, Serve's proxy answers
            # WebSocket pings itself, so they never reach PeerNet and do not count as traffic.
            try:
                await self.send_raw(encode_frame({"t": "ping"}, self.binary))
            except websockets.ConnectionClosed:
                pass

    def inbox_gaps(self) -> int:
        """Inbox seqs below the newest one seen that never arrived (should be 0)."""
        return self.last_seq - len(self.seqs) if self.seqs else 0

    def info(self) -> dict[str, Any]:
        return {"last_seq": self.last_seq, "gaps": self.inbox_gaps()}
