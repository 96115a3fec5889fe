"""The Socket.IO adapter for the baseline peer: Engine.IO v4 / Socket.IO v5 spoken directly over
a WebSocket with the same `websockets` client the PeerNet adapter uses, so both targets are
measured through the same client stack (python-socketio's own client would add its own
overheads to one side only).

Packets used: Engine.IO `0` open, `2`/`3` ping/pong, `4` message; inside a message, Socket.IO
`0` connect (auth `{"user": ID}`), `2` event, `3` ack, `1` disconnect, `4` connect error.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection

from bench.client import (
    ConnStats,
    Frame,
    FrameHandler,
    ReconnectingConnection,
    RequestFailed,
    SetupError,
    now_us,
)
from bench.plan import DM

HANDSHAKE_TIMEOUT_S = 10.0


def socketio_url(url: str) -> str:
    base = url.rstrip("/")
    for http, ws in (("http://", "ws://"), ("https://", "wss://")):
        if base.startswith(http):
            base = ws + base[len(http):]
    if "://" not in base:
        base = "ws://" + base
    return base + "/socket.io/?EIO=4&transport=websocket"


class SocketIOTarget:
    """The baseline servers; user i connects to server i mod n (they share rooms through Redis)."""

    name = "socketio"
    kinds = frozenset({DM})

    def __init__(self, urls: Sequence[str], *, request_timeout: float = 15.0) -> None:
        self.urls = [socketio_url(u) for u in urls]
        self.request_timeout = request_timeout

    async def prepare(self, users: Sequence[tuple[int, str]]) -> None:
        """The baseline takes the user id as its auth payload: nothing to fetch."""

    def connection(
        self, index: int, user: str, on_frame: FrameHandler, stats: ConnStats
    ) -> SocketIOConnection:
        return SocketIOConnection(self.urls[index % len(self.urls)], index, user, on_frame, stats,
                                  self.request_timeout)


class SocketIOConnection(ReconnectingConnection):
    def __init__(self, url: str, index: int, user: str, on_frame: FrameHandler, stats: ConnStats,
                 request_timeout: float) -> None:
        super().__init__(index, user, on_frame, stats, request_timeout)
        self.url = url

    async def _handshake(self) -> ClientConnection:
        ws = await websockets.connect(self.url, compression=None, open_timeout=HANDSHAKE_TIMEOUT_S,
                                      ping_interval=None, close_timeout=2, max_size=1 << 20)
        try:
            opened = await asyncio.wait_for(ws.recv(), HANDSHAKE_TIMEOUT_S)
            if not isinstance(opened, str) or not opened.startswith("0"):
                raise SetupError(f"{self.user}: expected Engine.IO open, got {opened!r:.100}")
            await ws.send("40" + json.dumps({"user": self.user}, separators=(",", ":")))
            while True:
                data = await asyncio.wait_for(ws.recv(), HANDSHAKE_TIMEOUT_S)
                if data == "2":
                    await ws.send("3")
                    continue
                if isinstance(data, str) and data.startswith("40"):
                    break
                if isinstance(data, str) and data.startswith("44"):
                    raise SetupError(f"{self.user}: connect refused: {data[2:200]}")
                raise SetupError(f"{self.user}: unexpected frame in handshake: {data!r:.100}")
        except websockets.ConnectionClosed as exc:
            raise SetupError(f"{self.user}: handshake closed: {exc}") from None
        except BaseException:
            await ws.close()
            raise
        self.on_frame(self.index, {"t": "welcome", "user": self.user, "seq": 0}, now_us())
        return ws

    def _dispatch(self, data: str | bytes, recv_us: int) -> None:
        if not isinstance(data, str) or not data:
            self.stats.bad_frames += 1
            return
        if data == "2":  # Engine.IO ping: the pong must go out promptly or the server drops us
            task = asyncio.create_task(self.send_raw("3"))
            self._retry_tasks.add(task)
            task.add_done_callback(self._retry_tasks.discard)
            return
        if data[0] != "4" or len(data) < 2:
            if data[0] != "1":  # 1 is close, handled by the reader's end
                self.stats.unknown_frames += 1
            return
        kind, rest = data[1], data[2:]
        if kind == "2":
            payload = _json(rest)
            if not isinstance(payload, list) or not payload:
                self.stats.bad_frames += 1
                return
            name = payload[0]
            body = payload[1] if len(payload) > 1 and isinstance(payload[1], dict) else {}
            if name == "msg":
                self.on_frame(self.index, {"t": "msg", **body}, recv_us)
            else:
                self.stats.unknown_frames += 1
        elif kind == "3":
            digits = 0
            while digits < len(rest) and rest[digits].isdigit():
                digits += 1
            payload = _json(rest[digits:])
            if digits == 0 or not isinstance(payload, list):
                self.stats.bad_frames += 1
                return
            reply = payload[0] if payload and isinstance(payload[0], dict) else {}
            if "error" in reply:
                self._refused(int(rest[:digits]), str(reply["error"]), False)
            else:
                self._resolve(int(rest[:digits]), {"t": "ok", **reply})
        elif kind == "1":
            task = asyncio.create_task(self._drop())
            self._retry_tasks.add(task)
            task.add_done_callback(self._retry_tasks.discard)
        else:
            self.stats.unknown_frames += 1

    async def _drop(self) -> None:
        ws = self._ws
        if ws is not None:
            await ws.close()

    def _encode_request(self, rid: int, frame: Frame) -> str | bytes:
        if frame.get("t") != DM:
            raise NotImplementedError(f"the Socket.IO baseline has no {frame.get('t')!r}")
        data = {"to": frame["to"], "body": frame["body"], "cid": frame.get("cid")}
        return f"42{rid}" + json.dumps(["dm", data], separators=(",", ":"))

    async def request(self, frame: Frame, *, idempotent: bool) -> Frame:
        if frame.get("t") != DM:
            raise RequestFailed("unsupported")
        return await super().request(frame, idempotent=idempotent)


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None
