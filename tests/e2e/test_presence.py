"""Presence end to end, on the real stack with two gateway replicas and two presence shards."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import httpx
import pytest
import websockets
from replicas import kill_replica, until_two_replicas
from wsclient import Client, Frame, Server, dev_token, keep_alive, unique_user

from peernet.config import presence_lease_ms
from peernet.routing import shard_for

pytestmark = [pytest.mark.ray, pytest.mark.stack]

# How long a change may take to reach a watcher on this shared 2-core machine before a test
# calls it lost (the benchmark measures the real latency).
CHANGE_WAIT_S = 5.0
# How long `watch_online` waits for the online report of a user who has just connected, the
# set-up of a test rather than what it checks: longer, because the test before may have just
# restarted a presence shard (test_a_killed_presence_shard_loses_no_online_user), and in CI the
# first reports to the restarted actor once took longer than CHANGE_WAIT_S.
ONLINE_WAIT_S = 20.0


async def connect(server: Server, user: str, **kw: Any) -> Client:
    # The token first: fetched after the socket opens, a slow one could miss the hello deadline.
    token = await dev_token(server.url, user)
    return await Client.connect(server.ws_url, server.url, user, token=token, **kw)


async def connect_on(server: Server, user: str, *, avoid: str | None = None,
                     on: str | None = None) -> Client:
    """A connection of `user` on a replica other than `avoid`, or on replica `on`. Serve sends a
    connection to the replica with fewer open ones, so the misses stay open until the hit."""
    misses: list[Client] = []
    try:
        for _ in range(60):
            client = await connect(server, user)
            replica = client.welcome["replica"]
            if (avoid is None or replica != avoid) and (on is None or replica == on):
                return client
            misses.append(client)
        pytest.fail(f"never reached the wanted gateway replica (avoid={avoid}, on={on})")
    finally:
        for miss in misses:
            await miss.close()


async def watch(client: Client, users: list[str]) -> dict[str, dict[str, Any]]:
    reply = await client.request({"t": "watch", "users": users})
    assert reply["t"] == "presence_state", reply
    return reply["users"]  # type: ignore[no-any-return]


async def watch_online(client: Client, users: list[str], online: list[str]
                       ) -> dict[str, dict[str, Any]]:
    """`watch` of `users`, of whom `online` have just connected: a user's online report is made
    beside its welcome, so it may land after the snapshot; then it arrives as a change, which
    is awaited here and folded into the states returned."""
    states = await watch(client, users)
    for u in online:
        if states[u]["status"] != "online":
            frame = await client.next(lambda f, u=u: f.get("t") == "presence"
                                      and f.get("user") == u and f.get("status") == "online",
                                      ONLINE_WAIT_S)
            states[u] = {"status": "online", "since": frame["ts"]}
    return states


async def change(client: Client, user: str, timeout: float = CHANGE_WAIT_S) -> Frame:
    return await client.next(lambda f: f.get("t") == "presence" and f.get("user") == user,
                             timeout)


async def no_change(client: Client, user: str, within: float) -> None:
    with contextlib.suppress(TimeoutError):
        frame = await change(client, user, within)
        pytest.fail(f"unexpected presence change {frame}")


async def http_presence(server: Server, users: list[str], *, as_user: str | None = None
                        ) -> dict[str, dict[str, Any]]:
    token = await dev_token(server.url, as_user or unique_user("http"))
    async with httpx.AsyncClient() as http:
        reply = await http.get(f"{server.url}/v1/presence", params={"users": ",".join(users)},
                               headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert reply.status_code == 200, reply.text
    return reply.json()["users"]  # type: ignore[no-any-return]


async def test_a_watcher_on_one_replica_sees_a_user_on_another_go_online_and_offline(
        peernet_server: Server) -> None:
    alice = unique_user("alice")
    watcher = await connect_on(peernet_server, unique_user("w"))
    before = await watch(watcher, [alice])
    assert before == {alice: {"status": "offline", "since": 0}}  # never seen

    t0 = int(time.time() * 1000)
    a = await connect_on(peernet_server, alice, avoid=watcher.welcome["replica"])
    online = await change(watcher, alice)
    assert online["status"] == "online" and online["ts"] >= t0 - 5
    assert set(online) == {"t", "user", "status", "ts"}
    await a.close()
    offline = await change(watcher, alice)
    assert offline["status"] == "offline" and offline["ts"] >= online["ts"]
    # A new watch reads the state the last change left.
    other = await connect(peernet_server, unique_user("w"))
    assert await watch(other, [alice]) == {alice: {"status": "offline", "since": offline["ts"]}}
    for c in (watcher, other):
        await c.close()


async def test_a_user_with_two_connections_stays_online_until_the_last_closes(
        peernet_server: Server) -> None:
    bob = unique_user("bob")
    watcher = await connect(peernet_server, unique_user("w"))
    await watch(watcher, [bob])
    first = await connect(peernet_server, bob)
    online = await change(watcher, bob)
    # The second connection on the other replica: two replicas hold bob.
    second = await connect_on(peernet_server, bob, avoid=first.welcome["replica"])
    third = await connect_on(peernet_server, bob, on=first.welcome["replica"])
    await first.close()
    await third.close()
    await no_change(watcher, bob, 1.0)
    assert (await http_presence(peernet_server, [bob]))[bob] == {"status": "online",
                                                                 "since": online["ts"]}
    second.cut()  # a network cut counts as a close too
    assert (await change(watcher, bob))["status"] == "offline"
    await watcher.close()


async def test_unwatch_stops_the_changes_and_watch_replies_every_user(
        peernet_server: Server) -> None:
    carol, dave = unique_user("carol"), unique_user("dave")
    d = await connect(peernet_server, dave)
    watcher = await connect(peernet_server, unique_user("w"), binary=False)  # JSON too
    states = await watch_online(watcher, [carol, dave, carol], online=[dave])
    assert list(states) == [carol, dave]
    assert states[carol] == {"status": "offline", "since": 0}
    assert states[dave]["status"] == "online" and states[dave]["since"] > 0
    ok = await watcher.request({"t": "unwatch", "users": [carol]})
    assert ok == {"t": "ok", "rid": ok["rid"]}
    c = await connect(peernet_server, carol)
    await d.close()
    assert (await change(watcher, dave))["status"] == "offline"
    await no_change(watcher, carol, 0.5)
    await c.close()
    await watcher.close()


async def test_watching_more_than_the_cap_is_a_bad_request(peernet_server: Server) -> None:
    cap = peernet_server.cfg.gateway.max_watch
    watcher = await connect(peernet_server, unique_user("w"))
    too_many = await watcher.request({"t": "watch", "users": [f"cap_{i}" for i in range(cap + 1)]})
    assert too_many["t"] == "error" and too_many["code"] == "bad_request"
    first = await watch(watcher, [f"cap_{i}" for i in range(cap - 10)])
    assert len(first) == cap - 10
    over = await watcher.request({"t": "watch", "users": [f"more_{i}" for i in range(11)]})
    assert over["t"] == "error" and over["code"] == "bad_request"
    # Users already watched do not count twice; exactly the cap is fine.
    again = await watch(watcher, [f"cap_{i}" for i in range(5)] + [f"more_{i}" for i in range(10)])
    assert len(again) == 15
    for bad in ({"users": "cap_1"}, {"users": ["Not A User"]}, {}):
        reply = await watcher.request({"t": "watch", **bad})
        assert reply["t"] == "error" and reply["code"] == "bad_request", reply
    pong = await watcher.request({"t": "ping"})  # the connection stays open
    assert pong["t"] == "pong"
    await watcher.close()


async def test_presence_over_http(peernet_server: Server) -> None:
    erin, frank = unique_user("erin"), unique_user("frank")
    e = await connect(peernet_server, erin)
    for _ in range(50):  # reported to the shard asynchronously
        states = await http_presence(peernet_server, [erin, frank])
        if states[erin]["status"] == "online":
            break
        await asyncio.sleep(0.1)
    assert states[erin]["status"] == "online" and states[erin]["since"] > 0
    assert states[frank] == {"status": "offline", "since": 0}
    async with httpx.AsyncClient(base_url=peernet_server.url) as http:
        assert (await http.get("/v1/presence", params={"users": erin})).status_code == 401
        token = await dev_token(peernet_server.url, frank)
        auth = {"Authorization": f"Bearer {token}"}
        for bad in ("", "Bad User", ",".join(f"u{i}" for i in range(1001))):
            reply = await http.get("/v1/presence", params={"users": bad}, headers=auth)
            assert reply.status_code == 400, bad
            assert reply.json()["error"]["code"] == "bad_request"
    await e.close()


async def test_a_dead_connection_is_closed_with_4408_and_counted_out(
        peernet_server: Server) -> None:
    heartbeat_s = peernet_server.cfg.gateway.heartbeat_ms / 1000
    grace = unique_user("grace")
    watcher = await connect(peernet_server, unique_user("w"))
    # Sends nothing after its hello, not even WebSocket pings.
    silent = await websockets.connect(peernet_server.ws_url, ping_interval=None)
    await silent.send(json.dumps({"t": "hello", "token": await dev_token(peernet_server.url, grace)}))
    assert json.loads(await silent.recv())["t"] == "welcome"
    await watch(watcher, [grace])
    started = time.monotonic()
    pinger = asyncio.create_task(keep_alive([watcher], heartbeat_s / 2))
    try:
        # Grace's online report may land after the watch's snapshot, as an `online` change
        # first (presence is reported beside the welcome, not before it).
        await watcher.next(lambda f: f.get("t") == "presence" and f.get("user") == grace
                                     and f.get("status") == "offline", 2 * heartbeat_s + 10)
    finally:
        pinger.cancel()
    elapsed = time.monotonic() - started
    assert 2 * heartbeat_s - 1 <= elapsed <= 2 * heartbeat_s + 5, elapsed
    with contextlib.suppress(websockets.ConnectionClosed):
        await asyncio.wait_for(silent.recv(), 5)
    assert silent.close_code == 4408
    await watcher.close()


async def test_a_killed_presence_shard_loses_no_online_user(
        peernet_server: Server, ray_cluster: None) -> None:
    import ray

    from actors.wiring import NAMESPACE, presence_shard_name

    n = peernet_server.cfg.shards.presence_shards
    victim = 0
    users = [unique_user("k") for _ in range(40)]
    mine = [u for u in users if shard_for(u, n) == victim][:6]
    assert len(mine) >= 4
    watcher = await connect(peernet_server, unique_user("w"))
    alive = [watcher]
    pinger = asyncio.create_task(keep_alive(alive))
    await watch(watcher, mine)
    clients = {}
    for u in mine[:4]:
        clients[u] = await connect(peernet_server, u)
        alive.append(clients[u])
    for u in mine[:4]:
        assert (await change(watcher, u))["status"] == "online"

    handle = ray.get_actor(presence_shard_name(victim, n), namespace=NAMESPACE)
    ray.kill(handle, no_restart=False)
    # While it is down (or restarting): one user leaves, one arrives; the reports wait for it.
    await clients.pop(mine[0]).close()
    clients[mine[4]] = await connect(peernet_server, mine[4])
    alive.append(clients[mine[4]])
    seen = {}
    deadline = time.monotonic() + 60
    while set(seen) != {mine[0], mine[4]}:
        frame = await watcher.next(lambda f: f.get("t") == "presence",
                                   max(0.1, deadline - time.monotonic()))
        assert frame["user"] in (mine[0], mine[4]), f"a change nobody made: {frame}"
        seen[frame["user"]] = frame["status"]
    assert seen == {mine[0]: "offline", mine[4]: "online"}

    # The restarted shard knows who is online: nobody else changed, and it still counts them.
    states = await http_presence(peernet_server, mine)
    assert {u: s["status"] for u, s in states.items()} == {
        mine[0]: "offline", mine[1]: "online", mine[2]: "online", mine[3]: "online",
        mine[4]: "online", mine[5]: "offline"}
    stats = await handle.stats.remote()
    assert stats["started"] and stats["online"] >= 4
    await no_change(watcher, mine[1], 0.5)
    await clients.pop(mine[1]).close()
    assert (await change(watcher, mine[1]))["status"] == "offline"
    pinger.cancel()
    for c in (*clients.values(), watcher):
        await c.close()


async def test_a_killed_gateway_replicas_users_go_offline_within_the_lease(
        peernet_server: Server, ray_cluster: None) -> None:
    lease_s = presence_lease_ms(peernet_server.cfg) / 1000
    watcher = await connect(peernet_server, unique_user("w"))
    clients = [watcher]
    pinger = asyncio.create_task(keep_alive(clients))
    doomed_replica = None
    users = [unique_user("h") for _ in range(3)]
    for u in users:
        c = await connect_on(peernet_server, u, avoid=watcher.welcome["replica"])
        doomed_replica = c.welcome["replica"]
        clients.append(c)
    survivor = await connect_on(peernet_server, unique_user("s"), on=watcher.welcome["replica"])
    clients.append(survivor)
    states = await watch_online(watcher, [*users, survivor.user], online=[*users, survivor.user])
    assert {s["status"] for s in states.values()} == {"online"}

    assert doomed_replica is not None
    killed = kill_replica(doomed_replica)
    offline_after: dict[str, float] = {}
    while len(offline_after) < len(users):
        frame = await watcher.next(lambda f: f.get("t") == "presence", lease_s + 10)
        if frame["user"] == survivor.user and frame["status"] == "online":
            continue  # a repeat of its state (the survivor's replica re-reports its users)
        assert frame["user"] in users and frame["status"] == "offline", frame
        offline_after[frame["user"]] = time.monotonic() - killed
    assert max(offline_after.values()) <= lease_s + 0.5, offline_after
    assert (await http_presence(peernet_server, [survivor.user]))[survivor.user]["status"] == "online"
    pinger.cancel()
    for c in clients:
        with contextlib.suppress(Exception):
            await c.close()
    await until_two_replicas(peernet_server)


