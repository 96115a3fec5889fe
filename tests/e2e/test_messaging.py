"""Direct messages end to end, on the real stack with two gateway replicas."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest
from replicas import kill_replica, until_two_replicas
from test_social import until
from wsclient import Client, Server, dev_token, unique_user

from bus.inbox_redis import RedisInboxCache
from bus.redis import redis_client

pytestmark = [pytest.mark.ray, pytest.mark.stack]


async def connect(server: Server, user: str, **kw: object) -> Client:
    return await Client.connect(server.ws_url, server.url, user, **kw)  # type: ignore[arg-type]


async def connect_on_replica(server: Server, user: str, avoid: str | None) -> Client:
    """A connection of `user` on a replica other than `avoid` (the ingress picks replicas
    itself). Misses stay open until then: HAProxy balances by least connections, so a closed
    miss would send the next try to the same replica."""
    misses: list[Client] = []
    try:
        for _ in range(40):
            client = await connect(server, user)
            if avoid is None or client.welcome["replica"] != avoid:
                return client
            misses.append(client)
        pytest.fail("never reached a second gateway replica")
    finally:
        for miss in misses:
            await miss.close()


async def test_two_clients_on_different_replicas_exchange_dms_in_one_order(
        peernet_server: Server) -> None:
    alice_name, bob_name = unique_user("alice"), unique_user("bob")
    alice = await connect_on_replica(peernet_server, alice_name, None)
    bob = await connect_on_replica(peernet_server, bob_name, alice.welcome["replica"])
    assert alice.welcome["replica"] != bob.welcome["replica"]

    for i in range(10):
        sender, to = (alice, bob_name) if i % 2 == 0 else (bob, alice_name)
        ok = await sender.request({"t": "dm", "to": to, "body": f"m{i}"})
        assert ok["t"] == "ok" and ok["conv"] == f"dm:{min(alice_name, bob_name)}:{max(alice_name, bob_name)}"

    got_a = await alice.items(10)
    got_b = await bob.items(10)
    assert [m["id"] for m in got_a] == [m["id"] for m in got_b]
    assert sorted(m["body"] for m in got_a) == sorted(f"m{i}" for i in range(10))
    assert [m["seq"] for m in got_a] == list(range(1, 11))
    assert [m["seq"] for m in got_b] == list(range(1, 11))
    await alice.close()
    await bob.close()


async def test_500_dms_to_an_offline_user_arrive_on_resume_in_order(peernet_server: Server) -> None:
    sender_name, rcpt_name = unique_user("s"), unique_user("r")
    rcpt = await connect(peernet_server, rcpt_name)
    start_seq = rcpt.welcome["seq"]
    await rcpt.close()

    sender = await connect(peernet_server, sender_name)
    ids = []
    for i in range(500):
        ok = await sender.request({"t": "dm", "to": rcpt_name, "body": f"n{i}"})
        assert ok["t"] == "ok", ok
        ids.append(ok["id"])

    # The log has them all; reconnect once they have reached the inbox.
    rcpt = await connect(peernet_server, rcpt_name, resume=start_seq)
    deadline = asyncio.get_running_loop().time() + 30
    while rcpt.welcome["seq"] < 500 and asyncio.get_running_loop().time() < deadline:
        await rcpt.close()
        await asyncio.sleep(0.5)
        rcpt = await connect(peernet_server, rcpt_name, resume=start_seq)
    items = await rcpt.items(500, timeout=60)
    resumed = await rcpt.expect("resumed")
    assert [m["id"] for m in items] == ids
    assert [m["seq"] for m in items] == list(range(start_seq + 1, start_seq + 501))
    assert resumed == {"t": "resumed", "from": start_seq, "to": start_seq + 500, "complete": True}
    await rcpt.close()
    await sender.close()


async def test_a_connection_cut_mid_stream_and_resumed_loses_nothing(peernet_server: Server) -> None:
    sender_name, rcpt_name = unique_user("s"), unique_user("r")
    sender = await connect(peernet_server, sender_name)
    rcpt = await connect(peernet_server, rcpt_name)

    async def send_all() -> list[str]:
        ids = []
        for i in range(200):
            ok = await sender.request({"t": "dm", "to": rcpt_name, "body": f"c{i}"})
            ids.append(ok["id"])
            await asyncio.sleep(0.005)
        return ids

    sending = asyncio.create_task(send_all())
    seen: dict[str, int] = {}
    for m in await rcpt.items(40):
        seen[m["id"]] = m["seq"]
    last = max(seen.values())
    rcpt.cut()
    await asyncio.sleep(0.3)
    rcpt = await connect(peernet_server, rcpt_name, resume=last)
    ids = await sending
    while not set(ids) <= set(seen):
        frame = await rcpt.next(lambda f: f.get("t") in ("msg", "resumed"), timeout=30)
        if frame["t"] == "msg":
            seen[frame["id"]] = frame["seq"]
    assert set(ids) <= set(seen)
    assert sorted(seen.values()) == list(range(1, len(seen) + 1))
    await rcpt.close()
    await sender.close()


async def test_a_killed_session_shard_loses_no_acknowledged_message(peernet_server: Server) -> None:
    import ray

    from actors.wiring import NAMESPACE, session_shard_name

    sender_name, rcpt_name = unique_user("s"), unique_user("r")
    sender = await connect(peernet_server, sender_name)
    rcpt = await connect(peernet_server, rcpt_name)
    n = peernet_server.cfg.shards.session_shards
    from peernet.routing import shard_for

    victim = session_shard_name(shard_for(rcpt_name, n), n)

    ray.init(address=peernet_server.gcs_address, namespace=NAMESPACE, log_to_driver=False)
    try:
        async def send_all() -> list[str]:
            ids = []
            for i in range(150):
                while True:
                    reply = await sender.request({"t": "dm", "to": rcpt_name, "body": f"k{i}",
                                                  "cid": f"k{i}"})
                    if reply["t"] == "ok":
                        break
                    assert reply["code"] == "unavailable", reply
                ids.append(reply["id"])
                await asyncio.sleep(0.01)
            return ids

        sending = asyncio.create_task(send_all())
        await asyncio.sleep(0.5)
        ray.kill(ray.get_actor(victim, namespace=NAMESPACE), no_restart=False)
        ids = await sending
    finally:
        ray.shutdown()

    # The live stream may have been cut short by the kill; resume fetches whatever it missed.
    seen = {m["id"] for m in await rcpt.items(1, timeout=60)}
    await rcpt.close()
    rcpt = await connect(peernet_server, rcpt_name, resume=0)
    deadline = asyncio.get_running_loop().time() + 90
    while not set(ids) <= seen:
        assert asyncio.get_running_loop().time() < deadline, f"missing {len(set(ids) - seen)}"
        try:
            frame = await rcpt.next(lambda f: f.get("t") in ("msg", "resumed"), timeout=5)
        except TimeoutError:
            await rcpt.close()
            rcpt = await connect(peernet_server, rcpt_name, resume=0)
            continue
        if frame["t"] == "msg":
            seen.add(frame["id"])
    await rcpt.close()
    await sender.close()


async def test_a_duplicate_cid_yields_the_same_id_and_one_delivery(peernet_server: Server) -> None:
    a_name, b_name = unique_user("a"), unique_user("b")
    a = await connect(peernet_server, a_name)
    b = await connect(peernet_server, b_name)
    first = await a.request({"t": "dm", "to": b_name, "body": "once", "cid": "same-1"})
    second = await a.request({"t": "dm", "to": b_name, "body": "once", "cid": "same-1"})
    assert first["t"] == second["t"] == "ok"
    assert first["id"] == second["id"] and first["ts"] == second["ts"]
    marker = await a.request({"t": "dm", "to": b_name, "body": "after", "cid": "same-2"})
    items = await b.items(2)
    assert [m["id"] for m in items] == [first["id"], marker["id"]]
    await a.close()
    await b.close()


async def test_the_senders_other_connections_and_typing(peernet_server: Server) -> None:
    a_name, b_name = unique_user("a"), unique_user("b")
    a1 = await connect(peernet_server, a_name)
    a2 = await connect(peernet_server, a_name, binary=False)  # a JSON connection
    b = await connect(peernet_server, b_name)
    ok = await a1.request({"t": "dm", "to": b_name, "body": "sync", "from": b_name})
    own = await a2.items(1)
    assert own[0]["id"] == ok["id"] and own[0]["from"] == a_name  # `from` in the request ignored
    got = await b.items(1)
    assert got[0]["from"] == a_name
    await a1.send({"t": "typing", "to": b_name})
    typing = await b.expect("typing")
    assert typing == {"t": "typing", "from": a_name, "conv": ok["conv"]}
    pong = await a2.request({"t": "ping"})
    assert pong == {"t": "pong", "rid": pong["rid"]}
    for c in (a1, a2, b):
        await c.close()


async def test_acks_reach_the_inbox_cache_together_newest_per_user(peernet_server: Server) -> None:
    """Acks have no reply; the replica writes each user's newest to Redis with its next batch
    (PEERNET_ACK_FLUSH_MS), where they stay cumulative."""
    alice_name, bob_name = unique_user("alice"), unique_user("bob")
    alice, bob = await connect(peernet_server, alice_name), await connect(peernet_server, bob_name)
    for i in range(3):
        await alice.request({"t": "dm", "to": bob_name, "body": f"m{i}"})
    items = await bob.items(3)
    for item in items:
        await bob.send({"t": "ack", "seq": item["seq"]})
    await bob.send({"t": "ack", "seq": 1})  # older: the mark does not move back
    await alice.send({"t": "ack", "seq": 2})
    cfg = peernet_server.cfg
    client = redis_client(cfg.services.redis_url)
    inbox = RedisInboxCache(client, retention_items=cfg.shards.inbox_retention_items,
                            retention_ms=cfg.shards.inbox_retention_ms)
    try:
        async def marks() -> tuple[int, int]:
            return await inbox.acked(bob_name), await inbox.acked(alice_name)

        assert await until(marks, lambda m: m == (3, 2), within_s=10) == (3, 2)
    finally:
        await client.aclose()
        await alice.close()
        await bob.close()


async def test_history_over_http_for_participants_only(peernet_server: Server) -> None:
    a_name, b_name, eve = unique_user("a"), unique_user("b"), unique_user("eve")
    a = await connect(peernet_server, a_name)
    sent = [await a.request({"t": "dm", "to": b_name, "body": f"h{i}"}) for i in range(5)]
    conv = sent[0]["conv"]
    token_b = await dev_token(peernet_server.url, b_name)
    token_eve = await dev_token(peernet_server.url, eve)
    async with httpx.AsyncClient(base_url=peernet_server.url) as http:
        items: list[dict[str, object]] = []
        for _ in range(300):  # the store of record is written asynchronously from the log
            page = (await http.get(f"/v1/conversations/{conv}/messages", params={"limit": 3},
                                   headers={"Authorization": f"Bearer {token_b}"})).json()
            items = page["items"]
            if len(items) == 3 and page["next"]:
                break
            await asyncio.sleep(0.2)
        assert [i["id"] for i in items] == [s["id"] for s in reversed(sent)][:3]
        assert set(items[0]) == {"id", "conv", "from", "to", "body", "ts"}
        rest = (await http.get(f"/v1/conversations/{conv}/messages",
                               params={"limit": 3, "before": page["next"]},
                               headers={"Authorization": f"Bearer {token_b}"})).json()
        assert [i["id"] for i in rest["items"]] == [s["id"] for s in reversed(sent)][3:]
        forbidden = await http.get(f"/v1/conversations/{conv}/messages",
                                   headers={"Authorization": f"Bearer {token_eve}"})
        assert forbidden.status_code == 403
        anonymous = await http.get(f"/v1/conversations/{conv}/messages")
        assert anonymous.status_code == 401
    await a.close()


async def test_healthz_names_all_four_checks(peernet_server: Server) -> None:
    async with httpx.AsyncClient() as http:
        reply = await http.get(peernet_server.url + "/healthz")
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"status": "ok", "checks": {"kafka": "ok", "redis": "ok", "mongo": "ok",
                                                      "ray": "ok"}}


async def test_metrics_exports_each_consumer_groups_kafka_lag(peernet_server: Server) -> None:
    """/metrics (Prometheus text) carries the consumer lag and client renewals of the session
    shards' groups and the projector's, and the queue depth of every shard actor, read from the
    running actors, and the gateway's own counters."""
    from actors.wiring import actor_names

    a = await connect(peernet_server, unique_user("m"))
    ok = await a.request({"t": "dm", "to": unique_user("n"), "body": "counted"})
    assert ok["t"] == "ok"
    await a.close()
    events = peernet_server.cfg.topics.events
    shards = peernet_server.cfg.shards.session_shards
    wanted = {f'group="peernet.sessions.{i}-of-{shards}@{events}"' for i in range(shards)}
    wanted.add(f'group="peernet.projections@{events}"')
    wanted_depths = {f'shard="{name}"' for name in actor_names(peernet_server.cfg)}
    seen: set[str] = set()
    caught_up: set[str] = set()
    seen_depths: set[str] = set()
    seen_renewals: set[str] = set()
    async with httpx.AsyncClient() as http:
        for _ in range(30):  # a scrape leaves out an actor that is slow to answer
            reply = await http.get(peernet_server.url + "/metrics")
            assert reply.status_code == 200
            lines = [ln for ln in reply.text.splitlines()
                     if ln.startswith("peernet_kafka_consumer_lag{")]
            # Nothing else writes to this server's topics: once the DM is read, every partition
            # of these groups lags by 0. A lag counted from the log's start, or from the last
            # commit, would stay above 0 on the DM's partition.
            caught_up |= {w for w in wanted
                          if (values := [float(ln.rsplit(" ", 1)[1]) for ln in lines if w in ln])
                          and all(v == 0 for v in values)}
            depths = [ln for ln in reply.text.splitlines()
                      if ln.startswith("peernet_shard_queue_depth{")]
            renewals = [ln for ln in reply.text.splitlines()
                        if ln.startswith("peernet_kafka_consumer_renewals{")]
            for ln in depths + renewals:  # counts: non-negative integers
                value = float(ln.rsplit(" ", 1)[1])
                assert value >= 0 and value == int(value), ln
            seen |= {w for w in wanted if any(w in ln for ln in lines)}
            seen_depths |= {w for w in wanted_depths if any(w in ln for ln in depths)}
            seen_renewals |= {w for w in wanted if any(w in ln for ln in renewals)}
            if (seen == wanted and caught_up == wanted and seen_depths == wanted_depths
                    and seen_renewals == wanted):
                break
            await asyncio.sleep(1)
        assert seen == wanted, reply.text[-2000:]
        assert caught_up == wanted, reply.text[-2000:]
        assert seen_depths == wanted_depths, reply.text[-2000:]
        assert seen_renewals == wanted, reply.text[-2000:]
        assert all(float(ln.rsplit(" ", 1)[1]) >= 0 for ln in lines)
        assert "peernet_connections" in reply.text
        # The replica's garbage collections are timed (a replica that served a connection has
        # collected its youngest generation by now).
        gen0 = [ln for ln in reply.text.splitlines()
                if ln.startswith('peernet_gc_pause_seconds_count{generation="0"}')]
        assert gen0 and float(gen0[0].rsplit(" ", 1)[1]) > 0, reply.text[-2000:]


