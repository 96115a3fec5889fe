"""Hostile input gets the protocol's answers and harms no other connection."""

from __future__ import annotations

import asyncio
import secrets
import time

import jwt
import msgpack
import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from wsclient import Client, Server, dev_token, unique_user

pytestmark = [pytest.mark.ray, pytest.mark.stack]

# How long the replicas may take to count closed connections out of an address's places.
PLACES_BACK_WITHIN_S = 30.0


async def connect(server: Server, user: str, **kw: object) -> Client:
    return await Client.connect(server.ws_url, server.url, user, **kw)  # type: ignore[arg-type]


async def still_serves(client: Client) -> None:
    pong = await client.request({"t": "ping"})
    assert pong["t"] == "pong"


@pytest.fixture
async def bystander(peernet_server: Server) -> Client:
    """A connection that must keep working whatever the others send."""
    return await connect(peernet_server, unique_user("bystander"))


async def test_bad_frames_get_errors_and_the_connection_stays_open(
        peernet_server: Server, bystander: Client) -> None:
    c = await connect(peernet_server, unique_user("h"))
    await c.send_raw(b"\xc1\xff\x00garbage")
    assert (await c.expect("error"))["code"] == "bad_frame"
    await c.send_raw(msgpack.packb([1, 2, 3]))
    assert (await c.expect("error"))["code"] == "bad_frame"
    await c.send_raw(msgpack.packb({"rid": 5, "x": 1}))
    assert (await c.expect("error"))["code"] == "bad_frame"
    await c.send_raw(msgpack.packb({"t": 42}))
    assert (await c.expect("error"))["code"] == "bad_frame"
    unknown = await c.request({"t": "teleport"})
    assert unknown["t"] == "error" and unknown["code"] == "unknown_type"
    await still_serves(c)
    await still_serves(bystander)
    await c.close()


async def test_json_connections_get_json_errors(peernet_server: Server) -> None:
    c = await connect(peernet_server, unique_user("j"), binary=False)
    await c.send_raw("{not json")
    assert (await c.expect("error"))["code"] == "bad_frame"
    await still_serves(c)
    await c.close()


@pytest.mark.parametrize("frame", [
    {"t": "dm", "body": "no recipient"},
    {"t": "dm", "to": "Not-A-User!", "body": "x"},
    {"t": "dm", "to": "someone", "body": 42},
    {"t": "dm", "to": "someone", "body": ""},
    {"t": "dm", "to": "someone", "body": "x", "cid": "c" * 65},
    {"t": "typing", "to": ["list"]},
    {"t": "ack", "seq": "three"},
    {"t": "ping", "rid": "r" * 65},
])
async def test_missing_or_mistyped_fields_are_bad_requests(peernet_server: Server,
                                                          frame: dict[str, object]) -> None:
    c = await connect(peernet_server, unique_user("f"))
    if "rid" in frame:
        await c.send(frame)
        reply = await c.expect("error")
        assert "rid" not in reply
    else:
        reply = await c.request(frame)
    assert reply["t"] == "error" and reply["code"] == "bad_request", reply
    assert reply["message"]
    await still_serves(c)
    await c.close()


async def test_over_long_bodies_and_dms_to_oneself_are_refused(peernet_server: Server) -> None:
    me = unique_user("me")
    c = await connect(peernet_server, me)
    limit = peernet_server.cfg.gateway.max_body_chars
    too_long = await c.request({"t": "dm", "to": unique_user("x"), "body": "y" * (limit + 1)})
    assert too_long["code"] == "bad_request"
    self_dm = await c.request({"t": "dm", "to": me, "body": "hi me"})
    assert self_dm["code"] == "bad_request"
    assert c.welcome["seq"] == 0 and not [f for f in c.pending if f.get("t") == "msg"]
    await c.close()


async def test_a_1_mib_frame_closes_with_1009(peernet_server: Server, bystander: Client) -> None:
    c = await connect(peernet_server, unique_user("big"))
    await c.send_raw(msgpack.packb({"t": "dm", "to": "someone", "body": "z" * (1 << 20)}))
    code, _ = await c.wait_closed()
    assert code == 1009
    await still_serves(bystander)


