"""PeerNet on a Redis Cluster, end to end: a `peernet serve` of this module's own (two gateway
replicas) whose PEERNET_REDIS_URL names this module's cluster (three masters, a replica each),
with the local stack's Kafka and MongoDB. DMs, resume, follows, posts, likes, feed pushes and
presence over real WebSockets, the inboxes of two users stored on two masters, a read and the
conversation lists of two users of two session shards, and, last, a
master's crash and its replica's takeover under a stream of DMs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from functools import partial

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis_cluster_fixture import local_redis_cluster
from replicas import connect
from test_presence import ONLINE_WAIT_S, change, watch
from test_read_state import listed
from test_restarts import send_until_ok
from test_social import http_list, ids, ok, page, until
from wsclient import Client, Server, running_server, server_env, server_port, unique_user

from bus.inbox_redis import RedisInboxCache, session_slots
from bus.redis import redis_client
from peernet.config import PeerNetConfig
from peernet.routing import shard_for
from stack.redis_cluster import LocalRedisCluster

pytestmark = [pytest.mark.ray, pytest.mark.stack]

START_TIMEOUT_S = 420.0  # as the session's server: a busy machine may need Ray started twice


@pytest.fixture(scope="module")
def failover_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    """This module's own cluster: its last test kills a master."""
    cluster = local_redis_cluster(tmp_path_factory, replicas=1)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def cluster_server(local_stack: PeerNetConfig, failover_cluster: LocalRedisCluster,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {**server_env(local_stack, tmp_path_factory.mktemp("rc-home")),
           # Kafka and MongoDB are the local stack's, Redis is the cluster.
           "PEERNET_PORT": server_port("PEERNET_TEST_REDIS_CLUSTER_PORT"),
           "PEERNET_REDIS_URL": failover_cluster.url,
           # Two session shards, whose inboxes the cluster keeps on different masters.
           "PEERNET_SESSION_SHARDS": "2"}
    log_path = tmp_path_factory.mktemp("rc-server") / "peernet-serve.log"
    with running_server(env, log_path, START_TIMEOUT_S) as server:
        yield server


async def cluster_client(cluster: LocalRedisCluster) -> RedisCluster:
    client = redis_client(cluster.url)
    assert isinstance(client, RedisCluster)
    await client.initialize()  # the slot map, for master_of
    return client


def master_of(client: RedisCluster, key: str) -> ClusterNode:
    node = client.get_node_from_key(key)
    assert node is not None, key
    return node


def server_inbox(client: RedisCluster, server: Server) -> RedisInboxCache:
    """The inbox cache as `server`'s session shards key it (for the users' key names)."""
    shards = server.cfg.shards
    return RedisInboxCache(client, retention_items=shards.inbox_retention_items,
                           retention_ms=shards.inbox_retention_ms,
                           slots=session_slots(shards.session_shards))


async def resume_holds(server: Server, user: str, start: int, ids: list[str],
                       within_s: float = 20.0) -> None:
    """Once a welcome says `ids` are in `user`'s inbox after seq `start` (an acknowledged DM
    reaches it shortly after its `ok`), `resume` from `start` gives exactly them, in order, seq
    contiguous, then `resumed` complete."""

    async def latest_seq() -> int:
        probe = await connect(server, user)
        await probe.close()
        return int(probe.welcome["seq"])

    n = len(ids)
    await until(latest_seq, lambda seq: seq >= start + n, within_s=within_s)
    client = await Client.connect(server.ws_url, server.url, user, resume=start)
    items = await client.items(n)
    assert [m["id"] for m in items] == ids
    assert [m["seq"] for m in items] == list(range(start + 1, start + n + 1))
    assert await client.expect("resumed") == {"t": "resumed", "from": start, "to": start + n,
                                              "complete": True}
    await client.close()


async def test_users_of_two_session_shards_exchange_dms_with_inboxes_on_two_masters(
        cluster_server: Server, failover_cluster: LocalRedisCluster) -> None:
    shards = cluster_server.cfg.shards
    rc = await cluster_client(failover_cluster)
    inbox = server_inbox(rc, cluster_server)
    try:
        # Two users whose inbox keys live on different masters (so also different shards: the
        # default two shards' slot groups are spread to two of the three masters).
        alice_name = unique_user("alice")
        home = master_of(rc, inbox.user_key(alice_name)).name
        bob_name = next(u for u in (unique_user("bob") for _ in range(1000))
                        if master_of(rc, inbox.user_key(u)).name != home)
        assert (shard_for(alice_name, shards.session_shards)
                != shard_for(bob_name, shards.session_shards))

        alice = await connect(cluster_server, alice_name)
        bob = await connect(cluster_server, bob_name)
        for i in range(10):
            sender, to = (alice, bob_name) if i % 2 == 0 else (bob, alice_name)
            await ok(sender, {"t": "dm", "to": to, "body": f"m{i}"})
        got_a, got_b = await alice.items(10), await bob.items(10)
        assert [m["id"] for m in got_a] == [m["id"] for m in got_b]
        assert sorted(m["body"] for m in got_a) == [f"m{i}" for i in range(10)]
        assert [m["seq"] for m in got_a] == [m["seq"] for m in got_b] == list(range(1, 11))
        await alice.close()
        await bob.close()

        # Each inbox is stored on its own master: that node itself holds the user's ten items
        # (a plain connection follows no redirection; another node would answer MOVED).
        owners = {}
        for user in (alice_name, bob_name):
            key = inbox.user_key(user)
            node = master_of(rc, key)
            plain = aioredis.Redis(host=node.host, port=int(node.port), socket_timeout=5)
            try:
                assert await plain.zcard(key) == 10, (user, key, node.name)
            finally:
                await plain.aclose()
            owners[user] = node.name
        assert owners[alice_name] != owners[bob_name], owners
    finally:
        await rc.aclose()


async def test_a_read_reaches_the_other_shards_user_and_both_lists(cluster_server: Server) -> None:
    count = cluster_server.cfg.shards.session_shards
    alice_name = unique_user("alice")
    bob_name = next(u for u in (unique_user("bob") for _ in range(1000))
                    if shard_for(u, count) != shard_for(alice_name, count))
    alice = await connect(cluster_server, alice_name)
    bob = await connect(cluster_server, bob_name)
    sent = [await ok(alice, {"t": "dm", "to": bob_name, "body": f"r{i}"}) for i in range(3)]
    await bob.items(3)
    await ok(bob, {"t": "read", "conv": sent[0]["conv"], "id": sent[1]["id"]})
    for client in (alice, bob):
        receipt = await client.next(lambda f: f.get("t") == "read")
        assert receipt["user"] == bob_name and receipt["id"] == sent[1]["id"]
    # Each side's list is in its own shard's slot group, and holds both markers.
    for user, unread in ((bob_name, 1), (alice_name, 0)):
        page = await until(partial(listed, cluster_server, user),
                           lambda p: bool(p["items"]) and p["items"][0]["read"] != {})
        (entry,) = page["items"]
        assert entry["conv"] == sent[0]["conv"] and entry["unread"] == unread
        assert entry["read"] == {bob_name: sent[1]["id"]}
        assert entry["last"]["id"] == sent[2]["id"]
    await alice.close()
    await bob.close()


async def test_dms_sent_while_offline_arrive_on_resume_in_order(cluster_server: Server) -> None:
    sender_name, rcpt_name = unique_user("s"), unique_user("r")
    rcpt = await connect(cluster_server, rcpt_name)
    start = rcpt.welcome["seq"]
    await rcpt.close()

    sender = await connect(cluster_server, sender_name)
    sent = [(await ok(sender, {"t": "dm", "to": rcpt_name, "body": f"n{i}"}))["id"]
            for i in range(50)]

    await resume_holds(cluster_server, rcpt_name, start, sent)
    await sender.close()


async def test_follow_post_feed_page_like_and_the_followers_push(cluster_server: Server) -> None:
    reader_name, author_name = unique_user("reader"), unique_user("author")
    reader = await connect(cluster_server, reader_name)
    author = await connect(cluster_server, author_name)

    await ok(reader, {"t": "follow", "user": author_name})
    note = await author.next(lambda f: f.get("t") == "note")
    assert (note["kind"], note["from"]) == ("follow", reader_name)

    posted = await ok(author, {"t": "post", "body": "on a cluster"})
    item = {"id": posted["id"], "author": author_name, "body": "on a cluster",
            "ts": posted["ts"], "likes": 0}
    assert await reader.expect("feed") == {"t": "feed", "item": item}
    assert await author.expect("feed") == {"t": "feed", "item": item}
    first = await until(lambda: page(reader), lambda p: ids(p) == [posted["id"]])
    assert first["items"] == [{**item, "liked": False}]  # a page's item says if its reader likes it
    assert await http_list(cluster_server, author_name, "followers") == {"items": [reader_name],
                                                                         "next": None}

    await ok(reader, {"t": "like", "post": posted["id"]})
    await ok(reader, {"t": "like", "post": posted["id"]})  # idempotent: counted once
    liked = await author.next(lambda f: f.get("t") == "note" and f.get("kind") == "like")
    assert (liked["from"], liked["post"]) == (reader_name, posted["id"])
    await until(lambda: page(reader), lambda p: p["items"][0]["likes"] == 1)
    assert (await page(reader))["items"][0]["liked"] is True
    assert [(i["likes"], i["liked"]) for i in (await page(author))["items"]] == [(1, False)]
    await reader.close()
    await author.close()


async def test_a_watcher_sees_a_user_go_online_and_offline(cluster_server: Server) -> None:
    user = unique_user("p")
    watcher = await connect(cluster_server, unique_user("w"))
    assert await watch(watcher, [user]) == {user: {"status": "offline", "since": 0}}

    client = await connect(cluster_server, user)
    online = await change(watcher, user, ONLINE_WAIT_S)
    assert online["status"] == "online"
    await client.close()
    offline = await change(watcher, user, ONLINE_WAIT_S)
    assert offline["status"] == "offline" and offline["ts"] >= online["ts"]
    await watcher.close()


async def test_a_crashed_master_fails_over_and_no_acknowledged_dm_is_lost(
        cluster_server: Server, failover_cluster: LocalRedisCluster) -> None:
    """The master holding a user's inbox is SIGKILLed while DMs to them flow; it is also the
    URL's first node, where every process's pub/sub connection is. Its replica takes over
    (node timeout 2 s); meanwhile the gateway answers `unavailable` at most and the sender
    retries with the same cid. Then `resume` holds every acknowledged DM once, in order, seq
    contiguous. (Replication is asynchronous: what the dead master had not passed on is what
    the inbox's version check finds missing, and the session shard rebuilds it from the log.)"""
    rc = await cluster_client(failover_cluster)
    try:
        inbox = server_inbox(rc, cluster_server)
        first = failover_cluster.ports[0]
        rcpt_name = next(u for u in (unique_user("fo") for _ in range(1000))
                         if int(master_of(rc, inbox.user_key(u)).port) == first)
    finally:
        await rc.aclose()
    rcpt = await connect(cluster_server, rcpt_name)
    start = int(rcpt.welcome["seq"])
    await rcpt.close()

    sender = await connect(cluster_server, unique_user("fs"))
    acked, waits = [], []
    for i in range(40):
        if i == 10:
            failover_cluster.kill(first)
        frame = {"t": "dm", "to": rcpt_name, "body": f"f{i}", "cid": f"fo-{i}"}
        sent_at = time.monotonic()
        acked.append((await send_until_ok(sender, frame, within_s=60))["id"])
        waits.append(time.monotonic() - sent_at)
    await sender.close()
    print(f"failover: the longest wait for an ok was {max(waits):.2f} s")

    await resume_holds(cluster_server, rcpt_name, start, acked, within_s=60)
