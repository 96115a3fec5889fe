"""Connection deadlines (serve/liveness.py): the replica's one timing wheel on a fake clock, and
WebSocket pings counted as traffic by the replica's own uvicorn and by Serve's proxy's
(serve/ws_server.py: LeanWebSocketProtocol, ProxyHeardProtocol), served in-process to a real
WebSocket client."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import pytest
import uvicorn
import websockets
from gateway_harness import _presence_parts
from unit_helpers import eventually, unique_user, unit_cfg

from bus.cache_memory import MemoryCache
from bus.eventlog_memory import MemoryEventLog
from bus.inbox_memory import MemoryInboxCache
from bus.pubsub_memory import MemoryPubSub
from bus.store_memory import MemoryDocumentStore
from peernet.errors import CloseCode
from peernet.tokens import issue_token
from serve.app import build_app
from serve.deps import GatewayDeps
from serve.liveness import HEARD_EXTENSION, HEARD_MESSAGE_KEY, Liveness, tick_for
from serve.ws_server import LeanWebSocketProtocol, ProxyHeardProtocol, proxy_protocol

# -- the wheel, on a fake clock ----------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Conn:
    """A connection as the wheel sees it: silent for `idle` seconds after `heard_at` is dead."""

    def __init__(self, clock: Clock, idle: float = 10.0) -> None:
        self.liveness_tick: int | None = None
        self.heard_at = clock.t
        self.idle = idle
        self.expired = 0
        self.asked = 0
        self.gone = asyncio.Event()

    def deadline(self) -> float:
        self.asked += 1
        return self.heard_at + self.idle

    def expire(self) -> None:
        self.expired += 1
        self.gone.set()


def sweep_until(wheel: Liveness, clock: Clock, until: float, step: float = 0.25) -> None:
    while clock.t < until:
        clock.t = min(until, clock.t + step)
        wheel.sweep()


def test_a_silent_connection_expires_after_its_deadline_and_never_before() -> None:
    clock = Clock()
    wheel = Liveness(1.0, clock)
    conn = Conn(clock)
    wheel._file(conn, conn.deadline())  # watch() without the sweeping task
    sweep_until(wheel, clock, 1009.75)
    assert conn.expired == 0
    sweep_until(wheel, clock, 1011.0)  # due at 1010, swept within the tick after
    assert conn.expired == 1
    assert conn.liveness_tick is None and len(wheel) == 0
    sweep_until(wheel, clock, 1030.0)
    assert conn.expired == 1  # once


def test_being_heard_from_moves_the_deadline_without_touching_the_wheel() -> None:
    clock = Clock()
    wheel = Liveness(1.0, clock)
    conn = Conn(clock)
    wheel._file(conn, conn.deadline())
    for _ in range(50):  # a frame every second for 50 s: an attribute write each time
        sweep_until(wheel, clock, clock.t + 1)
        conn.heard_at = clock.t
    assert conn.expired == 0
    # Asked about once per idle period (when its old deadline came round), not per frame.
    assert conn.asked <= 50 / 9 + 1
    sweep_until(wheel, clock, clock.t + 11)
    assert conn.expired == 1


def test_a_forgotten_connection_is_never_expired() -> None:
    clock = Clock()
    wheel = Liveness(1.0, clock)
    conns = [Conn(clock) for _ in range(3)]
    for conn in conns:
        wheel._file(conn, conn.deadline())
    wheel.forget(conns[1])
    wheel.forget(conns[1])  # twice is harmless
    sweep_until(wheel, clock, clock.t + 12)
    assert [c.expired for c in conns] == [1, 0, 1]


def test_a_deadline_already_past_is_expired_at_the_next_tick() -> None:
    clock = Clock()
    wheel = Liveness(1.0, clock)
    conn = Conn(clock, idle=-5)
    wheel._file(conn, conn.deadline())
    clock.t += 1.0
    assert wheel.sweep() == 1


def test_a_connection_that_fails_is_counted_and_the_others_of_its_tick_still_expire() -> None:
    clock = Clock()
    wheel = Liveness(1.0, clock)

    class Broken(Conn):
        def expire(self) -> None:
            raise RuntimeError("bug")

    conns = [Conn(clock), Broken(clock), Conn(clock)]
    for conn in conns:
        wheel._file(conn, conn.deadline())
    sweep_until(wheel, clock, clock.t + 11)
    assert conns[0].expired == 1 and conns[2].expired == 1


def test_a_long_stall_expires_everything_due_in_one_sweep() -> None:
    clock = Clock()
    wheel = Liveness(0.05, clock)
    conns = [Conn(clock, idle=i) for i in range(1, 6)]
    for conn in conns:
        wheel._file(conn, conn.deadline())
    clock.t += 3600  # many more ticks than buckets
    assert wheel.sweep() == 5


def test_the_tick_is_a_tenth_of_the_shortest_deadline_within_bounds() -> None:
    assert tick_for(10, 50) == 1.0
    assert tick_for(0.5, 0.6) == 0.05
    assert tick_for(0.001) == 0.02


async def test_the_sweeping_task_expires_connections_on_the_real_clock() -> None:
    wheel = Liveness(0.02)
    clock = Clock()
    conn = Conn(clock, idle=0.1)
    conn.heard_at = wheel.now()
    wheel.watch(conn)  # starts the task
    try:
        await asyncio.wait_for(conn.gone.wait(), 5)
        assert wheel.now() >= conn.heard_at + 0.1
    finally:
        await wheel.stop()


# -- WebSocket pings through the replica's uvicorn ---------------------------------------------

HEARTBEAT_MS = 400


@contextlib.asynccontextmanager
async def replica_server(env: dict[str, str] | None = None, ws: type = LeanWebSocketProtocol,
                         **uvicorn_args: Any) -> AsyncIterator[tuple[str, Any]]:
    """The gateway app on in-memory backends, served by uvicorn with WebSocket protocol `ws`
    (the replica's, as `use_server_settings` makes Serve's, or the proxy's), on a free port."""
    cfg = unit_cfg({"PEERNET_HEARTBEAT_MS": str(HEARTBEAT_MS), "PEERNET_HELLO_TIMEOUT_S": "0.5",
                    **(env or {})})
    pubsub = MemoryPubSub()
    deps = GatewayDeps(cfg=cfg, log=MemoryEventLog(), cache=MemoryCache(),
                       inbox=MemoryInboxCache(retention_items=10, retention_ms=60_000),
                       pubsub=pubsub, store=MemoryDocumentStore(), on_startup=[pubsub.start],
                       on_shutdown=[pubsub.stop], **_presence_parts())
    if ws is ProxyHeardProtocol:
        ws = proxy_protocol(cfg.gateway)  # as Serve's proxy gets it for this heartbeat
    async with serving(build_app(deps), lifespan="on", ws=ws, **uvicorn_args) as port:
        yield f"ws://127.0.0.1:{port}/v1/ws", cfg


@contextlib.asynccontextmanager
async def serving(app: Any, ws: type = LeanWebSocketProtocol, **uvicorn_args: Any
                  ) -> AsyncIterator[int]:
    """`app` served by uvicorn with WebSocket protocol `ws` on a free local port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, ws=ws, log_level="warning", **uvicorn_args))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(1000):
            if server.started:
                break
            await asyncio.sleep(0.01)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


async def hello(url: str, cfg: Any) -> Any:
    ws = await websockets.connect(url, ping_interval=None)
    await ws.send(msgpack.packb({"t": "hello", "token": issue_token(unique_user(), cfg.gateway)}))
    assert msgpack.unpackb(await ws.recv())["t"] == "welcome"
    return ws


async def close_code(ws: Any, within_s: float) -> int | None:
    with contextlib.suppress(websockets.ConnectionClosed):
        async with asyncio.timeout(within_s):
            while True:
                await ws.recv()
    return ws.close_code


# The replica's own server reads pings from the protocol; the proxy's relays them as messages.
SERVERS = pytest.mark.parametrize("protocol", [LeanWebSocketProtocol, ProxyHeardProtocol],
                                  ids=["replica", "proxy"])


@SERVERS
async def test_websocket_pings_alone_keep_a_connection_open_and_silence_closes_it_4408(
        protocol: type) -> None:
    heartbeat_s = HEARTBEAT_MS / 1000
    async with replica_server(ws=protocol) as (url, cfg):
        pinging, silent = await hello(url, cfg), await hello(url, cfg)
        loop = asyncio.get_running_loop()
        end = loop.time() + 3 * heartbeat_s + 0.3
        while loop.time() < end:  # WebSocket pings every half heartbeat, not a single frame
            await asyncio.wait_for(await pinging.ping(), 5)
            await asyncio.sleep(heartbeat_s / 2)
        assert pinging.close_code is None, pinging.close_code
        assert await close_code(silent, 5) == CloseCode.TIMEOUT
        # The pings were no frames to answer: the first frame back answers the first sent.
        await pinging.send(msgpack.packb({"t": "ping", "rid": 7}))
        assert msgpack.unpackb(await asyncio.wait_for(pinging.recv(), 5)) == {"t": "pong", "rid": 7}
        # Once the pings stop, the pinging one goes the same way.
        assert await close_code(pinging, 5) == CloseCode.TIMEOUT


@SERVERS
async def test_unsolicited_pongs_count_and_answers_to_the_servers_keepalive_pings_do_not(
        protocol: type) -> None:
    heartbeat_s = HEARTBEAT_MS / 1000
    # uvicorn pings every 0.1 s; the client's library answers each by itself.
    async with replica_server(ws=protocol, ws_ping_interval=0.1, ws_ping_timeout=5) as (url, cfg):
        ponging, answering = await hello(url, cfg), await hello(url, cfg)
        loop = asyncio.get_running_loop()
        end = loop.time() + 3 * heartbeat_s
        while loop.time() < end:
            await ponging.pong(b"beat")
            await asyncio.sleep(heartbeat_s / 2)
        assert ponging.close_code is None
        assert await close_code(answering, 5) == CloseCode.TIMEOUT


@SERVERS
async def test_pings_before_the_hello_do_not_extend_the_hello_deadline(protocol: type) -> None:
    async with replica_server(ws=protocol) as (url, _):
        ws = await websockets.connect(url, ping_interval=None)
        loop = asyncio.get_running_loop()
        opened = loop.time()
        for _ in range(20):
            with contextlib.suppress(websockets.ConnectionClosed):
                await ws.ping()
            await asyncio.sleep(0.05)
            if ws.close_code is not None:
                break
        assert await close_code(ws, 5) == CloseCode.TIMEOUT
        assert loop.time() - opened < 2.0


async def test_the_socket_scope_carries_the_ping_record() -> None:
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["extensions"][HEARD_EXTENSION])
        await receive()
        await send({"type": "websocket.accept"})
        await receive()  # until the client goes

    async with serving(app, lifespan="off") as port, \
            websockets.connect(f"ws://127.0.0.1:{port}/", ping_interval=None) as ws:
        assert seen[0].heard_at == 0.0
        await asyncio.wait_for(await ws.ping(), 5)
        assert seen[0].heard_at > 0.0


async def test_the_proxys_server_relays_a_ping_as_a_message_at_most_once_per_interval() -> None:
    heard: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        while (message := await receive())["type"] == "websocket.receive":
            heard.append(message)

    async with serving(app, ws=ProxyHeardProtocol, lifespan="off") as port, \
            websockets.connect(f"ws://127.0.0.1:{port}/", ping_interval=None) as ws:
        for _ in range(30):  # a ping flood within one relay interval (1 s)
            await asyncio.wait_for(await ws.ping(), 5)
        await ws.send(b"frame")
        await eventually(lambda: len(heard) == 2)
    assert heard == [{"type": "websocket.receive", HEARD_MESSAGE_KEY: True},
                     {"type": "websocket.receive", "bytes": b"frame"}]