async def test_metrics_cluster_has_every_replicas_series_in_one_scrape(
        peernet_server: Server) -> None:
    """/metrics/cluster, on whichever replica the ingress picks: the series each gateway replica
    published to Redis, told apart by a `replica` label (its id, as in `welcome`), in one valid
    exposition; the deployment-wide gauges once, without it."""
    from prometheus_client.parser import text_string_to_metric_families

    a = await connect_on_replica(peernet_server, unique_user("ca"), None)
    b = await connect_on_replica(peernet_server, unique_user("cb"), a.welcome["replica"])
    replicas = {a.welcome["replica"], b.welcome["replica"]}
    assert len(replicas) == 2
    try:
        await a.send({"t": "ping"})
        await b.send({"t": "ping"})
        async with httpx.AsyncClient() as http:
            # Each replica publishes every PEERNET_METRICS_PUBLISH_MS (5 s): wait until both
            # entries count their socket and its ping.
            for _ in range(30):
                reply = await http.get(peernet_server.url + "/metrics/cluster")
                assert reply.status_code == 200, reply.text
                families = {f.name: f for f in text_string_to_metric_families(reply.text)}
                connected = {s.labels["replica"] for s in families["peernet_connections"].samples
                             if s.value >= 1}
                pinged = {s.labels["replica"] for s in families["peernet_frames_in"].samples
                          if s.labels["type"] == "ping" and s.value >= 1}
                if replicas <= connected & pinged:
                    break
                await asyncio.sleep(1)
            assert replicas <= connected & pinged, reply.text[-3000:]
    finally:
        await a.close()
        await b.close()
    lines = reply.text.splitlines()
    types = [ln.split()[2] for ln in lines if ln.startswith("# TYPE ")]
    assert len(types) == len(set(types)), "a family named twice"
    for family in families.values():
        labelled = {"replica" in s.labels for s in family.samples}
        if family.name in ("peernet_kafka_consumer_lag", "peernet_kafka_consumer_renewals",
                           "peernet_shard_queue_depth", "peernet_cluster_replicas"):
            assert labelled <= {False}, family.name
        else:
            assert labelled <= {True}, family.name
    # Histograms with all their parts, one series per replica.
    parts = {(s.name.rsplit("_", 1)[1], s.labels["replica"])
             for s in families["peernet_delivery_latency_seconds"].samples}
    assert {(p, r) for p in ("bucket", "sum", "count") for r in replicas} <= parts
    live = int(families["peernet_cluster_replicas"].samples[0].value)
    assert live >= 2  # a replica killed by an earlier test may linger for 3 intervals


