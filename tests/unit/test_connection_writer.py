"""The connection's writer (serve/connection.py) when the server offers its own socket
(`DirectSocket`): in-order frames go out at once, without a task or an ASGI send; anything else
goes the writer's way, so the order and the outbound bound are the same either way."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from starlette.websockets import WebSocketState
from unit_helpers import unit_cfg

from bus.inbox_memory import MemoryInboxCache
from peernet.codec import decode_frame, pack
from peernet.errors import CloseCode
from serve.connection import Connection
from serve.hub import Outgoing
from serve.liveness import HEARD_EXTENSION


class ServerSocket:
    """The replica server's socket as `Connection` sees it: `write_now` takes a frame at once
    unless `full` (a transport whose buffer is full), in which case it writes nothing."""

    def __init__(self) -> None:
        self.heard_at = 0.0
        self.full = False
        self.written: list[bytes | str] = []

    def write_now(self, data: bytes | str) -> bool:
        if self.full:
            return False
        self.written.append(data)
        return True


class AsgiSocket:
    """The Starlette side of the same socket: what the writer task sends lands in the same list,
    so the test sees one stream in the order it reached the wire."""

    def __init__(self, server: ServerSocket) -> None:
        self.server = server
        self.scope: dict[str, Any] = {"type": "websocket", "extensions": {HEARD_EXTENSION: server}}
        self.application_state = WebSocketState.CONNECTED
        self.asgi_sends = 0
        self.closed: list[int] = []

    async def send_bytes(self, data: bytes) -> None:
        self.asgi_sends += 1
        self.server.written.append(data)

    async def close(self, code: int, reason: str) -> None:
        self.closed.append(code)


def item(seq: int) -> dict[str, Any]:
    return {"t": "msg", "seq": seq, "id": f"m{seq}", "from": "bob", "body": "hi", "ts": 1}


def open_connection(inbox: MemoryInboxCache | None = None,
                    outbound_queue: int | None = None) -> tuple[Connection, ServerSocket, AsgiSocket]:
    server = ServerSocket()
    ws = AsgiSocket(server)
    env = {} if outbound_queue is None else {"PEERNET_OUTBOUND_QUEUE": str(outbound_queue)}
    deps = SimpleNamespace(cfg=unit_cfg(env), inbox=inbox, replica="unit")
    conn = Connection(ws, deps, None, {}, None, None)  # type: ignore[arg-type]
    conn.user = "alice"
    conn._early = None
    return conn, server, ws


def seqs(written: list[bytes | str]) -> list[int]:
    return [int(decode_frame(w)["seq"]) for w in written]


def test_in_order_pushes_go_out_at_once_as_the_bytes_they_came_as_without_a_task() -> None:
    conn, server, ws = open_connection()
    payloads = [pack(item(s)) for s in (1, 2, 3)]
    for payload, s in zip(payloads, (1, 2, 3), strict=True):
        conn.push(Outgoing(item(s), packed=payload))
    conn.send({"t": "pong"})
    assert server.written[:3] == payloads  # the pub/sub bytes, untouched
    assert decode_frame(server.written[3])["t"] == "pong"
    assert conn._writer is None and ws.asgi_sends == 0  # no task was needed
    assert conn._outbox is None  # nor a queue: an idle connection holds none
    assert conn.last_seq == 3


def test_a_push_already_sent_is_dropped_as_the_writer_would() -> None:
    conn, server, _ = open_connection()
    for s in (1, 2, 2, 1, 3):
        conn.push(Outgoing(item(s)))
    assert seqs(server.written) == [1, 2, 3]


async def test_a_gap_is_filled_from_the_inbox_by_the_writer_and_order_holds() -> None:
    inbox = MemoryInboxCache(retention_items=100, retention_ms=10**9)
    await inbox.append([("alice", item(s)) for s in (1, 2, 3)], checkpoint_name="c", checkpoint={})
    conn, server, ws = open_connection(inbox)
    conn.push(Outgoing(item(1)))
    conn.push(Outgoing(item(3)))  # 2 was lost on the way: the writer reads it
    conn.push(Outgoing(item(4)))  # queued behind the writer, not written ahead of it
    assert conn._writer is not None
    await asyncio.wait_for(conn._writer, 5)
    assert seqs(server.written) == [1, 2, 3, 4]
    assert conn._outbox is None  # the queue went with the last frame that waited
    conn.push(Outgoing(item(5)))  # the writer is done: at once again
    assert seqs(server.written)[-1] == 5 and ws.asgi_sends == 3


async def test_a_full_socket_buffer_sends_through_the_writer_and_the_outbound_bound_holds() -> None:
    conn, server, ws = open_connection(outbound_queue=3)
    server.full = True
    conn.push(Outgoing(item(1)))
    assert not server.written and conn._writer is not None  # the writer waits on ASGI instead
    for s in (2, 3, 4):
        conn.push(Outgoing(item(s)))
    assert conn._closer is not None  # the fourth queued frame went over the bound
    await conn._closer
    assert ws.closed == [CloseCode.SLOW_OR_FLOODING]
