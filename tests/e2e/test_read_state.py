"""Read state and the conversation list end to end, on the real stack (the gateway replicas, the
session shards, the projector): `read` with its receipts to the reader's other connections and
to the other members, markers forward only, unread counts exact in `GET /v1/conversations`,
the list's order, `last` and paging, its answers to bad input, and `peernet replay` bringing
the list and the markers back after their keys are gone from Redis."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from test_groups import close, connect, error_code, make_group, msgs, ok, three
from test_social import run_replay, until
from wsclient import Server, dev_token, unique_user

from bus.mongo import MongoDocumentStore
from bus.redis import redis_client

pytestmark = [pytest.mark.ray, pytest.mark.stack]


async def conversations(server: Server, user: str, **params: Any) -> httpx.Response:
    token = await dev_token(server.url, user)
    async with httpx.AsyncClient(base_url=server.url) as http:
        return await http.get("/v1/conversations", params=params,
                              headers={"Authorization": f"Bearer {token}"})


async def listed(server: Server, user: str, **params: Any) -> dict[str, Any]:
    reply = await conversations(server, user, **params)
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return body


async def entry(server: Server, user: str, conv: str) -> dict[str, Any] | None:
    items = (await listed(server, user, limit=100))["items"]
    return next((c for c in items if c["conv"] == conv), None)


async def settled(server: Server, user: str, conv: str, **want: Any) -> dict[str, Any]:
    """The list entry of `conv` once it shows `want` (the shards write it as they deliver)."""
    found = await until(lambda: entry(server, user, conv),
                        lambda e: e is not None and all(e[k] == v for k, v in want.items()))
    assert found is not None
    return found


def receipt_of(conv: str) -> Any:
    return lambda f: f.get("t") == "read" and f.get("conv") == conv


async def test_a_read_moves_unread_on_every_device_and_the_members_get_the_receipt(
        peernet_server: Server) -> None:
    alice, bob, carol = clients = await three(peernet_server)
    alice2 = await connect(peernet_server, alice.user)  # alice's second device
    conv = await make_group(alice, [bob, carol], title="reads")
    sent = [await ok(bob, {"t": "dm", "conv": conv, "body": f"m{i}"}) for i in range(3)]
    await msgs(alice, conv, 3)
    got = await msgs(alice2, conv, 3)
    assert [m["id"] for m in got] == [s["id"] for s in sent]
    before = await settled(peernet_server, alice.user, conv, unread=3)
    assert before["kind"] == "group" and before["title"] == "reads"
    assert before["owner"] == alice.user
    assert before["members"] == [alice.user, bob.user, carol.user]
    assert before["last"]["id"] == sent[2]["id"] and before["last"]["body"] == "m2"
    assert "to" not in before["last"] and before["read"] == {}

    reply = await ok(alice, {"t": "read", "conv": conv, "id": sent[1]["id"]})
    assert reply == {"t": "ok", "rid": reply["rid"]}
    for client in (alice2, bob, carol, alice):
        receipt = await client.next(receipt_of(conv))
        assert receipt["user"] == alice.user and receipt["id"] == sent[1]["id"]
        assert isinstance(receipt["ts"], int) and "seq" not in receipt
    after = await settled(peernet_server, alice.user, conv, unread=1)
    assert after["read"] == {alice.user: sent[1]["id"]}
    # Every member sees every marker; bob's own messages are not unread for him.
    for other in (bob, carol):
        seen = await settled(peernet_server, other.user, conv, read={alice.user: sent[1]["id"]})
        assert seen["unread"] == (0 if other is bob else 3)

    # Forward only: an older message changes nothing and tells no one.
    await ok(alice2, {"t": "read", "conv": conv, "id": sent[0]["id"]})
    await ok(alice2, {"t": "read", "conv": conv, "id": sent[1]["id"]})
    await ok(carol, {"t": "read", "conv": conv, "id": sent[2]["id"]})
    for client in (alice, alice2, bob, carol):
        receipt = await client.next(receipt_of(conv))
        assert receipt["user"] == carol.user  # the next receipt is carol's, none of alice's
    final = await settled(peernet_server, alice.user, conv,
                          read={alice.user: sent[1]["id"], carol.user: sent[2]["id"]})
    assert final["unread"] == 1
    await close([*clients, alice2])


async def test_read_answers_not_found_forbidden_and_bad_request(peernet_server: Server) -> None:
    alice, bob, carol = clients = await three(peernet_server)
    conv = await make_group(alice, [bob])
    sent = await ok(bob, {"t": "dm", "conv": conv, "body": "hi"})
    pair = await ok(alice, {"t": "dm", "to": carol.user, "body": "other"})
    await msgs(alice, conv, 1)
    mine = {"t": "read", "conv": conv, "id": sent["id"]}
    assert await error_code(carol, mine) == "forbidden"  # not a member of the group
    assert await error_code(bob, {"t": "read", "conv": pair["conv"], "id": pair["id"]}) == "forbidden"
    assert await error_code(alice, {**mine, "conv": "g:" + "0" * 26}) == "not_found"
    assert await error_code(alice, {**mine, "id": "0" * 26}) == "not_found"
    # A message of another conversation is not one of this one's.
    assert await error_code(alice, {**mine, "id": pair["id"]}) == "not_found"
    for bad in ({"t": "read", "conv": conv}, {"t": "read", "id": sent["id"]},
                {**mine, "conv": 7}, {**mine, "id": ""}, {**mine, "id": "x" * 65},
                {**mine, "conv": "dm:nobody"}):
        assert await error_code(alice, bad) == "bad_request", bad
    await ok(alice, mine)  # the connection carries on
    await close(clients)


async def test_the_list_goes_by_activity_with_last_unread_and_pages(peernet_server: Server) -> None:
    me = await connect(peernet_server, unique_user("me"))
    peers = [await connect(peernet_server, unique_user(f"p{i}")) for i in range(3)]
    convs = []
    for i, peer in enumerate(peers):
        first = await ok(peer, {"t": "dm", "to": me.user, "body": f"from {i}"})
        convs.append(first["conv"])
    mine = await ok(me, {"t": "dm", "to": peers[0].user, "body": "back to 0"})
    await me.items(4)
    # Newest activity first: the pair me wrote in last, then the others from the newest.
    order = [convs[0], convs[2], convs[1]]
    page = await until(lambda: listed(peernet_server, me.user),
                       lambda p: [c["conv"] for c in p["items"]] == order)
    assert page["next"] is None
    top = page["items"][0]
    assert top["kind"] == "dm" and top["title"] is None and top["owner"] is None
    assert top["members"] == sorted([me.user, peers[0].user])
    assert top["last"] == {"id": mine["id"], "conv": convs[0], "from": me.user,
                           "to": peers[0].user, "body": "back to 0", "ts": mine["ts"]}
    assert [c["unread"] for c in page["items"]] == [1, 1, 1]

    first = await listed(peernet_server, me.user, limit=2)
    assert [c["conv"] for c in first["items"]] == order[:2] and first["next"]
    second = await listed(peernet_server, me.user, limit=2, before=first["next"])
    assert [c["conv"] for c in second["items"]] == order[2:] and second["next"] is None

    for params in ({"limit": 0}, {"limit": 101}, {"limit": "x"}, {"before": "nope"}):
        reply = await conversations(peernet_server, me.user, **params)
        assert reply.status_code == 400, params
        assert reply.json()["error"]["code"] == "bad_request"
    async with httpx.AsyncClient(base_url=peernet_server.url) as http:
        assert (await http.get("/v1/conversations")).status_code == 401
    await close([me, *peers])


async def forget_in_redis(server: Server, *names: str) -> int:
    """Delete every key of the conversation index that names one of `names` (users or
    conversations), as a Redis wipe would for them, leaving other tests' keys alone."""
    r = redis_client(server.cfg.services.redis_url)
    try:
        keys = set()
        for name in names:
            keys |= {k async for k in r.scan_iter(match=f"inbox:*:*{name}*", count=1000)
                     if b":u:" not in k}  # the inboxes stay: the shards rebuild those
        for key in keys:
            await r.delete(key)
        return len(keys)
    finally:
        await r.aclose()