async def hello_then_close_code(server: Server, first: bytes | str | None) -> int | None:
    async with websockets.connect(server.ws_url) as ws:
        if first is not None:
            await ws.send(first)
        try:
            async with asyncio.timeout(server.cfg.gateway.hello_timeout_s + 10):
                async for _ in ws:
                    pass
        except websockets.ConnectionClosed:
            pass
        return ws.close_code


async def test_bad_unsigned_expired_and_missing_tokens_close_with_4401(peernet_server: Server) -> None:
    user = unique_user("t")
    gw = peernet_server.cfg.gateway
    now = int(time.time())
    forged = jwt.encode({"sub": user, "exp": now + 60}, "not-the-secret-" + "x" * 32, algorithm="HS256")
    expired = jwt.encode({"sub": user, "exp": now - 10}, gw.token_secret, algorithm="HS256")
    unsigned = jwt.encode({"sub": user, "exp": now + 60}, None, algorithm="none")  # type: ignore[arg-type]
    for token in (forged, expired, unsigned, "", "garbage"):
        code = await hello_then_close_code(peernet_server,
                                           msgpack.packb({"t": "hello", "token": token}))
        assert code == 4401, token
    no_token = await hello_then_close_code(peernet_server, msgpack.packb({"t": "hello"}))
    assert no_token == 4401
    not_hello = await hello_then_close_code(
        peernet_server, msgpack.packb({"t": "ping", "token": await dev_token(peernet_server.url, user)}))
    assert not_hello == 4401


async def test_no_hello_in_time_closes_with_4408(peernet_server: Server) -> None:
    started = time.monotonic()
    assert await hello_then_close_code(peernet_server, None) == 4408
    assert time.monotonic() - started >= peernet_server.cfg.gateway.hello_timeout_s - 0.5


async def test_websocket_pings_alone_keep_a_connection_open_and_silence_closes_it_with_4408(
        peernet_server: Server) -> None:
    """The contract counts WebSocket pings as traffic; uvicorn answers them, the app reads them
    from the replica's protocol (serve/ws_server.py). Both connections disable the client
    library's own keepalive and answer nothing but the server's pings (which do not count).
    (tests/e2e/test_proxy_ingress.py runs the same with the `proxy` ingress.)"""
    await pings_alone_keep_open_and_silence_closes_4408(peernet_server)


async def pings_alone_keep_open_and_silence_closes_4408(peernet_server: Server) -> None:
    """One connection sends WebSocket pings every half heartbeat and nothing else for three
    heartbeats and stays open, then answers a `ping` frame first (nothing else was sent to it);
    one sends nothing after its hello and is closed with 4408 after 2 x heartbeat."""
    heartbeat_s = peernet_server.cfg.gateway.heartbeat_ms / 1000

    async def hello() -> ClientConnection:
        ws = await websockets.connect(peernet_server.ws_url, ping_interval=None)
        token = await dev_token(peernet_server.url, unique_user("p"))
        await ws.send(msgpack.packb({"t": "hello", "token": token}))
        assert msgpack.unpackb(await ws.recv())["t"] == "welcome"
        return ws

    async def close_code(ws: ClientConnection, within_s: float) -> int | None:
        try:
            async with asyncio.timeout(within_s):
                async for _ in ws:
                    pass
        except websockets.ConnectionClosed:
            pass
        return ws.close_code

    pinging, silent = await hello(), await hello()
    started = time.monotonic()
    closed_after: list[float] = []
    silent_closed = asyncio.create_task(close_code(silent, 2 * heartbeat_s + 10))
    silent_closed.add_done_callback(lambda _: closed_after.append(time.monotonic() - started))
    while time.monotonic() - started < 3 * heartbeat_s + 1:
        await asyncio.wait_for(await pinging.ping(), 10)
        await asyncio.sleep(heartbeat_s / 2)
    assert pinging.close_code is None
    assert await silent_closed == 4408
    assert 2 * heartbeat_s - 1 <= closed_after[0] <= 2 * heartbeat_s + 5, closed_after
    await pinging.send(msgpack.packb({"t": "ping", "rid": 1}))
    pong = msgpack.unpackb(await asyncio.wait_for(pinging.recv(), 10))
    assert pong == {"t": "pong", "rid": 1}
    await pinging.close()


