"""Groups' plain logic: the membership rules (serve/groups.py `plan_*`), the gateway's changes on
in-memory backends (the lock, nothing half-applied), the session shards' log-order membership
(actors/groups.py), the inbox items and the projections of group events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from unit_helpers import unit_cfg

from actors.groups import Memberships
from actors.inbox_items import inbox_item
from actors.projector import PROJECTIONS, project
from actors.session import SessionShard
from bus.cache_memory import MemoryCache
from bus.eventlog_memory import MemoryEventLog
from bus.groups import Group
from bus.groups_memory import MemoryGroupStore
from bus.inbox_memory import MemoryInboxCache
from bus.pubsub_memory import MemoryPubSub
from bus.store import Document
from bus.topics import peernet_topics
from peernet.config import PeerNetConfig
from peernet.envelope import Event
from peernet.errors import ErrorCode, PeerNetError
from serve.groups import Groups, plan_add, plan_create, plan_leave, plan_remove
from serve.messaging import Messenger

CONV = "g:" + "a" * 26


def code_of(exc: pytest.ExceptionInfo[PeerNetError]) -> ErrorCode:
    return exc.value.code


def group(*members: str, owner: str | None = None, version: int = 1) -> Group:
    return Group(CONV, "t", owner if owner is not None else members[0], tuple(members), version)


# -- the membership rules ------------------------------------------------------------------------


def test_a_group_is_made_of_its_creator_first_and_1_to_499_others() -> None:
    change = plan_create(CONV, "ann", "trip", ["bob", "ann", "cat", "bob"])
    assert change.group == Group(CONV, "trip", "ann", ("ann", "bob", "cat"), 1)
    assert change.added == ("ann", "bob", "cat") and change.recipients() == ["ann", "bob", "cat"]
    for members in ([], ["ann"], [f"u{i}" for i in range(500)]):
        with pytest.raises(PeerNetError) as exc:
            plan_create(CONV, "ann", "trip", members)
        assert code_of(exc) is ErrorCode.BAD_REQUEST, len(members)
    assert len(plan_create(CONV, "ann", "t", [f"u{i}" for i in range(499)]).group.members) == 500


def test_only_the_owner_adds_and_removes_and_a_repeat_changes_nothing() -> None:
    g = group("ann", "bob")
    for plan in (plan_add, plan_remove):
        with pytest.raises(PeerNetError) as exc:
            plan(g, CONV, "bob", ["cat"])
        assert code_of(exc) is ErrorCode.FORBIDDEN
        with pytest.raises(PeerNetError) as exc:
            plan(g, CONV, "zed", ["cat"])
        assert code_of(exc) is ErrorCode.FORBIDDEN
        with pytest.raises(PeerNetError) as exc:
            plan(None, CONV, "ann", ["cat"])
        assert code_of(exc) is ErrorCode.NOT_FOUND
    assert plan_add(g, CONV, "ann", ["bob"]) is None
    assert plan_remove(g, CONV, "ann", ["cat"]) is None

    added = plan_add(g, CONV, "ann", ["cat", "bob", "dan"])
    assert added is not None and added.group.members == ("ann", "bob", "cat", "dan")
    assert added.added == ("cat", "dan") and added.group.version == 2
    removed = plan_remove(added.group, CONV, "ann", ["bob", "zed"])
    assert removed is not None and removed.group.members == ("ann", "cat", "dan")
    assert removed.removed == ("bob",) and removed.recipients() == ["ann", "cat", "dan", "bob"]
    with pytest.raises(PeerNetError) as exc:
        plan_remove(g, CONV, "ann", ["ann"])
    assert code_of(exc) is ErrorCode.BAD_REQUEST


def test_a_group_holds_at_most_500() -> None:
    g = group("ann", *[f"u{i}" for i in range(498)])
    assert plan_add(g, CONV, "ann", ["x1"]) is not None
    with pytest.raises(PeerNetError) as exc:
        plan_add(g, CONV, "ann", ["x1", "x2"])
    assert code_of(exc) is ErrorCode.BAD_REQUEST


def test_the_owner_leaving_passes_ownership_to_the_longest_standing_member() -> None:
    left = plan_leave(group("ann", "bob", "cat"), CONV, "ann")
    assert left.group.owner == "bob" and left.group.members == ("bob", "cat")
    assert left.removed == ("ann",) and left.recipients() == ["bob", "cat", "ann"]
    assert plan_leave(group("ann", "bob", "cat"), CONV, "cat").group.owner == "ann"
    last = plan_leave(group("ann"), CONV, "ann")
    assert last.group.owner is None and last.group.members == ()
    with pytest.raises(PeerNetError) as exc:
        plan_leave(last.group, CONV, "ann")
    assert code_of(exc) is ErrorCode.FORBIDDEN


# -- the gateway's changes -------------------------------------------------------------------------


@dataclass
class Rig:
    cfg: PeerNetConfig
    log: MemoryEventLog
    store: MemoryGroupStore
    groups: Groups
    messenger: Messenger

    def changes(self) -> list[Event]:
        return [e for e in (Event.decode(r.value) for r in self.log.records(
            self.cfg.topics.messages)) if e.type == "group"]


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    cfg = unit_cfg()
    log = MemoryEventLog()
    await log.start()
    await log.ensure_topics(peernet_topics(cfg))
    store = MemoryGroupStore()
    messenger = Messenger(cfg, log, MemoryCache())
    yield Rig(cfg, log, store, Groups(store, messenger, cfg.topics.messages), messenger)
    await log.stop()


async def test_a_change_is_stored_only_once_durable_and_a_refused_append_leaves_nothing(
        rig: Rig) -> None:
    sent = await rig.groups.create("ann", "trip", ["bob"], None)
    assert (await rig.groups.read(sent.conv)) == Group(sent.conv, "trip", "ann", ("ann", "bob"), 1)
    rig.log.set_down(True)
    with pytest.raises(PeerNetError) as exc:
        await rig.groups.change("ann", sent.conv, "add", ["cat"])
    assert code_of(exc) is ErrorCode.UNAVAILABLE
    with pytest.raises(PeerNetError):
        await rig.groups.create("ann", "other", ["bob"], None)
    rig.log.set_down(False)
    assert rig.store.states[sent.conv].version == 1 and rig.store.locks == {}
    assert len(rig.store.states) == 1 and len(rig.changes()) == 1
    await rig.groups.change("ann", sent.conv, "add", ["cat"])
    assert rig.store.states[sent.conv].members == ("ann", "bob", "cat")
    assert [e.data["version"] for e in rig.changes()] == [1, 2]


async def test_concurrent_changes_of_one_group_are_appended_in_version_order(rig: Rig) -> None:
    conv = (await rig.groups.create("ann", "trip", ["bob", "cat", "dan"], None)).conv
    await asyncio.gather(rig.groups.change("ann", conv, "remove", ["bob"]),
                         rig.groups.change("cat", conv, "leave"),
                         rig.groups.change("ann", conv, "add", ["eve"]),
                         rig.groups.change("dan", conv, "leave"))
    events = rig.changes()
    assert [e.data["version"] for e in events] == [1, 2, 3, 4, 5]
    assert rig.store.states[conv].members == ("ann", "eve")
    assert events[-1].data["members"] == ["ann", "eve"] and rig.store.locks == {}


async def test_a_create_with_a_cid_is_made_once(rig: Rig) -> None:
    first = await rig.groups.create("ann", "trip", ["bob"], "c1")
    again = await rig.groups.create("ann", "trip", ["bob"], "c1")
    assert first == again and len(rig.changes()) == 1
    with pytest.raises(PeerNetError) as exc:
        await rig.groups.create("ann", "trip", ["ann"], "c2")  # refused: claims no cid
    assert code_of(exc) is ErrorCode.BAD_REQUEST
    assert (await rig.groups.create("ann", "trip", ["bob"], "c2")).conv != first.conv


# -- the shards: membership in the log's order -------------------------------------------------


def change_event(g: Group, kind: str = "add", removed: tuple[str, ...] = ()) -> Event:
    return Event("group", g.owner or "x", {**g.to_dict(), "change": kind, "added": [],
                                           "removed": list(removed)})


def send_event(sender: str, mv: int) -> Event:
    return Event("group_msg", sender, {"conv": CONV, "body": "hi", "mv": mv})


def test_a_send_that_raced_a_removal_goes_to_the_members_after_it() -> None:
    view = Memberships()
    header = ["ann", "bob", "cat"]
    # Before any change is known, the members the gateway read stand.
    assert view.recipients(send_event("ann", 1), header) == header
    view.recipients(change_event(group("ann", "bob", version=2), "remove", ("cat",)),
                    ["ann", "bob", "cat"])
    assert view.recipients(send_event("bob", 1), header) == ["ann", "bob"]
    assert view.recipients(send_event("bob", 2), ["ann", "bob"]) == ["ann", "bob"]
    assert view.raced == 1
    # An older change read later (a retried change) does not undo a newer one.
    view.learn(group("ann", "bob", "cat", version=1))
    assert view.recipients(send_event("bob", 1), header) == ["ann", "bob"]


def test_the_view_is_bounded() -> None:
    view = Memberships(capacity=2)
    for i in range(3):
        view.learn(Group(f"g:{i}", "t", "ann", ("ann",), 1))
    assert len(view) == 2


async def test_a_shard_delivers_a_group_by_the_log_order_of_its_changes(rig: Rig) -> None:
    conv = (await rig.groups.create("ann", "trip", ["bob", "cat"], None)).conv
    stale = await rig.groups.member_view(conv, "cat")  # read before cat's removal
    await rig.groups.change("ann", conv, "remove", ["cat"])
    raced = await rig.messenger.send_to_group("cat", stale, "racing", None)
    after = await rig.messenger.send_to_group(
        "ann", await rig.groups.member_view(conv, "ann"), "after", None)

    inbox = MemoryInboxCache(retention_items=100, retention_ms=10**9)
    shard = SessionShard(0, 1, rig.cfg, rig.log, inbox, MemoryPubSub())
    await shard.process(rig.log.records(rig.cfg.topics.messages))
    got = {u: await inbox.read(u, 0, 100) for u in ("ann", "bob", "cat")}
    assert [i["id"] for i in got["bob"] if i["t"] == "msg"] == [raced.id, after.id]
    cat = got["cat"]
    assert [i["t"] for i in cat] == ["note", "note"] and cat[-1]["members"] == []
    assert [i["seq"] for i in got["ann"]] == [1, 2, 3, 4]
    assert got["ann"][1]["members"] == ["ann", "bob"] and got["ann"][1]["owner"] == "ann"
    assert shard.stats.extra["group_sends_raced"] == 1


# -- inbox items and projections ---------------------------------------------------------------


def test_a_group_message_has_no_to_and_a_note_lists_the_members_for_members_only() -> None:
    msg = inbox_item(send_event("ann", 1), "bob")
    assert msg is not None and "to" not in msg and msg["conv"] == CONV and msg["from"] == "ann"
    event = change_event(group("ann", "bob", version=2), "remove", ("cat",))
    for user, members in (("bob", ["ann", "bob"]), ("cat", [])):
        note = inbox_item(event, user)
        assert note == {"t": "note", "id": event.id, "kind": "group", "from": "ann",
                        "ts": event.ts, "conv": CONV, "change": "remove", "title": "t",
                        "owner": "ann", "members": members}


def test_group_events_project_the_group_and_its_memberships() -> None:
    writes: dict[str, dict[str, Document | None]] = {c: {} for c in PROJECTIONS}
    created = Event("group", "ann", {**group("ann", "bob", "cat").to_dict(), "change": "create",
                                     "added": ["ann", "bob", "cat"], "removed": []})
    left = Event("group", "bob", {**group("ann", "cat", version=2).to_dict(), "change": "leave",
                                  "added": [], "removed": ["bob"]})
    project(created, 5, writes)
    project(send_event("ann", 2), 6, writes)
    project(left, 7, writes)
    assert writes["groups"][CONV] == {"_id": CONV, "title": "t", "owner": "ann",
                                      "members": ["ann", "cat"], "version": 2, "ts": left.ts}
    assert {k: v is not None for k, v in writes["memberships"].items()} == {
        f"{CONV}:ann": True, f"{CONV}:bob": False, f"{CONV}:cat": True}
    (message,) = writes["messages"].values()
    assert message is not None and "to" not in message and message["pos"] == 6
