"""Read state and the conversation index, as plain logic: what each record does to the index
(actors/conversations.py), the session shard writing it with the items and publishing receipts
(on the in-memory log, inbox cache and pub/sub), the rebuild replay runs, the projector's
forward-only markers, and the gateway's `read` (serve/reads.py) on in-memory backends."""

from __future__ import annotations

from typing import Any

from gateway_harness import Gateway, gateway
from test_actors_session import Rig, rig  # noqa: F401 (the fixture)
from test_projector import CountingStore, Log
from unit_helpers import unique_user

from actors.conversations import ConversationRebuild, conversation_op, history_message
from actors.projector import Projector
from bus.conversations import ChangeOp, MessageOp, ReadOp
from bus.eventlog_memory import MemoryEventLog
from bus.inbox_memory import MemoryInboxCache
from peernet.codec import unpack
from peernet.config import load_config
from peernet.envelope import Event


def read_event(user: str, conv: str, msg_id: str, pos: int) -> Event:
    return Event("read", user, {"conv": conv, "id": msg_id, "pos": pos})


def test_a_message_is_the_history_shape_for_the_users_it_reached() -> None:
    dm = Event("dm", "ann", {"to": "bob", "body": "hi", "conv": "dm:ann:bob"})
    op = conversation_op(dm, 7, ["ann", "bob"], notify=True)
    assert op == MessageOp("dm:ann:bob", 7, {"id": dm.id, "conv": "dm:ann:bob", "from": "ann",
                                             "to": "bob", "body": "hi", "ts": dm.ts},
                           ("ann", "bob"))
    group = Event("group_msg", "ann", {"conv": "g:x", "body": "yo", "mv": 1})
    assert history_message(group) == {"id": group.id, "conv": "g:x", "from": "ann",
                                      "body": "yo", "ts": group.ts}
    assert conversation_op(dm, 7, [], notify=True) is None
    assert conversation_op(Event("follow", "ann", {"user": "bob"}), 1, ["bob"],
                           notify=True) is None


def test_a_read_carries_its_receipt_only_when_told_to_notify() -> None:
    event = read_event("bob", "dm:ann:bob", "m1", 3)
    live = conversation_op(event, 9, ["ann", "bob"], notify=True)
    assert isinstance(live, ReadOp) and live.pos == 3  # the message's place, not the read's
    assert live.notify == ("ann", "bob")
    assert unpack(live.receipt) == {"t": "read", "conv": "dm:ann:bob", "user": "bob",
                                    "id": "m1", "ts": event.ts}
    replayed = conversation_op(event, 9, ["ann", "bob"], notify=False)
    assert isinstance(replayed, ReadOp) and replayed.notify == () and replayed.receipt == b""


def test_a_change_splits_its_users_into_members_and_removed() -> None:
    event = Event("group", "ann", {"conv": "g:x", "title": "t", "owner": "ann",
                                   "members": ["ann", "cat"], "version": 3, "change": "remove",
                                   "added": [], "removed": ["bob"]})
    op = conversation_op(event, 4, ["ann", "bob", "cat"], notify=True)
    assert op == ChangeOp("g:x", event.ts, {"conv": "g:x", "title": "t", "owner": "ann",
                                            "members": ["ann", "cat"], "version": 3},
                          ("ann", "cat"), ("bob",))


async def test_the_shard_writes_the_index_with_its_items_and_pushes_receipts_once(
        rig: Rig) -> None:  # noqa: F811
    # An inbox cache on the pub/sub's server, as Redis is in production: it publishes receipts.
    cache = MemoryInboxCache(retention_items=100, retention_ms=10**9,
                             pubsub=await rig.pubsub_client())
    index = cache.conversations()
    sent = [await rig.dm("ann", "bob", f"m{i}") for i in range(3)]
    shard = await rig.shard(inbox=cache)
    await rig.watch("ann", "bob")
    await shard.process(rig.events())
    (entry,) = (await index.page("bob", 10, None)).items
    assert entry.unread == 3 and entry.last is not None and entry.last["body"] == "m2"
    assert (await index.page("ann", 10, None)).items[0].unread == 0
    positions = [(await index.locate("bob", sent[0].conv, s.id)).pos for s in sent]
    assert positions == sorted(positions) and None not in positions

    for pos, sent_id in ((positions[1], sent[1].id), (positions[0], sent[0].id)):
        await rig.messenger.append(read_event("bob", sent[0].conv, sent_id, pos),
                                   key=sent[0].conv, recipients=["ann", "bob"],
                                   topic=rig.cfg.topics.messages)
    await shard.process(rig.events())
    await rig.settle()
    (entry,) = (await index.page("bob", 10, None)).items
    assert entry.unread == 1 and entry.read == {"bob": sent[1].id}
    for user in ("ann", "bob"):
        receipts = [i for i in rig.pushed_to(user) if i["t"] == "read"]
        # The older read moved nothing and told no one.
        assert [(r["user"], r["id"]) for r in receipts] == [("bob", sent[1].id)], user


