"""The replica's uvicorn settings (serve/ws_server.py), applied to `uvicorn.Config`."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections import deque
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from unit_helpers import eventually, unit_cfg

from serve.ws_server import LeanEvent, LeanQueue, LeanWebSocketProtocol, use_server_settings


@pytest.fixture
def restored_config() -> Iterator[None]:
    original = uvicorn.Config
    try:
        yield
    finally:
        uvicorn.Config = original  # type: ignore[misc]


async def app(scope: object, receive: object, send: object) -> None:  # pragma: no cover
    pass


def test_compression_is_declined_by_default(restored_config: None) -> None:
    assert uvicorn.Config(app).ws_per_message_deflate  # uvicorn's own default agrees to it
    use_server_settings(unit_cfg().gateway)
    assert not uvicorn.Config(app).ws_per_message_deflate


def test_compression_can_be_turned_on_and_an_explicit_argument_wins(restored_config: None) -> None:
    use_server_settings(unit_cfg({"PEERNET_WS_COMPRESSION": "1"}).gateway)
    assert uvicorn.Config(app).ws_per_message_deflate
    assert not uvicorn.Config(app, ws_per_message_deflate=False).ws_per_message_deflate


def test_applying_the_settings_twice_does_not_stack_subclasses(restored_config: None) -> None:
    original = uvicorn.Config
    use_server_settings(unit_cfg().gateway)
    use_server_settings(unit_cfg().gateway)
    assert uvicorn.Config.__mro__[1] is original


def test_the_replica_serves_websockets_with_the_lean_receive_queue(restored_config: None) -> None:
    use_server_settings(unit_cfg().gateway)
    config = uvicorn.Config(app)
    config.load()
    assert config.ws_protocol_class is LeanWebSocketProtocol


def test_the_replica_sends_no_keepalive_pings_of_its_own(restored_config: None) -> None:
    assert uvicorn.Config(app).ws_ping_interval == 20.0  # uvicorn's default: a timer per socket
    use_server_settings(unit_cfg().gateway)
    assert uvicorn.Config(app).ws_ping_interval is None


async def test_lean_queue_gives_items_in_order_to_waiting_getters_first_come_first_served() -> None:
    queue: LeanQueue[int] = LeanQueue()
    assert queue.empty() and queue.qsize() == 0
    queue.put_nowait(1)
    queue.put_nowait(2)
    assert queue.qsize() == 2
    assert [await queue.get(), await queue.get()] == [1, 2]
    first = asyncio.create_task(queue.get())
    second = asyncio.create_task(queue.get())
    await asyncio.sleep(0)  # both wait
    queue.put_nowait(3)
    queue.put_nowait(4)
    assert await asyncio.wait_for(asyncio.gather(first, second), 1) == [3, 4]
    assert queue.empty()


async def test_a_cancelled_get_takes_nothing_and_passes_its_wake_up_on() -> None:
    queue: LeanQueue[str] = LeanQueue()
    cancelled = asyncio.create_task(queue.get())
    waiting = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    queue.put_nowait("a")  # wakes `cancelled`, which is cancelled before it runs
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert await asyncio.wait_for(waiting, 1) == "a"
    idle = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    idle.cancel()
    with pytest.raises(asyncio.CancelledError):
        await idle
    queue.put_nowait("b")
    assert await asyncio.wait_for(queue.get(), 1) == "b"


def holds_a_deque(obj: object) -> bool:
    return any(isinstance(ref, deque) for ref in gc.get_referents(obj))


async def test_an_idle_queue_holds_no_deque_while_its_one_reader_waits() -> None:
    """A socket's queue is idle nearly all its life: empty, with uvicorn's one reader waiting."""
    queue: LeanQueue[str] = LeanQueue()
    reader = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    assert not holds_a_deque(queue)
    queue.put_nowait("a")
    assert await asyncio.wait_for(reader, 1) == "a"
    assert not holds_a_deque(queue) and queue.empty()


async def test_lean_event_behaves_as_asyncio_event() -> None:
    event = LeanEvent()
    assert not event.is_set() and not holds_a_deque(event)
    waiters = [asyncio.create_task(event.wait()) for _ in range(2)]
    cancelled = asyncio.create_task(event.wait())
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert not any(w.done() for w in waiters)
    event.set()
    assert await asyncio.wait_for(asyncio.gather(*waiters), 1) == [True, True]
    assert event.is_set() and await asyncio.wait_for(event.wait(), 1)
    event.clear()
    late = asyncio.create_task(event.wait())
    await asyncio.sleep(0)
    assert not late.done()
    event.set()
    assert await asyncio.wait_for(late, 1)
    assert event._waiters is None  # every waiter gone, none kept


async def test_write_now_puts_frames_on_the_socket_in_order_with_the_asgi_sends(
        restored_config: None) -> None:
    """A real uvicorn server with the replica's settings and a real client: `write_now` frames
    and ASGI sends reach the client in the order they were made; `write_now` declines before
    the handshake and after the close; Serve is asked not to watch the socket for the
    disconnect (the app reads it itself)."""
    import websockets

    from serve.liveness import HEARD_EXTENSION
    from serve.ws_server import DISCONNECT_WATCH_OFF

    seen: dict[str, object] = {}

    async def ws_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        sock = scope["extensions"][HEARD_EXTENSION]
        seen["header"] = DISCONNECT_WATCH_OFF in scope["headers"]
        assert (await receive())["type"] == "websocket.connect"
        seen["before_accept"] = sock.write_now(b"too early")
        await send({"type": "websocket.accept"})
        sock.write_now(b"1")
        await send({"type": "websocket.send", "bytes": b"2"})
        sock.write_now("3")
        # What the handshake parsed and answered is not kept once the socket is open.
        seen["handshake_dropped"] = (sock.request is None and sock.response is None
                                     and not holds_a_deque(sock.writable))
        await send({"type": "websocket.close", "code": 1000})
        seen["after_close"] = sock.write_now(b"too late")
        while (await receive())["type"] != "websocket.disconnect":
            pass

    use_server_settings(unit_cfg().gateway)
    config = uvicorn.Config(ws_app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: server.started)
        port = server.servers[0].sockets[0].getsockname()[1]
        got: list[bytes | str] = []
        async with websockets.connect(f"ws://127.0.0.1:{port}/") as client:
            with contextlib.suppress(websockets.ConnectionClosed):
                while True:
                    got.append(await asyncio.wait_for(client.recv(), 5))
        assert got == [b"1", b"2", "3"]
        assert seen == {"header": True, "before_accept": False, "after_close": False,
                        "handshake_dropped": True}
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)


def test_serves_proxy_is_given_the_ping_relaying_protocol_in_proxy_mode(
        restored_config: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """`peernet serve` names the callback Serve runs in its proxy (`proxy` ingress only); the
    callback makes that process's uvicorn serve sockets with ProxyHeardProtocol."""
    import importlib

    from peernet.config import load_config
    from serve.ray_env import replica_env
    from serve.ws_server import ProxyHeardProtocol

    monkeypatch.delenv("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", raising=False)
    assert "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH" not in replica_env(load_config({}))
    path = replica_env(load_config({"PEERNET_INGRESS": "proxy"}))[
        "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"]
    module, _, name = path.rpartition(".")
    callback = getattr(importlib.import_module(module), name)
    monkeypatch.setenv("PEERNET_HEARTBEAT_MS", "2000")
    assert callback() == []
    config = uvicorn.Config(app)
    assert issubclass(config.ws, ProxyHeardProtocol)  # type: ignore[arg-type]
    assert config.ws.relay_every_s == 0.5  # type: ignore[union-attr]
    assert config.ws_ping_interval is None and not config.ws_per_message_deflate