async def test_a_killed_gateway_replicas_clients_resume_elsewhere_and_lose_nothing(
        peernet_server: Server, ray_cluster: None) -> None:
    """The recipient's gateway replica is SIGKILLed mid-stream: its socket dies with it; the
    client reconnects (to the surviving replica, or the replacement) with `resume`, and every DM
    the sender had acknowledged arrives, seqs gap-free."""
    sender_name, rcpt_name = unique_user("gs"), unique_user("gr")
    sender = await connect_on_replica(peernet_server, sender_name, None)
    rcpt = await connect_on_replica(peernet_server, rcpt_name, sender.welcome["replica"])
    doomed = rcpt.welcome["replica"]

    async def send_all() -> list[str]:
        ids = []
        for i in range(150):
            ok = await sender.request({"t": "dm", "to": rcpt_name, "body": f"g{i}"})
            assert ok["t"] == "ok", ok
            ids.append(ok["id"])
            await asyncio.sleep(0.01)
        return ids

    sending = asyncio.create_task(send_all())
    seen: dict[str, int] = {}
    for m in await rcpt.items(30):
        seen[m["id"]] = m["seq"]
    kill_replica(doomed)
    # Whatever reached the dying socket counts: read until it is gone.
    with contextlib.suppress(Exception):
        while True:
            m = await rcpt.next(lambda f: f.get("t") == "msg", timeout=10)
            seen[m["id"]] = m["seq"]
    rcpt = await Client.connect(peernet_server.ws_url, peernet_server.url, rcpt_name,
                                resume=max(seen.values()))
    ids = await sending
    while not set(ids) <= set(seen):
        frame = await rcpt.next(lambda f: f.get("t") in ("msg", "resumed"), timeout=30)
        if frame["t"] == "msg":
            seen[frame["id"]] = frame["seq"]
    assert sorted(seen.values()) == list(range(1, len(seen) + 1))
    await rcpt.close()
    await sender.close()
    await until_two_replicas(peernet_server)


