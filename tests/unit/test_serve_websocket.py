"""The gateway's WebSocket endpoint (serve/app.py, serve/connection.py, serve/hub.py,
serve/handlers.py) on in-memory backends: handshake, limits, closes, resume, the writer's seq
order, replies and encodings."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgpack
import pytest
from gateway_harness import Frame, Gateway, ServerClosed, gateway
from unit_helpers import FAST_TIMING, inbox_item, unique_user
from waiting import wait_until

from actors.inbox_items import parse_recipients
from bus.inbox_memory import MemoryInboxCache
from peernet.envelope import Event
from peernet.errors import CloseCode, unavailable
from peernet.tokens import issue_token
from serve.app import build_app


@pytest.fixture(scope="module")
def gw() -> Any:
    """One app for the tests that need no settings of their own (users are unique per test)."""
    with gateway() as g:
        yield g


@pytest.fixture(scope="module")
def fast() -> Any:
    """Hello timeout 0.5 s, heartbeat 300 ms: for the tests of those timeouts."""
    with gateway(FAST_TIMING) as g:
        yield g


def msg(seq: int, **extra: Any) -> Frame:
    return inbox_item(seq, **extra)


def events_of(gw: Gateway, user: str) -> list[Any]:
    """The records of the logs that concern `user`: the events topic and the messages topic,
    which carries DMs (the app is shared by tests)."""
    return [r for topic in (gw.cfg.topics.events, gw.cfg.topics.messages)
            for r in gw.log.records(topic) if user in parse_recipients(r.headers)]


# -- handshake ---------------------------------------------------------------------------------


def test_welcome_has_the_protocol_shape(gw: Gateway) -> None:
    user = unique_user("alice")
    with gw.connect(user) as (_, welcome):
        assert welcome["t"] == "welcome"
        assert welcome["user"] == user
        assert isinstance(welcome["session"], str) and welcome["session"]
        assert welcome["seq"] == 0
        assert welcome["heartbeat"] == gw.cfg.gateway.heartbeat_ms
    with gw.connect(user) as (_, again):
        assert again["session"] != welcome["session"]


def test_a_websocket_to_the_endpoint_skips_the_middleware_stack(gw: Gateway) -> None:
    """GatewayApp's direct path (serve/app.py): the socket is served without Starlette's
    middleware and router, whose frames would live as long as the connection; HTTP still goes
    through them."""
    app = gw.client.app
    stack = app.middleware_stack  # type: ignore[attr-defined]
    seen: list[str] = []

    async def recording(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])
        await stack(scope, receive, send)

    app.middleware_stack = recording  # type: ignore[attr-defined]
    try:
        with gw.connect(unique_user("alice")) as (ws, _):
            assert ws.request({"t": "ping", "rid": 1}) == {"t": "pong", "rid": 1}
        assert seen == []
        assert gw.client.get("/healthz").status_code == 200
        assert seen == ["http"]
    finally:
        app.middleware_stack = stack  # type: ignore[attr-defined]


def test_welcome_seq_is_the_newest_inbox_seq(gw: Gateway) -> None:
    user = unique_user("alice")
    gw.put_items(user, [msg(s) for s in (1, 2, 3)])
    with gw.connect(user) as (ws, welcome):
        assert welcome["seq"] == 3
        # Without resume nothing is replayed: the next frame is the reply.
        assert ws.request({"t": "ping", "rid": 1}) == {"t": "pong", "rid": 1}


@pytest.mark.parametrize("first", [
    msgpack.packb({"t": "ping", "rid": 1}),
    msgpack.packb({"t": "hello"}),
    msgpack.packb({"t": "hello", "token": "not-a-token"}),
    msgpack.packb([1, 2]),
    b"\xc1",
    '{"t":"dm","to":"bob","body":"hi"}',
], ids=["ping", "no-token", "bad-token", "not-a-map", "undecodable", "json-dm"])
def test_a_first_frame_other_than_a_valid_hello_closes_4401(gw: Gateway, first: bytes | str) -> None:
    with gw.open() as ws:
        ws.send_raw(first)
        code, frames = ws.closed()
    assert code == CloseCode.BAD_TOKEN
    assert frames == []


def test_an_expired_or_foreign_token_closes_4401(gw: Gateway) -> None:
    expired = issue_token("alice", gw.cfg.gateway, ttl_s=-1)
    foreign = issue_token("alice", type(gw.cfg.gateway)(token_secret="x" * 40))
    for token in (expired, foreign):
        with gw.open() as ws:
            ws.send({"t": "hello", "token": token})
            assert ws.closed()[0] == CloseCode.BAD_TOKEN


def test_no_hello_in_time_closes_4408(fast: Gateway) -> None:
    t0 = time.monotonic()
    with fast.open() as ws:
        code, frames = ws.closed(timeout=3)
    assert code == CloseCode.TIMEOUT and frames == []
    assert 0.4 < time.monotonic() - t0 < 5


def test_heartbeat_silence_closes_4408(fast: Gateway) -> None:
    with fast.connect(unique_user()) as (ws, welcome):
        assert welcome["heartbeat"] == 300
        t0 = time.monotonic()
        code, frames = ws.closed(timeout=3)
    assert code == CloseCode.TIMEOUT and frames == []
    # 2 x heartbeat (300 ms) of silence.
    assert 0.5 < time.monotonic() - t0 < 5


def test_frames_within_the_heartbeat_keep_the_connection_open() -> None:
    with gateway({"PEERNET_HEARTBEAT_MS": "500"}) as gw, gw.connect(unique_user()) as (ws, _):
        t0 = time.monotonic()
        for i in range(15):  # 1.5 s in all: more than the idle limit of 2 x 500 ms
            time.sleep(0.1)
            assert ws.request({"t": "ping", "rid": i}) == {"t": "pong", "rid": i}
        assert time.monotonic() - t0 > 1.0


def test_a_frame_over_the_limit_closes_1009(gw: Gateway) -> None:
    limit = gw.cfg.gateway.max_frame_bytes
    with gw.connect(unique_user()) as (ws, _):
        assert ws.request({"t": "ping", "rid": 1, "pad": "x" * (limit - 100)})["t"] == "pong"
        ws.send({"t": "ping", "pad": "x" * limit})
        code, _ = ws.closed()
    assert code == CloseCode.MESSAGE_TOO_BIG


def test_a_text_frame_is_measured_in_utf8_bytes(gw: Gateway) -> None:
    limit = gw.cfg.gateway.max_frame_bytes
    with gw.connect(unique_user(), binary=False) as (ws, _):
        # Fewer characters than the limit, more bytes.
        ws.send({"t": "ping", "pad": "é" * (limit // 2 + 10)})
        assert ws.closed()[0] == CloseCode.MESSAGE_TOO_BIG


def test_an_oversized_first_frame_closes_1009(gw: Gateway) -> None:
    with gw.open() as ws:
        ws.send_raw(b"\x00" * (gw.cfg.gateway.max_frame_bytes + 1))
        assert ws.closed()[0] == CloseCode.MESSAGE_TOO_BIG


# -- limits ------------------------------------------------------------------------------------

# A burst of 20 and a refill slow enough that a loaded test machine cannot send under it; a
# queue long enough that the replies never overflow it.
FLOODABLE = {"PEERNET_RATE_PER_S": "2", "PEERNET_RATE_BURST": "20", "PEERNET_OUTBOUND_QUEUE": "1000"}


def test_over_the_rate_frames_get_rate_limited_then_flooding_closes_4429() -> None:
    with gateway(FLOODABLE) as gw, gw.connect(unique_user()) as (ws, _):
        burst = gw.cfg.gateway.rate_burst
        for i in range(burst + 3 * gw.cfg.gateway.flood_close_after):
            ws.send({"t": "ping", "rid": i})
        code, frames = ws.closed()
    assert ws.close_reason == "persistent flooding"
    kinds = [f["t"] for f in frames]
    assert code == CloseCode.SLOW_OR_FLOODING
    assert kinds.count("pong") >= burst
    limited = [f for f in frames if f["t"] == "error"]
    assert limited and all(f["code"] == "rate_limited" for f in limited)
    # Refused frames are not processed: at most a token or two refilled while sending.
    assert kinds.count("pong") <= burst + 5
    assert len(limited) == gw.cfg.gateway.flood_close_after - 1


def test_a_slow_consumer_is_closed_4429() -> None:
    with gateway({"PEERNET_OUTBOUND_QUEUE": "8"}) as gw:
        user = unique_user()
        with gw.connect(user) as (ws, _):
            # Many more pushes than the outbound queue holds, faster than the writer sends.
            gw.publish(user, [{"t": "typing", "from": "bob", "conv": "dm:a:b"}] * 50)
            message = ws.message()
            while message["type"] != "websocket.close":
                message = ws.message()
    assert message["code"] == CloseCode.SLOW_OR_FLOODING
    assert message["reason"] == "slow consumer"


# -- the inbox: resume and the writer ----------------------------------------------------------


def test_resume_replays_the_inbox_past_seq_then_resumed(gw: Gateway) -> None:
    user = unique_user()
    items = [msg(s) for s in range(1, 6)]
    gw.put_items(user, items)
    with gw.connect(user, resume=2) as (ws, welcome):
        assert welcome["seq"] == 5
        assert [ws.recv() for _ in range(3)] == items[2:]
        assert ws.recv() == {"t": "resumed", "from": 2, "to": 5, "complete": True}
        assert ws.request({"t": "ping", "rid": 9}) == {"t": "pong", "rid": 9}


def test_resume_at_the_newest_seq_replays_nothing(gw: Gateway) -> None:
    user = unique_user()
    gw.put_items(user, [msg(s) for s in (1, 2)])
    with gw.connect(user, resume=2) as (ws, _):
        assert ws.recv() == {"t": "resumed", "from": 2, "to": 2, "complete": True}


def test_resume_of_an_empty_inbox_is_complete(gw: Gateway) -> None:
    with gw.connect(unique_user(), resume=0) as (ws, welcome):
        assert welcome["seq"] == 0
        assert ws.recv() == {"t": "resumed", "from": 0, "to": 0, "complete": True}


def test_resume_past_the_retention_is_incomplete() -> None:
    inbox = MemoryInboxCache(retention_items=3, retention_ms=60_000)
    with gateway(inbox=inbox) as gw:
        user = unique_user()
        gw.put_items(user, [msg(s, ts=1_000) for s in range(1, 11)])  # trimmed to 8..10
        with gw.connect(user, resume=2) as (ws, _):
            assert [ws.recv()["seq"] for _ in range(3)] == [8, 9, 10]
            assert ws.recv() == {"t": "resumed", "from": 2, "to": 10, "complete": False}
        with gw.connect(user, resume=7) as (ws, _):
            assert [ws.recv()["seq"] for _ in range(3)] == [8, 9, 10]
            assert ws.recv() == {"t": "resumed", "from": 7, "to": 10, "complete": True}


@pytest.mark.parametrize("resume", [-1, "3", 2.5, True])
def test_a_bad_resume_is_bad_request_and_replays_the_whole_inbox(gw: Gateway, resume: Any) -> None:
    user = unique_user()
    items = [msg(s) for s in (1, 2)]
    gw.put_items(user, items)
    with gw.connect(user, resume=resume) as (ws, _):
        error = ws.expect("error")
        assert error["code"] == "bad_request" and "rid" not in error
        assert [ws.recv(), ws.recv()] == items
        assert ws.recv() == {"t": "resumed", "from": 0, "to": 2, "complete": True}


def test_pushes_after_a_resume_follow_with_higher_seq(gw: Gateway) -> None:
    user = unique_user()
    gw.put_items(user, [msg(s) for s in (1, 2)])
    with gw.connect(user, resume=0) as (ws, _):
        assert [ws.recv()["seq"] for _ in range(2)] == [1, 2]
        ws.expect("resumed")
        new = msg(3)
        gw.put_items(user, [new])
        gw.publish(user, [new])
        assert ws.recv() == new


def test_the_writer_fills_a_seq_gap_from_the_inbox_and_drops_repeats(gw: Gateway) -> None:
    user = unique_user()
    gw.put_items(user, [msg(s) for s in (1, 2, 3)])
    with gw.connect(user) as (ws, welcome):
        assert welcome["seq"] == 3
        later = [msg(s) for s in (4, 5, 6)]
        gw.put_items(user, later)
        gw.publish(user, [later[2]])  # the pushes of 4 and 5 were lost
        assert [ws.recv() for _ in range(3)] == later
        seven = msg(7)
        gw.put_items(user, [seven])
        gw.publish(user, [later[1], msg(3), seven])  # 5 and 3 again: already sent
        assert ws.recv() == seven
        assert ws.request({"t": "ping", "rid": 1}) == {"t": "pong", "rid": 1}


def test_a_push_reaches_every_connection_of_the_user(gw: Gateway) -> None:
    user = unique_user()
    with gw.connect(user) as (a, _), gw.connect(user) as (b, _):
        item = msg(1)
        gw.put_items(user, [item])
        gw.publish(user, [item])
        assert a.recv() == item
        assert b.recv() == item


def test_a_pubsub_reconnect_catches_up_from_the_inbox(gw: Gateway) -> None:
    user = unique_user()
    with gw.connect(user) as (ws, _):
        lost = [msg(1), msg(2)]
        gw.put_items(user, lost)  # stored, but the pushes were lost with the connection

        async def drop() -> None:
            gw.pubsub.drop_connection()

        gw.run(drop)
        assert [ws.recv(), ws.recv()] == lost


def test_an_unavailable_inbox_at_hello_closes_1001() -> None:
    inbox = MemoryInboxCache(retention_items=10, retention_ms=60_000)
    with gateway(inbox=inbox) as gw, gw.open() as ws:
        inbox.set_down(True)
        ws.send({"t": "hello", "token": gw.token(unique_user())})
        assert ws.closed()[0] == CloseCode.GOING_AWAY


# -- requests and replies ----------------------------------------------------------------------


def test_rid_is_echoed_on_replies_and_errors(gw: Gateway) -> None:
    alice, bob = unique_user("a"), unique_user("b")
    with gw.connect(alice) as (ws, _):
        ok = ws.request({"t": "dm", "rid": "r-1", "to": bob, "body": "hi"})
        assert ok["t"] == "ok" and ok["rid"] == "r-1"
        assert set(ok) == {"t", "rid", "id", "conv", "ts"}
        assert ok["conv"] == f"dm:{min(alice, bob)}:{max(alice, bob)}"
        assert ws.request({"t": "ping", "rid": 7}) == {"t": "pong", "rid": 7}
        bad = ws.request({"t": "dm", "rid": 8, "to": "Not A User", "body": "hi"})
        assert bad["t"] == "error" and bad["rid"] == 8 and bad["code"] == "bad_request"
        unknown = ws.request({"t": "teleport", "rid": "x"})
        assert unknown == {**unknown, "t": "error", "rid": "x", "code": "unknown_type"}
        no_rid = ws.request({"t": "nope"})
        assert no_rid["code"] == "unknown_type" and "rid" not in no_rid


@pytest.mark.parametrize("rid", ["x" * 65, 1.5, True, [1], {"a": 1}])
def test_an_invalid_rid_is_bad_request_without_rid(gw: Gateway, rid: Any) -> None:
    with gw.connect(unique_user()) as (ws, _):
        error = ws.request({"t": "ping", "rid": rid})
        assert error["t"] == "error" and error["code"] == "bad_request" and "rid" not in error


def test_a_bad_frame_after_hello_is_an_error_and_the_connection_stays_open(gw: Gateway) -> None:
    with gw.connect(unique_user()) as (ws, _):
        for data in (b"\xc1", msgpack.packb([1]), msgpack.packb({"rid": 1})):
            ws.send_raw(data)
            error = ws.expect("error")
            assert error["code"] == "bad_frame"
        second_hello = ws.request({"t": "hello", "token": "x", "rid": 2})
        assert second_hello["code"] == "bad_request" and second_hello["rid"] == 2
        assert ws.request({"t": "ping", "rid": 3}) == {"t": "pong", "rid": 3}


@pytest.mark.parametrize("frame", [
    {"to": "SELF"}, {"body": ""}, {"body": "x" * 4001}, {"body": 5}, {"to": None},
    {"cid": "c" * 65}, {"cid": 5},
], ids=["self", "empty", "too-long", "not-text", "no-to", "long-cid", "int-cid"])
def test_a_bad_dm_is_bad_request_and_not_stored(gw: Gateway, frame: Frame) -> None:
    alice, bob = unique_user("a"), unique_user("b")
    request = {"t": "dm", "rid": 1, "to": bob, "body": "hi", **frame}
    if request["to"] == "SELF":
        request["to"] = alice
    with gw.connect(alice) as (ws, _):
        reply = ws.request(request)
    assert reply["t"] == "error" and reply["code"] == "bad_request" and reply["rid"] == 1
    assert events_of(gw, alice) == []


def test_a_dm_is_in_the_events_log_when_ok_arrives(gw: Gateway) -> None:
    alice, bob = unique_user("a"), unique_user("b")
    with gw.connect(alice) as (ws, _):
        ok = ws.request({"t": "dm", "rid": 1, "to": bob, "body": "hello", "from": "mallory"})
        (record,) = events_of(gw, alice)
    event = Event.decode(record.value)
    assert event.id == ok["id"] and event.ts == ok["ts"]
    assert event.type == "dm" and event.actor == alice  # the token's user, never `from`
    assert event.data == {"to": bob, "body": "hello", "conv": ok["conv"]}
    assert record.key == ok["conv"].encode()
    assert sorted(parse_recipients(record.headers)) == sorted([alice, bob])


def test_a_dm_with_the_same_cid_is_stored_once_with_one_id(gw: Gateway) -> None:
    alice, bob = unique_user("a"), unique_user("b")
    with gw.connect(alice) as (ws, _):
        first = ws.request({"t": "dm", "rid": 1, "to": bob, "body": "once", "cid": "c1"})
        again = ws.request({"t": "dm", "rid": 2, "to": bob, "body": "once", "cid": "c1"})
        other = ws.request({"t": "dm", "rid": 3, "to": bob, "body": "twice", "cid": "c2"})
    assert first["id"] == again["id"] and first["ts"] == again["ts"]
    assert other["id"] != first["id"]
    assert len(events_of(gw, alice)) == 2


def test_a_dm_while_the_log_is_down_is_unavailable_and_its_retry_is_stored(gw: Gateway) -> None:
    alice, bob = unique_user("a"), unique_user("b")
    with gw.connect(alice) as (ws, _):
        gw.log.set_down(True)
        down = ws.request({"t": "dm", "rid": 1, "to": bob, "body": "hi", "cid": "c"})
        assert down["code"] == "unavailable" and down["rid"] == 1
        gw.log.set_down(False)
        ok = ws.request({"t": "dm", "rid": 2, "to": bob, "body": "hi", "cid": "c"})
        assert ok["t"] == "ok"
    assert len(events_of(gw, alice)) == 1


def test_a_retry_after_a_lost_ack_keeps_the_id_of_the_copy_that_landed(
        gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """The log stored the first attempt but its ack was lost (the caller timed out): the retry
    with the same cid is appended again under the same id, so the copy is a duplicate that
    clients drop by id, not a second message."""
    alice, bob = unique_user("a"), unique_user("b")
    append = gw.log.append

    async def stored_then_lost(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(gw.log, "append", append)  # once
        await append(*args, **kwargs)
        raise unavailable("delivery timed out")

    monkeypatch.setattr(gw.log, "append", stored_then_lost)
    with gw.connect(alice) as (ws, _):
        lost = ws.request({"t": "dm", "rid": 1, "to": bob, "body": "hi", "cid": "c"})
        assert lost["code"] == "unavailable"
        ok = ws.request({"t": "dm", "rid": 2, "to": bob, "body": "hi", "cid": "c"})
        again = ws.request({"t": "dm", "rid": 3, "to": bob, "body": "hi", "cid": "c"})
    assert ok["t"] == "ok" and again["id"] == ok["id"]
    stored = events_of(gw, alice)
    assert len(stored) == 2 and {Event.decode(r.value).id for r in stored} == {ok["id"]}


def test_typing_reaches_the_recipient_and_is_not_stored(gw: Gateway) -> None:
    alice, bob = unique_user("a"), unique_user("b")
    with gw.connect(bob) as (b, _), gw.connect(alice) as (a, _):
        a.send({"t": "typing", "to": bob})
        assert b.recv() == {"t": "typing", "from": alice,
                            "conv": f"dm:{min(alice, bob)}:{max(alice, bob)}"}
        assert a.request({"t": "ping", "rid": 1}) == {"t": "pong", "rid": 1}  # no reply to typing
    assert events_of(gw, alice) == []


def test_ack_is_cumulative_and_has_no_reply(gw: Gateway) -> None:
    user = unique_user()
    with gw.connect(user) as (ws, _):
        ws.send({"t": "ack", "seq": 5})
        ws.send({"t": "ack", "seq": 3})
        assert ws.request({"t": "ping", "rid": 1}) == {"t": "pong", "rid": 1}
        assert ws.request({"t": "ack", "rid": 2, "seq": -1})["code"] == "bad_request"
        # Written with the replica's next batch of acks (PEERNET_ACK_FLUSH_MS), not at once.
        deadline = time.monotonic() + 5
        while gw.run(gw.inbox.acked, user) != 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert gw.run(gw.inbox.acked, user) == 5


def test_a_json_connection_gets_json(gw: Gateway) -> None:
    user = unique_user()
    with gw.connect(user, binary=False) as (ws, welcome):  # WS.recv asserts text frames
        assert welcome["user"] == user
        assert ws.request({"t": "ping", "rid": "j"}) == {"t": "pong", "rid": "j"}
        assert ws.request({"t": "nope", "rid": 1})["code"] == "unknown_type"
        ws.send_raw("{oops")
        assert ws.expect("error")["code"] == "bad_frame"
        item = msg(1, body="é ✓")
        gw.put_items(user, [item])
        gw.publish(user, [item])
        assert ws.recv() == item


def test_a_binary_connection_gets_msgpack(gw: Gateway) -> None:
    with gw.connect(unique_user(), binary=True) as (ws, _):  # WS.recv asserts binary frames
        assert ws.request({"t": "ping", "rid": 1}) == {"t": "pong", "rid": 1}


# -- protocol gaps that once were bugs ------------------------------------------------------------


def test_a_rate_limited_error_echoes_the_rid() -> None:
    with gateway(FLOODABLE) as gw, gw.connect(unique_user()) as (ws, _):
        for i in range(gw.cfg.gateway.rate_burst + 2):
            ws.send({"t": "ping", "rid": i})
        frames = [ws.recv() for _ in range(gw.cfg.gateway.rate_burst + 2)]
    limited = [f for f in frames if f["t"] == "error"]
    assert limited and all("rid" in f for f in limited)


def test_a_lone_surrogate_in_json_is_a_bad_request_and_the_connection_stays_open() -> None:
    with gateway() as gw, gw.connect(unique_user("a"), binary=False) as (ws, _):
        ws.send_raw('{"t":"dm","rid":1,"to":"bob","body":"\\ud800"}')
        reply = ws.recv()
        assert reply["t"] == "error" and reply["rid"] == 1
        assert reply["code"] in ("bad_request", "bad_frame")
        assert ws.request({"t": "ping", "rid": 2}) == {"t": "pong", "rid": 2}


async def _run_like_uvicorn(app: Any, incoming: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run one WebSocket of an ASGI app the way uvicorn does: sending the close takes a while
    (the closing handshake), and once the app has returned the connection is torn down, so a
    send still in flight then is lost. Returns the messages whose send completed before the app
    returned."""
    received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for message in [{"type": "websocket.connect"}, *incoming]:
        received.put_nowait(message)
    completed: list[dict[str, Any]] = []
    returned = False

    async def receive() -> dict[str, Any]:
        return await received.get()

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "websocket.close":
            await asyncio.sleep(0.02)  # the client's close frame comes back
        if not returned:
            completed.append(message)

    scope = {"type": "websocket", "asgi": {"version": "3.0"}, "path": "/v1/ws",
             "raw_path": b"/v1/ws", "root_path": "", "query_string": b"", "headers": [],
             "scheme": "ws", "server": ("unit", 80), "client": ("unit", 1), "subprotocols": []}
    await asyncio.wait_for(app(scope, receive, send), 5)
    returned = True
    await asyncio.sleep(0.05)  # whatever the app left running finishes now, too late
    return completed