async def test_a_flood_is_rate_limited_then_closed_and_others_are_unharmed(
        peernet_server: Server, bystander: Client) -> None:
    gw = peernet_server.cfg.gateway
    c = await connect(peernet_server, unique_user("flood"))
    frame = msgpack.packb({"t": "ping"})
    sent = 0
    try:
        for _ in range(gw.rate_burst + 2 * gw.flood_close_after):
            await c.send_raw(frame)
            sent += 1
    except websockets.ConnectionClosed:
        pass
    code, _ = await c.wait_closed(30)
    assert code == 4429
    limited = [f for f in c.pending if f.get("t") == "error"]
    assert limited and all(f["code"] == "rate_limited" for f in limited)
    assert sum(1 for f in c.pending if f.get("t") == "pong") <= gw.rate_burst + gw.rate_per_s * 10
    await still_serves(bystander)


async def hello_from(server: Server, token: str, forwarded_for: str | None
                     ) -> tuple[ClientConnection | None, int | None, str]:
    """A connection that says hello with X-Forwarded-For (as a load balancer in front of Serve's
    HAProxy adds it): the live socket, or None with the close code and reason."""
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    ws = await websockets.connect(server.ws_url, additional_headers=headers, max_size=None)
    try:
        await ws.send(msgpack.packb({"t": "hello", "token": token}))
        frame = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 30))
    except websockets.ConnectionClosed:
        return None, ws.close_code, ws.close_reason or ""
    assert frame["t"] == "welcome", frame
    return ws, None, ""


async def test_a_connection_flood_from_one_address_is_bounded_and_others_get_in(
        peernet_server: Server, bystander: Client) -> None:
    limit = peernet_server.cfg.gateway.max_connections_per_address
    replicas = peernet_server.cfg.gateway.replicas
    assert 0 < limit <= 100, "the test server's limit is low (tests/conftest.py)"
    flooder = f"203.0.113.{secrets.randbelow(250) + 1}"  # TEST-NET-3: not a trusted proxy
    token = await dev_token(peernet_server.url, unique_user("flood"))

    async def flood() -> list[ClientConnection]:
        """Open connections from the flooder's address until one is refused."""
        opened: list[ClientConnection] = []
        while True:
            ws, code, reason = await hello_from(peernet_server, token, flooder)
            if ws is None:
                assert (code, reason) == (4429, "too many connections from this address")
                return opened
            opened.append(ws)
            # The limit is per replica; HAProxy spreads one address's sockets over them.
            assert len(opened) <= replicas * limit, "no connection was refused"

    first = await flood()
    assert len(first) >= limit
    others: list[ClientConnection] = []
    try:
        # Another address, and a connection that names none (HAProxy's own), still get in.
        for address in ("198.51.100.9", None):
            ws, code, reason = await hello_from(peernet_server, token, address)
            assert ws is not None, (address, code, reason)
            others.append(ws)
        # An address the client put left of the appended one does not let it in.
        _, code, _ = await hello_from(peernet_server, token, f"198.51.100.10, {flooder}")
        assert code == 4429
        await still_serves(bystander)
        # Closing gives the places back: as many get in again (give or take the one that
        # HAProxy's tie between replicas may send to the full one first).
        opened_before = len(first)
        for ws in first + others:
            await ws.close()
        first, others = [], []
        # The replicas count a close once they have seen it: flood again until they have.
        deadline = time.monotonic() + PLACES_BACK_WITHIN_S
        while len(first := await flood()) < opened_before - 1 and time.monotonic() < deadline:
            for ws in first:
                await ws.close()
            await asyncio.sleep(0.2)
        assert len(first) >= opened_before - 1
    finally:
        for ws in first + others:
            await ws.close()
