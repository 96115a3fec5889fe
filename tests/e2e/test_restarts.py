"""A running PeerNet across restarts of its services (the local stack's Kafka and Redis, stopped
and started under it): /healthz names what is down, nothing is acknowledged that is not durable,
and the same server, with the same open WebSockets, carries on once the service is back.

Each test waits until the server is healthy again before it ends, so that the tests after it
find the server as they expect."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from stack_faults import require_ours_running
from wsclient import Client, Server, dev_token, keep_alive, unique_user

from peernet.config import PeerNetConfig

pytestmark = [pytest.mark.ray, pytest.mark.stack]

RECOVERY_S = 120.0  # a restarted Kafka elects its leaders and the server's clients reconnect


async def connect(server: Server, user: str) -> Client:
    return await Client.connect(server.ws_url, server.url, user)


async def health(server: Server) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(timeout=10) as http:
        reply = await http.get(server.url + "/healthz")
    return reply.status_code, reply.json()


async def until_health(server: Server, status: int, within_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + within_s
    while True:
        code, body = await health(server)
        if code == status:
            return body
        if time.monotonic() > deadline:
            pytest.fail(f"/healthz still {code} after {within_s:.0f}s: {body}")
        await asyncio.sleep(0.5)


@contextlib.asynccontextmanager
async def two_clients(server: Server, prefix: str) -> AsyncIterator[tuple[Client, Client]]:
    """Two connected users, kept alive meanwhile (restarts take longer than 2 x heartbeat), and
    closed at the end."""
    alice = await connect(server, unique_user(prefix + "a"))
    bob = await connect(server, unique_user(prefix + "b"))
    pinger = asyncio.create_task(keep_alive([alice, bob], server.cfg.gateway.heartbeat_ms / 2000))
    try:
        yield alice, bob
    finally:
        pinger.cancel()
        await alice.close()
        await bob.close()


async def send_until_ok(client: Client, frame: dict[str, Any], within_s: float) -> dict[str, Any]:
    """Send `frame` (which carries a cid) until it is acknowledged, as a client retries after
    `unavailable`; the cid makes the retries one message."""
    deadline = time.monotonic() + within_s
    while True:
        reply = await client.request(dict(frame))
        if reply["t"] == "ok":
            return reply
        assert reply["t"] == "error" and reply["code"] == "unavailable", reply
        if time.monotonic() > deadline:
            pytest.fail(f"not acknowledged within {within_s:.0f}s: {reply}")
        await asyncio.sleep(1.0)


async def test_healthz_names_kafka_while_the_broker_is_stopped_and_nothing_unsaved_is_acked(
        peernet_server: Server, stack_control: Any, cfg: PeerNetConfig) -> None:
    require_ours_running(stack_control, cfg, "kafka")
    async with two_clients(peernet_server, "k") as (alice, bob):
        bob_name = bob.user
        await asyncio.to_thread(stack_control.stop_service, cfg, "kafka")

        down = await until_health(peernet_server, 503, within_s=30)
        assert down["status"] == "unavailable"
        assert down["failing"] == ["kafka"], down
        assert down["checks"]["kafka"].startswith("down"), down
        assert all(down["checks"][name] == "ok" for name in ("redis", "mongo", "ray")), down

        # Durable before acknowledged: with the log down, a DM is refused, never acknowledged.
        frame = {"t": "dm", "to": bob_name, "body": "sent while kafka was down", "cid": "k-1"}
        refused = await alice.request(dict(frame))
        assert refused["t"] == "error" and refused["code"] == "unavailable", refused

        await asyncio.to_thread(stack_control.start_service, cfg, "kafka", wait=True,
                                timeout=RECOVERY_S)
        up = await until_health(peernet_server, 200, within_s=RECOVERY_S)
        assert set(up["checks"].values()) == {"ok"}

        # The refused DM may have reached the log after all; the client's retry (same cid) is
        # written under the same id, so whichever copy arrives first carries the id of the ok.
        sent = await send_until_ok(alice, frame, within_s=RECOVERY_S)
        got = await bob.next(lambda f: f.get("t") == "msg" and f.get("body") == frame["body"],
                             timeout=RECOVERY_S)
        assert got["id"] == sent["id"]
        again = await alice.request(dict(frame))
        assert again["t"] == "ok" and again["id"] == sent["id"]


async def test_open_connections_carry_on_after_redis_restarts(
        peernet_server: Server, stack_control: Any, cfg: PeerNetConfig) -> None:
    """Redis restarted under a running server: every pooled connection to it died. The next
    commands reconnect (no `unavailable` to clients once Redis answers), the pub/sub reader
    resubscribes, and presence and DMs flow to the WebSockets that stayed open."""
    require_ours_running(stack_control, cfg, "redis")
    async with two_clients(peernet_server, "r") as (alice, bob):
        alice_name, bob_name = alice.user, bob.user
        first = await alice.request({"t": "dm", "to": bob_name, "body": "before", "cid": "r-0"})
        assert first["t"] == "ok", first
        await bob.next(lambda f: f.get("t") == "msg" and f.get("body") == "before")

        await asyncio.to_thread(stack_control.stop_service, cfg, "redis")
        await asyncio.to_thread(stack_control.start_service, cfg, "redis", wait=True,
                                timeout=RECOVERY_S)
        await until_health(peernet_server, 200, within_s=RECOVERY_S)

        # Commands on the pool's dead connections are sent again on fresh ones: no error.
        watched = await bob.request({"t": "watch", "users": [alice_name]})
        assert watched["t"] == "presence_state", watched
        after = await alice.request({"t": "dm", "to": bob_name, "body": "after", "cid": "r-1"})
        assert after["t"] == "ok", after
        got = await bob.next(lambda f: f.get("t") == "msg" and f.get("body") == "after",
                             timeout=RECOVERY_S)
        assert got["id"] == after["id"]


async def test_delivery_goes_on_while_mongodb_is_stopped_and_history_catches_up(
        peernet_server: Server, stack_control: Any, cfg: PeerNetConfig) -> None:
    """The store of record is written from the log, behind delivery: with MongoDB stopped, DMs
    are acknowledged and delivered as usual; once it is back the projector writes what it
    missed, and the conversation's history over HTTP holds every message."""
    require_ours_running(stack_control, cfg, "mongo")
    async with two_clients(peernet_server, "m") as (alice, bob):
        bob_name = bob.user
        await asyncio.to_thread(stack_control.stop_service, cfg, "mongo")
        down = await until_health(peernet_server, 503, within_s=30)
        assert down["failing"] == ["mongo"], down

        sent = []
        for i in range(5):
            ok = await alice.request({"t": "dm", "to": bob_name, "body": f"while mongo is down {i}"})
            assert ok["t"] == "ok", ok
            sent.append(ok["id"])
        got = await bob.items(5)
        assert [g["id"] for g in got] == sent

        await asyncio.to_thread(stack_control.start_service, cfg, "mongo", wait=True,
                                timeout=RECOVERY_S)
        await until_health(peernet_server, 200, within_s=RECOVERY_S)
        token = await dev_token(peernet_server.url, bob_name)
        conv = got[0]["conv"]
        deadline = time.monotonic() + RECOVERY_S
        async with httpx.AsyncClient(base_url=peernet_server.url, timeout=10) as http:
            while True:
                reply = await http.get(f"/v1/conversations/{conv}/messages",
                                       headers={"Authorization": f"Bearer {token}"})
                ids = [i["id"] for i in reply.json().get("items", [])] if reply.is_success else []
                if ids == list(reversed(sent)):
                    break
                assert time.monotonic() < deadline, (reply.status_code, reply.text[:500])
                await asyncio.sleep(0.5)