@pytest.mark.parametrize(("first", "code"), [
    (msgpack.packb({"t": "ping"}), CloseCode.BAD_TOKEN),
    (msgpack.packb({"t": "hello", "token": "forged"}), CloseCode.BAD_TOKEN),
    (None, CloseCode.TIMEOUT),
    (b"\x00" * 9000, CloseCode.MESSAGE_TOO_BIG),  # over FAST_GATEWAY's 8192
], ids=["not-hello", "bad-token", "no-hello", "too-big"])
async def test_a_close_before_the_welcome_is_sent_before_the_app_returns(
        first: bytes | None, code: int) -> None:
    from gateway_harness import _presence_parts
    from unit_helpers import unit_cfg

    from bus.cache_memory import MemoryCache
    from bus.eventlog_memory import MemoryEventLog
    from bus.pubsub_memory import MemoryPubSub
    from bus.store_memory import MemoryDocumentStore
    from serve.deps import GatewayDeps

    cfg = unit_cfg(FAST_TIMING)
    deps = GatewayDeps(cfg=cfg, log=MemoryEventLog(), cache=MemoryCache(),
                       inbox=MemoryInboxCache(retention_items=10, retention_ms=60_000),
                       pubsub=MemoryPubSub(), store=MemoryDocumentStore(), **_presence_parts())
    incoming = [] if first is None else [{"type": "websocket.receive", "bytes": first}]
    completed = await _run_like_uvicorn(build_app(deps), incoming)
    assert [m["type"] for m in completed] == ["websocket.accept", "websocket.close"], completed
    assert completed[-1]["code"] == code


