"""Groups at the gateway: `group_create`, `group_add`, `group_remove` and `group_leave` (merged
into the one handler table), and the membership checks of sends, typing and history.

A change is made under the group's lock (bus/groups.py): the state is read, the change planned
from it (`plan_*`, plain functions), its `group` event appended to the messages log keyed by the
conversation (acks=all), and only then the new state stored, the lock freed with the same write,
and `ok` sent. A change that is refused or whose append fails stores nothing and appends
nothing; one that changes nothing (adding a member, removing a non-member) appends nothing and
is acknowledged. So the log holds one group's changes in version order, in the partition of its
messages, where the session shards apply them in order with the messages (actors/groups.py).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bus.groups import MAX_MEMBERS, Group, GroupStore
from peernet.codec import Frame
from peernet.envelope import Event
from peernet.errors import ErrorCode, PeerNetError, bad_request, unavailable
from peernet.ids import new_id, now_ms
from peernet.wire import GROUP_CONV_PREFIX
from serve.batching import TurnBatch
from serve.messaging import Messenger, Sent
from serve.validate import conv_participants, optional_text, text_field, user_list

if TYPE_CHECKING:
    from serve.connection import Connection
    from serve.handlers import HandlerTable

log = logging.getLogger("peernet.groups")

MAX_TITLE_CHARS = 100
# A change waits this long for another change of the same group to finish, then answers
# `unavailable` (nothing done; the client may retry).
LOCK_WAIT_S = 5.0
LOCK_POLL_S = 0.02
# Longer than any append may take (the producer gives up after its 10 s delivery timeout), so a
# live holder never loses the lock; a holder that died frees it by this expiry.
LOCK_TTL_MS = 15_000

_GROUP_CONV = re.compile(r"^g:[0-9a-z]{26}$")


def is_group_conv(conv: str) -> bool:
    return _GROUP_CONV.fullmatch(conv) is not None


def group_conv(event_id: str) -> str:
    return f"{GROUP_CONV_PREFIX}{event_id}"


def pair_peer(conv: str, user: str) -> str:
    """The other participant of the `dm:a:b` conversation `conv`, which `user` must be in."""
    parts = conv_participants(conv)
    if parts is None:
        raise bad_request("'conv' must be a group (g:ID) or a pair (dm:a:b, a < b)")
    if user not in parts:
        raise forbidden(f"not a participant of {conv}")
    return parts[1] if parts[0] == user else parts[0]


def forbidden(message: str) -> PeerNetError:
    return PeerNetError(ErrorCode.FORBIDDEN, message)


def not_found(message: str) -> PeerNetError:
    return PeerNetError(ErrorCode.NOT_FOUND, message)


@dataclass(frozen=True, slots=True)
class Change:
    """A planned membership change: the state after it and who joined or left by it."""

    kind: str  # create, add, remove or leave
    group: Group
    added: tuple[str, ...]
    removed: tuple[str, ...]

    def event_data(self) -> dict[str, Any]:
        return {**self.group.to_dict(), "change": self.kind, "added": list(self.added),
                "removed": list(self.removed)}

    def recipients(self) -> list[str]:
        """Whose inbox gets the note: every member after the change and every user it removed."""
        return [*self.group.members, *self.removed]


def _others(users: Sequence[str], actor: str) -> list[str]:
    return [u for u in users if u != actor]


def member_of(group: Group | None, conv: str, user: str) -> Group:
    """`group` when `user` is a member; `not_found` when there is no such group, `forbidden`
    when the user is not in it."""
    if group is None:
        raise not_found(f"no group {conv}")
    if not group.has(user):
        raise forbidden(f"not a member of {conv}")
    return group


def plan_create(conv: str, creator: str, title: str, members: Sequence[str]) -> Change:
    others = list(dict.fromkeys(_others(members, creator)))
    if not 1 <= len(others) <= MAX_MEMBERS - 1:
        raise bad_request(f"'members' must name 1 to {MAX_MEMBERS - 1} users besides the creator")
    group = Group(conv, title, creator, (creator, *others), 1)
    return Change("create", group, group.members, ())


def plan_add(group: Group | None, conv: str, actor: str, users: Sequence[str]) -> Change | None:
    g = _owned(group, conv, actor)
    new = [u for u in dict.fromkeys(users) if not g.has(u)]
    if len(g.members) + len(new) > MAX_MEMBERS:
        raise bad_request(f"a group holds at most {MAX_MEMBERS} members")
    if not new:
        return None
    after = Group(conv, g.title, g.owner, (*g.members, *new), g.version + 1)
    return Change("add", after, tuple(new), ())


def plan_remove(group: Group | None, conv: str, actor: str, users: Sequence[str]) -> Change | None:
    g = _owned(group, conv, actor)
    if actor in users:
        raise bad_request("the owner leaves a group with group_leave, not group_remove")
    gone = [u for u in dict.fromkeys(users) if g.has(u)]
    if not gone:
        return None
    after = Group(conv, g.title, g.owner, tuple(u for u in g.members if u not in gone),
                  g.version + 1)
    return Change("remove", after, (), tuple(gone))


def plan_leave(group: Group | None, conv: str, actor: str) -> Change:
    g = member_of(group, conv, actor)
    members = tuple(u for u in g.members if u != actor)
    # Members are kept in the order they joined: the first left is the longest-standing.
    owner = g.owner if g.owner != actor else (members[0] if members else None)
    return Change("leave", Group(conv, g.title, owner, members, g.version + 1), (), (actor,))


def _owned(group: Group | None, conv: str, actor: str) -> Group:
    g = member_of(group, conv, actor)
    if g.owner != actor:
        raise forbidden(f"only the owner of {conv} adds and removes members")
    return g


def _users(frame: Frame) -> list[str]:
    users = user_list(frame, "users", MAX_MEMBERS - 1)
    if not users:
        raise bad_request(f"'users' must name 1 to {MAX_MEMBERS - 1} users")
    return users


def _conv(frame: Frame) -> str:
    conv = frame.get("conv")
    if not isinstance(conv, str) or not is_group_conv(conv):
        raise bad_request("'conv' must be a group conversation (g:ID)")
    return conv


class Groups:
    """The gateway's side of groups on a GroupStore (None: every group request answers
    `unavailable`). Reads of one event-loop turn share one round trip (TurnBatch)."""

    def __init__(self, store: GroupStore | None, messenger: Messenger, messages_topic: str) -> None:
        self._store = store
        self._messenger = messenger
        self._topic = messages_topic
        self._reads: TurnBatch[str, Group | None] | None = (
            TurnBatch("group_read", store.get_many) if store is not None else None)

    def _of(self) -> GroupStore:
        if self._store is None:
            raise unavailable("groups are not configured on this gateway")
        return self._store

    async def read(self, conv: str) -> Group | None:
        """The group's current state (None: no such group)."""
        self._of()
        assert self._reads is not None
        return await self._reads.submit(conv)

    async def member_view(self, conv: str, user: str) -> Group:
        """The group as it is now, when `user` is a member (else not_found or forbidden)."""
        return member_of(await self.read(conv), conv, user)

    async def create(self, creator: str, title: str, members: list[str], cid: str | None) -> Sent:
        store = self._of()
        # Validated before the cid is claimed: a refused request claims nothing.
        plan_create(group_conv(new_id()), creator, title, members)

        def make(**same: Any) -> Event:
            event_id = same.get("id") or new_id()
            change = plan_create(group_conv(event_id), creator, title, members)
            return Event("group", creator, change.event_data(), id=event_id,
                         ts=same.get("ts") or now_ms())

        async def deliver(event: Event) -> None:
            group = Group.from_dict(event.data)
            await self._append(event, group.conv, group.members)
            # Stored before `ok`, so a send right after the acknowledgement finds the group.
            await store.put(group)

        return await self._messenger.once(creator, cid, make, deliver, scope="group")

    async def change(self, actor: str, conv: str, kind: str, users: Sequence[str] = ()) -> int:
        """Apply a change under the group's lock; the ts of its event (now, for no change)."""
        store = self._of()
        token = new_id()
        await self._lock(store, conv, token)
        stored = False
        try:
            (group,) = await store.get_many([conv])
            if kind == "add":
                change = plan_add(group, conv, actor, users)
            elif kind == "remove":
                change = plan_remove(group, conv, actor, users)
            else:
                change = plan_leave(group, conv, actor)
            if change is None:
                return now_ms()
            event = Event("group", actor, change.event_data())
            await self._append(event, conv, change.recipients())
            try:
                await store.put(change.group, unlock=token)
            except PeerNetError:
                # Durable in the log, not in the store: the lock is left to expire rather than
                # let another change plan from the state before this one meanwhile.
                stored = True
                log.warning("group change %s of %s is in the log but not stored", event.id, conv)
                raise
            stored = True
            return event.ts
        finally:
            if not stored:
                try:
                    await store.unlock(conv, token)
                except PeerNetError as exc:  # it expires
                    log.warning("could not free the lock of %s: %s", conv, exc)

    async def _lock(self, store: GroupStore, conv: str, token: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LOCK_WAIT_S
        while not await store.lock(conv, token, LOCK_TTL_MS):
            if loop.time() > deadline:
                raise unavailable(f"another change of {conv} is in progress; retry")
            await asyncio.sleep(LOCK_POLL_S)

    async def _append(self, event: Event, conv: str, recipients: Sequence[str]) -> None:
        await self._messenger.append(event, key=conv, recipients=list(recipients),
                                     topic=self._topic)

    def handlers(self) -> HandlerTable:
        """The group frames, to be merged into the one handler table."""

        async def group_create(conn: Connection, frame: Frame) -> Frame | None:
            title = text_field(frame, "title", MAX_TITLE_CHARS)
            members = user_list(frame, "members", MAX_MEMBERS)
            cid = optional_text(frame, "cid", 64)
            sent = await self.create(conn.user, title, members, cid)
            return {"t": "ok", "conv": sent.conv, "ts": sent.ts}

        async def group_add(conn: Connection, frame: Frame) -> Frame | None:
            conv, users = _conv(frame), _users(frame)
            return {"t": "ok", "conv": conv, "ts": await self.change(conn.user, conv, "add", users)}

        async def group_remove(conn: Connection, frame: Frame) -> Frame | None:
            conv, users = _conv(frame), _users(frame)
            ts = await self.change(conn.user, conv, "remove", users)
            return {"t": "ok", "conv": conv, "ts": ts}

        async def group_leave(conn: Connection, frame: Frame) -> Frame | None:
            conv = _conv(frame)
            return {"t": "ok", "conv": conv, "ts": await self.change(conn.user, conv, "leave")}

        return {"group_create": group_create, "group_add": group_add,
                "group_remove": group_remove, "group_leave": group_leave}

