"""Groups end to end, on the real stack (two gateway replicas, the session shards, the
projector): membership changes and their notes, messages in one order for every member, the
checks against current membership, resume, and `peernet replay` rebuilding membership."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from test_social import run_replay, until
from wsclient import Client, Frame, Server, dev_token, unique_user

from bus.groups_redis import group_store
from bus.mongo import MongoDocumentStore
from bus.redis import hash_tag, redis_client

pytestmark = [pytest.mark.ray, pytest.mark.stack]

UNKNOWN_GROUP = "g:" + "0" * 26


async def connect(server: Server, user: str, **kw: Any) -> Client:
    return await Client.connect(server.ws_url, server.url, user, **kw)


async def ok(client: Client, frame: Frame) -> Frame:
    reply = await client.request(frame)
    assert reply["t"] == "ok", reply
    return reply


async def error_code(client: Client, frame: Frame) -> str:
    reply = await client.request(frame)
    assert reply["t"] == "error", reply
    return str(reply["code"])


async def note(client: Client, conv: str) -> Frame:
    """The next group note of `conv` for `client`."""
    return await client.next(lambda f: f.get("t") == "note" and f.get("conv") == conv)


async def msgs(client: Client, conv: str, count: int) -> list[Frame]:
    out = []
    for _ in range(count):
        out.append(await client.next(lambda f: f.get("t") == "msg" and f.get("conv") == conv))
    return out


async def history(server: Server, client: Client, conv: str) -> httpx.Response:
    token = await dev_token(server.url, client.user)
    async with httpx.AsyncClient(base_url=server.url) as http:
        return await http.get(f"/v1/conversations/{conv}/messages", params={"limit": 100},
                              headers={"Authorization": f"Bearer {token}"})


async def make_group(owner: Client, others: list[Client], title: str = "trip") -> str:
    reply = await ok(owner, {"t": "group_create", "title": title,
                             "members": [c.user for c in others]})
    conv = str(reply["conv"])
    assert conv.startswith("g:")
    for client in (owner, *others):
        created = await note(client, conv)
        assert created["kind"] == "group" and created["owner"] == owner.user
        assert created["members"] == [owner.user, *[c.user for c in others]]
    return conv


async def three(server: Server) -> list[Client]:
    return [await connect(server, unique_user(p)) for p in ("alice", "bob", "carol")]


async def close(clients: list[Client]) -> None:
    for client in clients:
        await client.close()


async def test_three_members_exchange_messages_in_one_order(peernet_server: Server) -> None:
    alice, bob, carol = clients = await three(peernet_server)
    conv = await make_group(alice, [bob, carol])
    # A send right after the acknowledgement finds the group.
    first = await ok(bob, {"t": "dm", "conv": conv, "body": "first"})
    assert first["conv"] == conv

    async def send(client: Client, n: int) -> None:
        for i in range(n):
            await ok(client, {"t": "dm", "conv": conv, "body": f"{client.user} {i}"})

    await asyncio.gather(send(alice, 6), send(bob, 5), send(carol, 6))
    got = {c.user: await msgs(c, conv, 18) for c in clients}
    orders = [[m["id"] for m in got[c.user]] for c in clients]
    assert orders[0] == orders[1] == orders[2]
    assert orders[0][0] == first["id"]
    for c in clients:
        seqs = [m["seq"] for m in got[c.user]]
        assert seqs == list(range(seqs[0], seqs[0] + 18))
        assert all("to" not in m and m["conv"] == conv for m in got[c.user])
    assert {m["from"] for m in got[alice.user]} == {c.user for c in clients}

    reply = await until(lambda: history(peernet_server, carol, conv),
                        lambda r: r.status_code == 200 and len(r.json()["items"]) == 18)
    assert [i["id"] for i in reply.json()["items"]] == orders[0][::-1]
    assert all("to" not in i for i in reply.json()["items"])
    await close(clients)


async def test_a_removed_member_gets_nothing_after_the_removal_and_forbidden_on_send_and_history(
        peernet_server: Server) -> None:
    alice, bob, carol = clients = await three(peernet_server)
    conv = await make_group(alice, [bob, carol])
    for i in range(3):
        await ok(bob, {"t": "dm", "conv": conv, "body": f"before {i}"})
    for client in clients:
        assert len(await msgs(client, conv, 3)) == 3

    await ok(alice, {"t": "group_remove", "conv": conv, "users": [carol.user]})
    removed = await note(carol, conv)
    assert removed["members"] == [] and removed["change"] == "remove"
    for client in (alice, bob):
        after = await note(client, conv)
        assert after["members"] == [alice.user, bob.user] and after["owner"] == alice.user

    after_ids = [(await ok(c, {"t": "dm", "conv": conv, "body": f"after {i}"}))["id"]
                 for i, c in enumerate([alice, bob, alice, bob])]
    assert [m["id"] for m in await msgs(bob, conv, 4)] == after_ids
    assert await error_code(carol, {"t": "dm", "conv": conv, "body": "let me in"}) == "forbidden"
    assert await error_code(carol, {"t": "typing", "conv": conv}) == "forbidden"
    assert (await history(peernet_server, carol, conv)).status_code == 403
    assert (await history(peernet_server, bob, conv)).status_code == 200

    # Carol's inbox, read again from the start, ends with her removal.
    again = await connect(peernet_server, carol.user, resume=0)
    await again.expect("resumed")
    items = [f for f in again.pending if f.get("t") in ("msg", "note")]
    assert items[-1]["id"] == removed["id"]
    assert not any(f.get("id") in after_ids for f in carol.pending + again.pending)
    await close([*clients, again])


async def test_the_owner_leaving_passes_ownership_to_the_longest_standing_member(
        peernet_server: Server) -> None:
    alice, bob, carol = clients = await three(peernet_server)
    dave = await connect(peernet_server, unique_user("dave"))
    conv = await make_group(alice, [bob, carol])
    await ok(alice, {"t": "group_add", "conv": conv, "users": [dave.user]})
    for client in (alice, bob, carol, dave):
        added = await note(client, conv)
        assert added["members"] == [alice.user, bob.user, carol.user, dave.user]

    await ok(alice, {"t": "group_leave", "conv": conv})
    assert (await note(alice, conv))["members"] == []
    for client in (bob, carol, dave):
        left = await note(client, conv)
        assert left["owner"] == bob.user and left["members"] == [bob.user, carol.user, dave.user]

    assert await error_code(carol, {"t": "group_remove", "conv": conv,
                                    "users": [dave.user]}) == "forbidden"
    assert await error_code(alice, {"t": "dm", "conv": conv, "body": "hi"}) == "forbidden"
    assert await error_code(alice, {"t": "group_leave", "conv": conv}) == "forbidden"
    await ok(bob, {"t": "group_remove", "conv": conv, "users": [dave.user]})
    assert (await note(carol, conv))["members"] == [bob.user, carol.user]

    # The store of record follows: the group's state and its memberships.
    async def projected() -> dict[str, Any]:
        store = MongoDocumentStore(peernet_server.cfg.services.mongo_url,
                                   peernet_server.cfg.services.mongo_db)
        await store.start()
        try:
            groups = await store.documents("groups", [conv])
            members = [d for d in await store.documents("memberships") if d["conv"] == conv]
        finally:
            await store.stop()
        return {"group": groups, "members": sorted(d["user"] for d in members)}

    # The batch writes the group, then its memberships: settled once both are there.
    doc = await until(projected, lambda p: p["group"] and p["group"][0]["version"] == 4
                      and p["members"] == sorted([bob.user, carol.user]))
    assert doc["group"][0]["owner"] == bob.user
    assert doc["group"][0]["members"] == [bob.user, carol.user]
    assert doc["members"] == sorted([bob.user, carol.user])
    await close([*clients, dave])


async def test_typing_to_a_group_reaches_the_other_members(peernet_server: Server) -> None:
    alice, bob, carol = clients = await three(peernet_server)
    conv = await make_group(alice, [bob, carol])
    await alice.send({"t": "typing", "conv": conv})
    for client in (bob, carol):
        typing = await client.expect("typing")
        assert typing == {"t": "typing", "from": alice.user, "conv": conv}
    await alice.request({"t": "ping"})
    assert not any(f.get("t") == "typing" for f in alice.pending)
    await close(clients)


async def test_bad_group_requests_are_refused_with_nothing_half_applied(
        peernet_server: Server) -> None:
    alice, bob, carol = clients = await three(peernet_server)
    outsider = await connect(peernet_server, unique_user("out"))
    invitees = [await connect(peernet_server, unique_user("inv")) for _ in range(2)]
    conv = await make_group(alice, [bob])

    # Both or neither of `to` and `conv`.
    assert await error_code(alice, {"t": "dm", "to": bob.user, "conv": conv, "body": "x"}) \
        == "bad_request"
    assert await error_code(alice, {"t": "dm", "body": "x"}) == "bad_request"
    assert await error_code(alice, {"t": "typing"}) == "bad_request"
    # Unknown group, not a member.
    for frame in ({"t": "dm", "conv": UNKNOWN_GROUP, "body": "x"},
                  {"t": "group_add", "conv": UNKNOWN_GROUP, "users": [bob.user]},
                  {"t": "group_leave", "conv": UNKNOWN_GROUP}):
        assert await error_code(alice, frame) == "not_found", frame
    for frame in ({"t": "dm", "conv": conv, "body": "x"},
                  {"t": "group_add", "conv": conv, "users": [outsider.user]},
                  {"t": "group_leave", "conv": conv}):
        assert await error_code(outsider, frame) == "forbidden", frame
    # A member who is not the owner adds and removes no one.
    assert await error_code(bob, {"t": "group_add", "conv": conv,
                                  "users": [carol.user]}) == "forbidden"
    # A pair the sender is not in.
    assert await error_code(outsider, {"t": "dm", "conv": f"dm:{min(alice.user, bob.user)}:"
                                       f"{max(alice.user, bob.user)}", "body": "x"}) == "forbidden"
    # Sizes and titles.
    many = [f"x{i:04d}" for i in range(500)]
    assert await error_code(alice, {"t": "group_create", "title": "big",
                                    "members": many}) == "bad_request"
    assert await error_code(alice, {"t": "group_add", "conv": conv,
                                    "users": many[:499]}) == "bad_request"
    for title in ("", "t" * 101, None):
        assert await error_code(alice, {"t": "group_create", "title": title,
                                        "members": [i.user for i in invitees]}) == "bad_request"
    assert await error_code(alice, {"t": "group_create", "title": "alone",
                                    "members": []}) == "bad_request"
    assert await error_code(alice, {"t": "group_create", "title": "me",
                                    "members": [alice.user]}) == "bad_request"

    # Idempotent: adding a member, removing a non-member, a create repeated with its cid.
    await ok(alice, {"t": "group_add", "conv": conv, "users": [bob.user]})
    await ok(alice, {"t": "group_remove", "conv": conv, "users": [outsider.user]})
    first = await ok(alice, {"t": "group_create", "title": "once", "cid": "c1",
                             "members": [invitees[0].user]})
    again = await ok(alice, {"t": "group_create", "title": "once", "cid": "c1",
                             "members": [invitees[0].user]})
    assert first["conv"] == again["conv"]

    # Nothing half-applied: the next change is version 2 of the group, with the members it had;
    # the invitees of the refused creates have only the one acknowledged group's note.
    await ok(alice, {"t": "group_add", "conv": conv, "users": [carol.user]})
    for client in (alice, bob, carol):
        assert (await note(client, conv))["members"] == [alice.user, bob.user, carol.user]
    store = group_store(peernet_server.cfg)
    try:
        (group,) = await store.get_many([conv])
    finally:
        await store.close()
    assert group is not None and group.version == 2
    assert (await note(invitees[0], first["conv"]))["title"] == "once"
    for invitee in invitees:
        await invitee.request({"t": "ping"})
    assert [f for f in invitees[0].pending if f.get("t") == "note"] == []
    assert [f for f in invitees[1].pending if f.get("t") == "note"] == []
    assert invitees[1].welcome["seq"] == 0
    again_inv = await connect(peernet_server, invitees[1].user)
    assert again_inv.welcome["seq"] == 0
    assert [f for f in bob.pending + outsider.pending if f.get("t") == "note"] == []
    await close([*clients, outsider, *invitees, again_inv])


async def test_a_resume_after_300_group_messages_delivers_all_gap_free(
        peernet_server: Server) -> None:
    alice, bob, carol = await three(peernet_server)
    conv = await make_group(alice, [bob, carol])
    start = bob.welcome["seq"] + 1  # the create note
    await bob.close()
    sent = []
    for i in range(300):
        sender = alice if i % 2 == 0 else carol
        sent.append((await ok(sender, {"t": "dm", "conv": conv, "body": f"g{i}"}))["id"])
    # All in carol's inbox (the same partition, read in order) before bob comes back.
    assert [m["id"] for m in await msgs(carol, conv, 300)] == sent

    bob = await connect(peernet_server, bob.user, resume=start)
    items = await bob.items(300, timeout=90)
    resumed = await bob.expect("resumed")
    assert [m["id"] for m in items] == sent
    assert [m["seq"] for m in items] == list(range(start + 1, start + 301))
    assert resumed["to"] == start + 300 and resumed["complete"] is True
    await close([alice, bob, carol])


async def test_replay_rebuilds_group_membership(peernet_server: Server) -> None:
    alice, bob, carol = clients = await three(peernet_server)
    conv = await make_group(alice, [bob, carol])
    await ok(alice, {"t": "group_remove", "conv": conv, "users": [carol.user]})
    await ok(bob, {"t": "group_leave", "conv": conv})
    await note(alice, conv)
    assert (await note(alice, conv))["members"] == [alice.user]

    store = group_store(peernet_server.cfg)
    try:
        (before,) = await store.get_many([conv])
        assert before is not None and before.version == 3
        # Gone from Redis, as after a wipe of the keyspace: the group is unknown.
        r = redis_client(peernet_server.cfg.services.redis_url)
        try:
            await r.delete(f"{hash_tag(peernet_server.cfg.feeds.keyspace)}:group:{conv}")
        finally:
            await r.aclose()
        assert await error_code(alice, {"t": "dm", "conv": conv, "body": "x"}) == "not_found"

        await run_replay(peernet_server)
        (after,) = await store.get_many([conv])
    finally:
        await store.close()
    assert after == before
    await ok(alice, {"t": "dm", "conv": conv, "body": "back"})
    assert await error_code(bob, {"t": "dm", "conv": conv, "body": "x"}) == "forbidden"
    assert await error_code(carol, {"t": "dm", "conv": conv, "body": "x"}) == "forbidden"
    await close(clients)


async def test_a_dm_and_typing_by_the_conv_of_a_pair_reach_the_other(peernet_server: Server) -> None:
    alice, bob, carol = clients = await three(peernet_server)
    lo, hi = sorted([alice.user, bob.user])
    pair = f"dm:{lo}:{hi}"
    sent = await ok(alice, {"t": "dm", "conv": pair, "body": "by conv"})
    assert sent["conv"] == pair
    got = await bob.next(lambda f: f.get("t") == "msg")
    assert got["id"] == sent["id"] and got["to"] == bob.user and got["from"] == alice.user
    await bob.send({"t": "typing", "conv": pair})
    assert await alice.expect("typing") == {"t": "typing", "from": bob.user, "conv": pair}
    assert await error_code(carol, {"t": "typing", "conv": pair}) == "forbidden"
    assert await error_code(carol, {"t": "dm", "conv": f"dm:{hi}:{lo}", "body": "x"}) \
        == "bad_request"
    await close(clients)