async def test_replay_brings_the_list_and_the_markers_back(peernet_server: Server) -> None:
    alice, bob, carol = clients = await three(peernet_server)
    conv = await make_group(alice, [bob, carol], title="back")
    sent = [await ok(bob, {"t": "dm", "conv": conv, "body": f"m{i}"}) for i in range(3)]
    pair = await ok(carol, {"t": "dm", "to": alice.user, "body": "pair"})
    await msgs(alice, conv, 3)
    await ok(alice, {"t": "read", "conv": conv, "id": sent[1]["id"]})
    await ok(carol, {"t": "read", "conv": conv, "id": sent[2]["id"]})
    await alice.next(lambda f: f.get("t") == "read" and f.get("user") == carol.user)
    before = await until(lambda: listed(peernet_server, alice.user),
                         lambda p: [c["conv"] for c in p["items"]] == [pair["conv"], conv])
    assert before["items"][1]["unread"] == 1
    assert before["items"][1]["read"] == {alice.user: sent[1]["id"], carol.user: sent[2]["id"]}
    # The markers are in the store of record too.
    store = MongoDocumentStore(peernet_server.cfg.services.mongo_url,
                               peernet_server.env["PEERNET_MONGO_DB"])
    await store.start()
    try:
        marks = await until(lambda: store.documents("reads", [f"{conv}:{alice.user}"]),
                            lambda d: len(d) == 1)
        assert marks[0]["id"] == sent[1]["id"] and marks[0]["user"] == alice.user
    finally:
        await store.stop()

    assert await forget_in_redis(peernet_server, alice.user, bob.user, carol.user,
                                 conv.partition(":")[2]) > 0
    assert (await listed(peernet_server, alice.user))["items"] == []
    await run_replay(peernet_server)
    assert await listed(peernet_server, alice.user) == before
    # And the marker still moves forward only, from where the log left it.
    await ok(alice, {"t": "read", "conv": conv, "id": sent[0]["id"]})
    await ok(alice, {"t": "read", "conv": conv, "id": sent[2]["id"]})
    await settled(peernet_server, alice.user, conv, unread=0)
    await close(clients)
