"""The Centrifugo adapter: its bidirectional client protocol, JSON variant, over a WebSocket at
/connection/websocket, with the same `websockets` client the other adapters use (so every target
is measured through one client stack).

Commands used: `connect` (an HS256 JWT whose `sub` is the user), `subscribe` (with `recover`,
`epoch` and `offset` after a reconnect), `publish`; pushes of `pub`; the server's `{}` ping,
answered with `{}`. Several commands may share one frame, one JSON object per line, and so may
replies.

A DM is two publications, one into the recipient's personal channel and one into the sender's,
written in one frame and acknowledged when both are (the same two inboxes PeerNet fills). A
post is one publication into the author's followers channel. A `follow` subscribes to it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jwt
import websockets
from websockets.asyncio.client import ClientConnection

from bench.centrifugo import feed_channel, inbox_channel
from bench.client import (
    ConnStats,
    Frame,
    FrameHandler,
    ReconnectingConnection,
    RequestFailed,
    SetupError,
    now_us,
)
from bench.plan import DM, POST

HANDSHAKE_TIMEOUT_S = 10.0
MAX_FRAME_BYTES = 1 << 20
TOKEN_TTL_S = 7 * 24 * 3600
# Each request owns two command ids (a DM is two publishes): 2*rid and 2*rid + 1.
IDS_PER_REQUEST = 2
# Handshake commands are read before the reader starts, so their ids never meet a request's;
# they sit above any id a run could give a request.
HANDSHAKE_ID_BASE = 4_000_000_000
# Replies still awaited by a request one of whose commands was refused.
FAILED = -1


def connection_token(user: str, secret: str, ttl_s: int = TOKEN_TTL_S) -> str:
    return jwt.encode({"sub": user, "exp": int(time.time()) + ttl_s}, secret, algorithm="HS256")


class CentrifugoTarget:
    """Centrifugo nodes at `urls` (ws://host:port/connection/websocket); user i connects to node
    i mod n, so a DM between neighbours crosses nodes through the Redis engine."""

    name = "centrifugo"
    kinds = frozenset({DM, POST})

    def __init__(self, urls: Sequence[str], *, secret: str, feeds: bool = False,
                 request_timeout: float = 15.0) -> None:
        if not secret:
            raise SetupError("the centrifugo target needs the token secret of the nodes it drives")
        self.urls = list(urls)
        self.secret = secret
        self.feeds = feeds
        self.request_timeout = request_timeout
        self.tokens: dict[str, str] = {}

    async def prepare(self, users: Sequence[tuple[int, str]]) -> None:
        """Sign a connection token for every user, as an application backend would."""
        for _, user in users:
            self.tokens[user] = connection_token(user, self.secret)

    def connection(
        self, index: int, user: str, on_frame: FrameHandler, stats: ConnStats
    ) -> CentrifugoConnection:
        own = [inbox_channel(user)] + ([feed_channel(user)] if self.feeds else [])
        return CentrifugoConnection(self.urls[index % len(self.urls)], index, user, self.tokens[user],
                                    own, on_frame, stats, self.request_timeout)


@dataclass
class Position:
    """Where a subscription is in its channel's stream: what recovery resumes from."""

    epoch: str = ""
    offset: int = 0
    base: int = 0  # the offset when first subscribed: later offsets should all arrive
    seen: int = 0  # publications seen after `base`, for gaps


class CentrifugoConnection(ReconnectingConnection):
    def __init__(self, url: str, index: int, user: str, token: str, channels: list[str],
                 on_frame: FrameHandler, stats: ConnStats, request_timeout: float) -> None:
        super().__init__(index, user, on_frame, stats, request_timeout)
        self.url = url
        self.token = token
        self.inbox = inbox_channel(user)
        # Channel -> position, for every subscription this user holds (resubscribed on reconnect).
        self.subs: dict[str, Position | None] = dict.fromkeys(channels)
        self._parts: dict[int, int] = {}  # rid -> replies still awaited
        self._subscribing: dict[int, str] = {}  # rid of a `follow` -> its channel
        self._welcomed = False

    # --- handshake ----------------------------------------------------------------------------
    async def _handshake(self) -> ClientConnection:
        ws = await websockets.connect(self.url, compression=None, max_size=MAX_FRAME_BYTES,
                                      open_timeout=HANDSHAKE_TIMEOUT_S, ping_interval=None,
                                      close_timeout=2)
        try:
            await self._connect_and_subscribe(ws)
        except websockets.ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None
            raise SetupError(f"{self.user}: handshake closed with {code}") from None
        except BaseException:
            await ws.close()
            raise
        resumed = self._welcomed
        self._welcomed = True
        self.on_frame(self.index, {"t": "welcome", "user": self.user, "seq": 0}, now_us())
        if resumed:
            self.stats.resumes += 1
        return ws

    async def _connect_and_subscribe(self, ws: ClientConnection) -> None:
        cid = HANDSHAKE_ID_BASE
        await ws.send(_line({"id": cid, "connect": {"token": self.token, "name": "peernet-bench"}}))
        await self._await_replies(ws, {cid})
        # Every subscription in one frame; after a reconnect each asks to recover from its position.
        ids: dict[int, str] = {}
        lines = []
        for n, (channel, pos) in enumerate(self.subs.items(), start=1):
            req: dict[str, Any] = {"channel": channel}
            if pos is not None:
                req.update(recover=True, epoch=pos.epoch, offset=pos.offset)
            ids[cid + n] = channel
            lines.append(_line({"id": cid + n, "subscribe": req}))
        if not lines:
            return
        await ws.send("\n".join(lines))
        results = await self._await_replies(ws, set(ids))
        incomplete = False
        for rid in sorted(ids):
            if not self._subscribed(ids[rid], results[rid]):
                incomplete = True
        if incomplete:
            self.stats.resumes_incomplete += 1

    async def _await_replies(self, ws: ClientConnection, want: set[int]) -> dict[int, dict[str, Any]]:
        """Read until every command in `want` is answered (replies may share a frame); pushes
        that arrive meanwhile are dispatched."""
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
        results: dict[int, dict[str, Any]] = {}
        while len(results) < len(want):
            data = await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
            for msg in _messages(data):
                cmd_id = msg.get("id")
                if cmd_id not in want:
                    self._handle(msg, now_us())
                    continue
                err = msg.get("error")
                if isinstance(err, dict):
                    raise SetupError(f"{self.user}: command {cmd_id - HANDSHAKE_ID_BASE} of the handshake "
                                     f"refused: {err.get('code')} {err.get('message')}")
                result: Any = next((v for k, v in msg.items() if k != "id"), {})
                results[cmd_id] = result if isinstance(result, dict) else {}
        return results

    def _subscribed(self, channel: str, result: dict[str, Any]) -> bool:
        """Record a subscription's position and hand over what recovery returned; False when
        the server could not recover everything missed (history gone or too short)."""
        pos = self.subs.get(channel)
        offset = int(result.get("offset", 0))
        epoch = str(result.get("epoch", ""))
        if pos is None or (epoch and epoch != pos.epoch):
            # New, or a stream Redis lost (a new epoch): its offsets count from here. What the
            # lost stream held shows up as losses in the accounting, not as offset gaps.
            self.subs[channel] = Position(epoch, offset, offset)
        recv_us = now_us()
        for pub in result.get("publications") or ():
            self._publication(channel, pub, recv_us)
        p = self.subs[channel]
        assert p is not None
        p.offset = max(p.offset, offset)
        return pos is None or bool(result.get("recovered"))

    # --- frames -------------------------------------------------------------------------------
    def _dispatch(self, data: str | bytes, recv_us: int) -> None:
        for msg in _messages(data):
            self._handle(msg, recv_us)

    def _handle(self, msg: dict[str, Any], recv_us: int) -> None:
        if not msg:  # the server's ping: a pong must follow, or the server closes the connection
            task = asyncio.create_task(self.send_raw("{}"))
            self._retry_tasks.add(task)
            task.add_done_callback(self._retry_tasks.discard)
            return
        if "id" in msg:
            self._reply(msg)
            return
        push = msg.get("push")
        if not isinstance(push, dict):
            self.stats.unknown_frames += 1
            return
        pub = push.get("pub")
        if isinstance(pub, dict):
            self._publication(str(push.get("channel", "")), pub, recv_us)
        elif "disconnect" in push:
            self.stats.errors[f"disconnect:{push['disconnect'].get('code')}"] += 1
        elif "unsubscribe" in push:
            self.stats.errors[f"unsubscribe:{push['unsubscribe'].get('code')}"] += 1
        else:
            self.stats.unknown_frames += 1

    def _publication(self, channel: str, pub: dict[str, Any], recv_us: int) -> None:
        pos = self.subs.get(channel)
        offset = pub.get("offset")
        if pos is not None and isinstance(offset, int):
            if offset > pos.base:
                pos.seen += 1
            pos.offset = max(pos.offset, offset)
        data = pub.get("data")
        if not isinstance(data, dict):
            self.stats.bad_frames += 1
            return
        if channel.startswith("feed:"):
            self.on_frame(self.index, {"t": "feed", "item": data}, recv_us)
        else:
            self.on_frame(self.index, {"t": "msg", **data}, recv_us)

    def _reply(self, msg: dict[str, Any]) -> None:
        cmd_id = msg.get("id")
        if not isinstance(cmd_id, int):
            self.stats.bad_frames += 1
            return
        rid = cmd_id // IDS_PER_REQUEST
        err = msg.get("error")
        if isinstance(err, dict):
            # The other half of a DM may still answer: FAILED makes that answer count for nothing.
            self._parts[rid] = FAILED
            self._subscribing.pop(rid, None)
            # `temporary` errors (e.g. an engine timeout) processed nothing: retry them.
            self._refused(rid, f"centrifugo_{err.get('code', 'error')}", bool(err.get("temporary")))
            return
        channel = self._subscribing.pop(rid, None)
        if channel is not None:
            result = msg.get("subscribe")
            self._subscribed(channel, result if isinstance(result, dict) else {})
        left = self._parts.get(rid, 1) - 1
        if left < 0:
            return
        if left > 0:
            self._parts[rid] = left
            return
        self._parts.pop(rid, None)
        self._resolve(rid, {"t": "ok"})

    # --- requests -----------------------------------------------------------------------------
    def _encode_request(self, rid: int, frame: Frame) -> str | bytes:
        t = frame.get("t")
        base = rid * IDS_PER_REQUEST
        if t == DM:
            data = {"from": self.user, "to": frame["to"], "body": frame["body"]}
            self._parts[rid] = 2
            return "\n".join(_line({"id": base + j, "publish": {"channel": ch, "data": data}})
                             for j, ch in enumerate((inbox_channel(frame["to"]), self.inbox)))
        if t == POST:
            self._parts[rid] = 1
            data = {"author": self.user, "body": frame["body"]}
            return _line({"id": base, "publish": {"channel": feed_channel(self.user), "data": data}})
        if t == "follow":
            channel = feed_channel(str(frame["user"]))
            self._parts[rid] = 1
            self._subscribing[rid] = channel
            return _line({"id": base, "subscribe": {"channel": channel}})
        raise NotImplementedError(f"the centrifugo target has no {t!r}")

    async def request(self, frame: Frame, *, idempotent: bool) -> Frame:
        if frame.get("t") not in (DM, POST, "follow"):
            raise RequestFailed("unsupported")
        if frame.get("t") == "follow" and feed_channel(str(frame["user"])) in self.subs:
            return {"t": "ok"}
        return await super().request(frame, idempotent=idempotent)

    async def _keepalive(self, ws: ClientConnection, now: float) -> None:
        """Centrifugo pings the client (`{}`); nothing to send on our own."""

    def inbox_gaps(self) -> int:
        """Offsets of the personal channel below the newest one seen that never arrived."""
        pos = self.subs.get(self.inbox)
        if pos is None:
            return 0
        return max(0, (pos.offset - pos.base) - pos.seen)

    def info(self) -> dict[str, Any]:
        pos = self.subs.get(self.inbox)
        return {"offset": pos.offset if pos else 0, "gaps": self.inbox_gaps()}


def _line(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _messages(data: str | bytes) -> list[dict[str, Any]]:
    text = data.decode() if isinstance(data, bytes) else data
    out = []
    for line in text.split("\n"):
        if not line:
            continue
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if isinstance(msg, dict):
            out.append(msg)
    return out
