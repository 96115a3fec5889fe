"""A small in-memory PeerNet for the harness's own tests: the subset of the client protocol the
harness speaks (dev tokens, hello/welcome/resume, dm with cid, groups made with group_create and
written to by `dm` with `conv`, post and feed pushes, follow, watch and presence, ack, ping), with
faults to inject (dropped or doubled pushes, connections
kicked mid-request) so the tests can check that the accounting notices them.

It is not PeerNet and proves nothing about PeerNet; it proves the harness measures what it says.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from peernet.codec import decode_frame, encode_frame


@dataclass
class Faults:
    drop_every: int = 0  # every n-th inbox message is neither stored nor pushed to its recipient
    dup_every: int = 0  # every n-th push goes out twice
    kick_every: int = 0  # every n-th dm closes the sender's connection before the ok


@dataclass(eq=False)
class _Conn:
    ws: WebSocket
    user: str
    binary: bool
    out: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)

    def push(self, frame: dict[str, Any]) -> None:
        self.out.put_nowait(encode_frame(frame, self.binary))


class FakePeerNet:
    def __init__(self, faults: Faults | None = None) -> None:
        self.faults = faults or Faults()
        self.inbox: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.conns: dict[str, set[_Conn]] = defaultdict(set)
        self.followers: dict[str, set[str]] = defaultdict(set)
        self.watchers: dict[str, set[_Conn]] = defaultdict(set)
        self.cids: dict[tuple[str, str], dict[str, Any]] = {}
        # conv -> {"title", "owner", "members"}; group_create's cids apart from the dm's
        self.groups: dict[str, dict[str, Any]] = {}
        self.group_cids: dict[tuple[str, str], dict[str, Any]] = {}
        self.ids = itertools.count(1)
        self.items = itertools.count(1)
        self.pushes = itertools.count(1)
        self.dms = itertools.count(1)
        self.app = Starlette(routes=[
            Route("/v1/dev/token", self.token, methods=["POST"]),
            Route("/healthz", self.healthz),
            Route("/metrics", self.metrics),
            WebSocketRoute("/v1/ws", self.ws),
        ])

    async def token(self, request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse({"token": f"tok:{body['user']}"})

    async def healthz(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "checks": {"fake": "ok"}})

    async def metrics(self, request: Request) -> PlainTextResponse:
        return PlainTextResponse('# TYPE peernet_consumer_lag gauge\npeernet_consumer_lag{partition="0"} 2\n'
                                 'peernet_consumer_lag{partition="1"} 1\n')

    # --- delivery ---------------------------------------------------------------------------
    def _push(self, user: str, frame: dict[str, Any]) -> None:
        n = next(self.pushes)
        copies = 2 if self.faults.dup_every and n % self.faults.dup_every == 0 else 1
        for conn in list(self.conns.get(user, ())):
            for _ in range(copies):
                conn.push(frame)

    def _store(self, user: str, item: dict[str, Any]) -> None:
        # Only messages are dropped: a lost `group` note would fail the setup, not the ledger.
        if (item["t"] == "msg" and self.faults.drop_every
                and next(self.items) % self.faults.drop_every == 0):
            return
        seq = len(self.inbox[user]) + 1
        frame = {**item, "seq": seq}
        self.inbox[user].append(frame)
        self._push(user, frame)

    def _presence(self, user: str, status: str) -> None:
        frame = {"t": "presence", "user": user, "status": status, "ts": int(time.time() * 1000)}
        for conn in list(self.watchers.get(user, ())):
            conn.push(frame)

    # --- the socket -------------------------------------------------------------------------
    async def ws(self, ws: WebSocket) -> None:
        await ws.accept()
        first = await ws.receive()
        data = first.get("bytes") if first.get("bytes") is not None else first.get("text")
        if data is None:
            return
        binary = isinstance(data, bytes)
        hello = decode_frame(data)
        token = str(hello.get("token", ""))
        if hello.get("t") != "hello" or not token.startswith("tok:"):
            await ws.close(4401)
            return
        conn = _Conn(ws, token[4:], binary)
        writer = asyncio.create_task(self._writer(conn))
        user = conn.user
        items = self.inbox[user]
        conn.push({"t": "welcome", "user": user, "session": "s", "seq": len(items), "heartbeat": 25000})
        if "resume" in hello:
            since = int(hello["resume"])
            for item in items[since:]:
                conn.push(item)
            conn.push({"t": "resumed", "from": since, "to": len(items), "complete": True})
        self.conns[user].add(conn)
        if len(self.conns[user]) == 1:
            self._presence(user, "online")
        try:
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                raw = msg.get("bytes") if msg.get("bytes") is not None else msg.get("text")
                if raw is None:
                    continue
                if not await self._handle(conn, decode_frame(raw)):
                    break
        except WebSocketDisconnect:
            pass
        finally:
            self.conns[user].discard(conn)
            for ws_set in self.watchers.values():
                ws_set.discard(conn)
            if not self.conns[user]:
                self._presence(user, "offline")
            writer.cancel()

    async def _writer(self, conn: _Conn) -> None:
        with contextlib.suppress(Exception):
            while True:
                data = await conn.out.get()
                if isinstance(data, bytes):
                    await conn.ws.send_bytes(data)
                else:
                    await conn.ws.send_text(data)

    async def _handle(self, conn: _Conn, f: dict[str, Any]) -> bool:
        t, rid, user = f["t"], f.get("rid"), conn.user
        ts = int(time.time() * 1000)
        if t == "dm":
            group = self.groups.get(str(f["conv"])) if "conv" in f else None
            if "conv" in f and group is None:
                conn.push({"t": "error", "rid": rid, "code": "not_found", "message": "no such group"})
                return True
            if group is not None and user not in group["members"]:
                conn.push({"t": "error", "rid": rid, "code": "forbidden", "message": "not a member"})
                return True
            key = (user, str(f.get("cid")))
            known = self.cids.get(key)
            if known is None:
                if group is not None:
                    known = {"id": f"m{next(self.ids)}", "conv": f["conv"], "ts": ts}
                    item = {"t": "msg", **known, "from": user, "body": f["body"]}
                    recipients = list(group["members"])
                else:
                    to = f["to"]
                    lo, hi = sorted((user, to))
                    known = {"id": f"m{next(self.ids)}", "conv": f"dm:{lo}:{hi}", "ts": ts}
                    item = {"t": "msg", **known, "from": user, "to": to, "body": f["body"]}
                    recipients = [to, user]
                self.cids[key] = known
                for u in recipients:
                    self._store(u, item)
            if self.faults.kick_every and next(self.dms) % self.faults.kick_every == 0:
                await asyncio.sleep(0.01)
                await conn.ws.close(1001)
                return False
            conn.push({"t": "ok", "rid": rid, **known})
        elif t == "group_create":
            key = (user, str(f.get("cid")))
            made = self.group_cids.get(key)
            if made is None:
                members = [user, *dict.fromkeys(m for m in f["members"] if m != user)]
                made = {"conv": f"g:{next(self.ids)}", "ts": ts}
                self.group_cids[key] = made
                self.groups[made["conv"]] = {"title": f["title"], "owner": user, "members": members}
                note = {"t": "note", "id": f"n{next(self.ids)}", "kind": "group", "change": "create",
                        "from": user, "ts": ts, "conv": made["conv"], "title": f["title"],
                        "owner": user, "members": members}
                for m in members:
                    self._store(m, note)
            conn.push({"t": "ok", "rid": rid, **made})
        elif t == "post":
            post = {"id": f"p{next(self.ids)}", "author": user, "body": f["body"], "ts": ts, "likes": 0}
            conn.push({"t": "ok", "rid": rid, "id": post["id"], "ts": ts})
            for u in {user, *self.followers[user]}:
                self._push(u, {"t": "feed", "item": post})
        elif t == "follow":
            self.followers[f["user"]].add(user)
            conn.push({"t": "ok", "rid": rid})
        elif t == "watch":
            state = {}
            for u in f["users"]:
                self.watchers[u].add(conn)
                state[u] = {"status": "online" if self.conns.get(u) else "offline", "since": 0}
            conn.push({"t": "presence_state", "rid": rid, "users": state})
        elif t == "ping":
            conn.push({"t": "pong", "rid": rid})
        elif t != "ack":
            conn.push({"t": "error", "rid": rid, "code": "unknown_type", "message": t})
        return True


@contextlib.asynccontextmanager
async def serve_asgi(app: Any, **config: Any) -> AsyncIterator[str]:
    """Run `app` under uvicorn on a free localhost port for the duration of the block; yields
    its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           ws="websockets-sansio", **config))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@contextlib.asynccontextmanager
async def serve_fake(faults: Faults | None = None) -> AsyncIterator[tuple[FakePeerNet, str]]:
    """Run a FakePeerNet on a free localhost port for the duration of the block."""
    fake = FakePeerNet(faults)
    async with serve_asgi(fake.app, lifespan="off") as url:
        yield fake, url