async def test_a_compression_offer_is_declined_and_the_connection_serves(
        peernet_server: Server) -> None:
    # Browsers offer permessage-deflate on every socket; the replicas decline it by default
    # (PEERNET_WS_COMPRESSION, serve/ws_server.py), so no connection carries compression state.
    import msgpack
    import websockets

    token = await dev_token(peernet_server.url, unique_user("deflate"))
    async with websockets.connect(peernet_server.ws_url, compression="deflate") as ws:
        assert ws.response is not None
        assert "Sec-WebSocket-Extensions" not in ws.response.headers, ws.response.headers
        await ws.send(msgpack.packb({"t": "hello", "token": token}))
        assert msgpack.unpackb(await ws.recv())["t"] == "welcome"
        await ws.send(msgpack.packb({"t": "ping", "rid": 1}))
        assert msgpack.unpackb(await ws.recv())["t"] == "pong"


async def test_clients_straight_on_the_replicas_endpoints_exchange_dms(peernet_server: Server) -> None:
    """GET /v1/endpoints lists every replica's own address (each publishes it once its server
    listens); clients that connect there, past HAProxy, land on that replica and DMs between
    two replicas arrive as through the ingress. (A replica killed by an earlier test may still
    be listed for up to three publish intervals: a client goes on to the next address, as
    docs/protocol.md says.)"""

    async def answers(http: httpx.AsyncClient, url: str) -> bool:
        try:
            await http.get(f"{url}/healthz")
        except httpx.HTTPError:
            return False
        return True

    deadline = asyncio.get_running_loop().time() + 60
    async with httpx.AsyncClient(timeout=5) as http:
        while True:
            listed = (await http.get(f"{peernet_server.url}/v1/endpoints")).json()["endpoints"]
            assert len({e["url"] for e in listed}) == len(listed), listed
            live = [e for e in listed if await answers(http, e["url"])]
            if len(live) >= 2:
                break
            assert asyncio.get_running_loop().time() < deadline, listed
            await asyncio.sleep(1)
    first, second = live[0], live[1]
    alice_name, bob_name = unique_user("alice"), unique_user("bob")
    alice = await Client.connect(first["ws"], first["url"], alice_name)
    bob = await Client.connect(second["ws"], second["url"], bob_name)
    try:
        assert alice.welcome["replica"] == first["replica"]
        assert bob.welcome["replica"] == second["replica"]
        ok = await alice.request({"t": "dm", "to": bob_name, "body": "straight"})
        assert ok["t"] == "ok"
        (got,) = await bob.items(1)
        assert got["id"] == ok["id"] and got["body"] == "straight"
    finally:
        await alice.close()
        await bob.close()