def test_server_closed_is_raised_on_close(gw: Gateway) -> None:
    # The harness itself: a close is ServerClosed, not a frame.
    with gw.open() as ws:
        ws.send_raw(b"\xc1")
        with pytest.raises(ServerClosed) as caught:
            ws.recv()
    assert caught.value.code == CloseCode.BAD_TOKEN


class FlakyInbox(MemoryInboxCache):
    """An inbox cache whose reads fail while `reads_down` (Redis blipped), other calls work."""

    reads_down = False
    failed_reads = 0

    async def read(self, user: str, after: int, limit: int) -> list[Frame]:
        if self.reads_down:
            from peernet.errors import unavailable

            self.failed_reads += 1
            raise unavailable("inbox cache read timed out")
        return await super().read(user, after, limit)


def test_a_failed_inbox_read_in_the_writer_does_not_leave_a_mute_connection() -> None:
    inbox = FlakyInbox(retention_items=100, retention_ms=10**9)
    with gateway(inbox=inbox) as gw:
        user = unique_user()
        with gw.connect(user) as (ws, _):
            inbox.reads_down = True
            gw.put_items(user, [msg(1), msg(2)])
            gw.publish(user, [msg(2)])  # seq 1 is missing: the writer reads the inbox ...
            wait_until(lambda: inbox.failed_reads >= 1)  # ... and that read fails
            inbox.reads_down = False
            ws.send({"t": "ping", "rid": 1})
            try:
                frames = [ws.recv(timeout=2), ws.recv(timeout=2), ws.recv(timeout=2)]
            except ServerClosed as closed:
                # Closing so that the client resumes is a fine answer too.
                assert closed.code in (CloseCode.GOING_AWAY, 1011)
                return
        assert {"t": "pong", "rid": 1} in frames
