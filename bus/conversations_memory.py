"""ConversationIndex in memory for unit tests, the state the Redis scripts keep
(bus/conversations_redis.py) as plain Python: the inbox cache in memory applies a batch's ops to
it in its append, and it is lost with the cache (`MemoryInboxCache.wipe`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bus.conversations import (
    ChangeOp,
    Conversation,
    ConversationOp,
    ConversationPage,
    Cursor,
    Located,
    MessageOp,
    ReadOp,
)
from peernet.codec import pack, unpack
from peernet.errors import unavailable
from peernet.wire import user_channel


@dataclass
class ConversationState:
    """What RedisConversations keeps, in one copy (no slot groups here). Values go through
    msgpack as they do to Redis."""

    keep: int = 1_000
    lists: dict[str, dict[str, int]] = field(default_factory=dict)  # user -> conv -> ts
    unread: dict[tuple[str, str], set[int]] = field(default_factory=dict)  # (conv, user)
    ids: dict[str, dict[str, int]] = field(default_factory=dict)  # conv -> id -> pos
    last: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    markers: dict[str, dict[str, tuple[int, str]]] = field(default_factory=dict)
    groups: dict[str, tuple[int, bytes]] = field(default_factory=dict)

    def clear(self) -> None:
        for part in (self.lists, self.unread, self.ids, self.last, self.markers, self.groups):
            part.clear()

    def apply(self, ops: Sequence[ConversationOp]) -> list[tuple[str, bytes]]:
        """Apply `ops` in order; the receipts to publish, (channel, payload)."""
        out: list[tuple[str, bytes]] = []
        for op in ops:
            if isinstance(op, MessageOp):
                self._message(op)
            elif isinstance(op, ReadOp):
                out.extend(self._read(op))
            else:
                self._change(op)
        return out

    def _marker(self, conv: str, user: str) -> int:
        return self.markers.get(conv, {}).get(user, (-1, ""))[0]

    def _rise(self, user: str, conv: str, ts: int) -> None:
        convs = self.lists.setdefault(user, {})
        convs[conv] = max(convs.get(conv, ts), ts)

    def _message(self, op: MessageOp) -> None:
        ids = self.ids.setdefault(op.conv, {})
        msg_id = str(op.msg["id"])
        if ids.get(msg_id, op.pos) != op.pos:
            return  # another record of a message already indexed
        ids[msg_id] = op.pos
        while len(ids) > self.keep:
            del ids[min(ids, key=lambda i: ids[i])]
        if op.pos >= self.last.get(op.conv, (-1, b""))[0]:
            self.last[op.conv] = (op.pos, pack(op.msg))
        for user in op.users:
            self._rise(user, op.conv, int(op.msg["ts"]))
            if user != op.msg["from"] and self._marker(op.conv, user) < op.pos:
                self.unread.setdefault((op.conv, user), set()).add(op.pos)

    def _read(self, op: ReadOp) -> list[tuple[str, bytes]]:
        if self._marker(op.conv, op.user) >= op.pos:
            return []
        self.markers.setdefault(op.conv, {})[op.user] = (op.pos, op.id)
        if op.user in op.users:
            left = {p for p in self.unread.get((op.conv, op.user), set()) if p > op.pos}
            self.unread[(op.conv, op.user)] = left
        return [(user_channel(u), op.receipt) for u in op.notify]

    def _change(self, op: ChangeOp) -> None:
        version = int(op.state["version"])
        if self.groups.get(op.conv, (-1, b""))[0] <= version:
            self.groups[op.conv] = (version, pack(op.state))
        for user in op.users:
            self._rise(user, op.conv, op.ts)
        for user in op.removed:
            self.lists.get(user, {}).pop(op.conv, None)
            self.unread.pop((op.conv, user), None)
            self.markers.get(op.conv, {}).pop(user, None)

    def page(self, user: str, limit: int, before: Cursor | None) -> ConversationPage:
        order = sorted(((ts, conv) for conv, ts in self.lists.get(user, {}).items()),
                       reverse=True)
        if before is not None:
            order = [(ts, conv) for ts, conv in order if (ts, conv) < (before.ts, before.conv)]
        items = [self._entry(user, conv, ts) for ts, conv in order[:limit]]
        nxt = Cursor(items[-1].ts, items[-1].conv) if len(order) > limit else None
        return ConversationPage(items, nxt)

    def _entry(self, user: str, conv: str, ts: int) -> Conversation:
        last = self.last.get(conv)
        state: Any = self.groups.get(conv)
        return Conversation(
            conv=conv, ts=ts, last=unpack(last[1]) if last else None,
            unread=len(self.unread.get((conv, user), ())),
            read={u: m[1] for u, m in self.markers.get(conv, {}).items()},
            group=unpack(state[1]) if state and conv.startswith("g:") else None)


class MemoryConversations:
    """ConversationIndex on a ConversationState (a MemoryInboxCache's: `inbox.conversations`).
    `down` as the cache's: every call raises PeerNetError(unavailable) while it is."""

    def __init__(self, state: ConversationState, *, down: Any = None) -> None:
        self._state = state
        self._down = down or (lambda: False)

    def _check(self) -> None:
        if self._down():
            raise unavailable("memory conversations are down")

    async def page(self, user: str, limit: int, before: Cursor | None) -> ConversationPage:
        self._check()
        return self._state.page(user, limit, before)

    async def locate(self, user: str, conv: str, msg_id: str) -> Located:
        self._check()
        marker = self._state.markers.get(conv, {}).get(user)
        return Located(self._state.ids.get(conv, {}).get(msg_id), marker[0] if marker else -1)

    async def apply(self, ops: Sequence[ConversationOp]) -> None:
        self._check()
        # Replay's writes publish nothing, as on Redis (its ops name no one to notify).
        self._state.apply(ops)


__all__ = ["ConversationState", "MemoryConversations"]