async def test_a_rebuild_from_the_log_gives_the_index_the_shards_wrote(rig: Rig) -> None:  # noqa: F811
    sent = await rig.dm("ann", "bob", "one")
    await rig.dm("bob", "ann", "two")
    await rig.dm("cat", "ann", "three")
    shard = await rig.shard()
    await shard.process(rig.events())
    pos = (await rig.inbox.conversations().locate("bob", sent.conv, sent.id)).pos
    assert pos is not None
    await rig.messenger.append(read_event("bob", sent.conv, sent.id, pos), key=sent.conv,
                               recipients=["ann", "bob"], topic=rig.cfg.topics.messages)
    await shard.process(rig.events())
    live = rig.inbox.conversations()

    fresh = MemoryInboxCache(retention_items=10, retention_ms=10**9).conversations()
    rebuild = ConversationRebuild()
    records = rig.log.records(rig.cfg.topics.messages)
    await fresh.apply(rebuild.ops(records[:2]))
    await fresh.apply(rebuild.ops(records[2:] + records[:1]))  # a repeated record changes nothing
    for user in ("ann", "bob", "cat"):
        assert await fresh.page(user, 10, None) == await live.page(user, 10, None), user


async def test_the_projector_keeps_each_users_furthest_marker() -> None:
    store = CountingStore()
    projector = Projector(load_config({}), MemoryEventLog(), store)
    log = Log()

    async def apply(*events: Event) -> None:
        await projector.apply([log.record(e) for e in events])

    await apply(read_event("bob", "dm:ann:bob", "m5", 5), read_event("bob", "dm:ann:bob", "m3", 3))
    await apply(read_event("bob", "dm:ann:bob", "m4", 4))  # two devices: an older one after
    await apply(read_event("ann", "dm:ann:bob", "m2", 2), read_event("bob", "dm:ann:bob", "m6", 6))
    docs: list[dict[str, Any]] = await store.documents("reads")
    assert [(d["_id"], d["id"], d["pos"]) for d in docs] == [
        ("dm:ann:bob:ann", "m2", 2), ("dm:ann:bob:bob", "m6", 6)]


def read_events(gw: Gateway) -> list[Event]:
    records = gw.log.records(gw.cfg.topics.messages)
    return [e for e in (Event.decode(r.value) for r in records) if e.type == "read"]


def test_the_read_frame_finds_its_message_appends_once_and_never_goes_back() -> None:
    alice, bob = unique_user("a"), unique_user("b")
    lo, hi = sorted([alice, bob])
    conv = f"dm:{lo}:{hi}"
    with gateway() as gw, gw.connect(bob) as (ws, _):
        index = gw.inbox.conversations()
        # One message the index holds, one only the store of record has (older than it keeps).
        gw.run(lambda: index.apply([MessageOp(conv, 9, {"id": "new", "conv": conv, "from": alice,
                                                        "to": bob, "body": "x", "ts": 1},
                                              (alice, bob))]))
        gw.run(lambda: gw.store.insert_new("messages", [
            {"_id": "old", "conv": conv, "from": alice, "to": bob, "body": "y", "ts": 0,
             "pos": 4}]))
        assert ws.request({"t": "read", "rid": 1, "conv": conv, "id": "old"}) == {
            "t": "ok", "rid": 1}
        (event,) = read_events(gw)
        assert event.actor == bob and event.data == {"conv": conv, "id": "old", "pos": 4}
        # As the shard applies it: then an older or equal read appends nothing.
        gw.run(lambda: index.apply([ReadOp(conv, 9, "new", bob, 2, (alice, bob))]))
        for rid, msg_id in ((2, "old"), (3, "new")):
            assert ws.request({"t": "read", "rid": rid, "conv": conv, "id": msg_id})["t"] == "ok"
        assert len(read_events(gw)) == 1
        reply = ws.request({"t": "read", "rid": 4, "conv": conv, "id": "gone"})
        assert reply["t"] == "error" and reply["code"] == "not_found"
