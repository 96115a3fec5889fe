"""ConversationIndex: each user's conversations by last activity, with each conversation's newest
message, every member's read marker and the user's unread count, kept up to date as the session
shards deliver (protocol 1.1, "Read state" and "Reading it back").

It is written in the log's order of each conversation (one partition, read in order by the
shards), by ops that say what a record did: a message reached some inboxes (`MessageOp`), a member
read up to a message (`ReadOp`), a group's membership changed (`ChangeOp`). A conversation's
positions (`pos`) are its records' offsets in the messages log: the one order every member sees,
which history pages by too. The session shards write their users' ops in the same atomic step
as the inbox items (InboxCache.append), `peernet replay` writes them all again from the log
(`apply`); the log is the truth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

# A message as history gives it (GET /v1/conversations/{conv}/messages): id, conv, from, to (a
# pair's), body, ts.
Message = dict[str, Any]


@dataclass(frozen=True, slots=True)
class MessageOp:
    """The message `msg` at `pos` of `conv` reached the inboxes of `users`: the conversation's
    newest message if nothing later is known, it rises to the top of the users' lists (by its
    `ts`), and it is unread for each of them but its sender while after their marker. A second
    record of the same message id at another `pos` (a producer's retry) changes nothing."""

    conv: str
    pos: int
    msg: Message
    users: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ReadOp:
    """`user` read `conv` up to the message `id` at `pos`, at `ts`: its marker moves there unless
    it is already there or further on (forward only), and so do its unread messages. When it
    moves, each of `notify` gets `receipt` published on its channel (channels named as
    peernet.wire.user_channel names them). `users` are the members whose lists hold the
    conversation (the reader among them when it is still a member)."""

    conv: str
    pos: int
    id: str
    user: str
    ts: int
    users: tuple[str, ...]
    notify: tuple[str, ...] = ()
    receipt: bytes = b""


@dataclass(frozen=True, slots=True)
class ChangeOp:
    """A group's membership change at `ts`: the group's state after it (title, owner, members,
    version: a state is never replaced by one of a lower version), the conversation rises in
    the lists of `users` (members after it), and leaves those of `removed` with their unread
    messages and their marker."""

    conv: str
    ts: int
    state: dict[str, Any]
    users: tuple[str, ...]
    removed: tuple[str, ...] = ()


ConversationOp = MessageOp | ReadOp | ChangeOp


def named_users(op: ConversationOp) -> tuple[str, ...]:
    """Every user whose keys `op` writes."""
    return (*op.users, *op.removed) if isinstance(op, ChangeOp) else op.users


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a page of a user's conversations ends: the last one's activity and id."""

    ts: int
    conv: str

    def encode(self) -> str:
        return f"{self.ts}:{self.conv}"

    @classmethod
    def decode(cls, raw: str) -> Cursor:
        """ValueError when `raw` is not a cursor this index made."""
        ts, sep, conv = raw.partition(":")
        if not sep or not conv or not ts.isdigit() or len(ts) > 18 or len(conv) > 200:
            raise ValueError(f"not a cursor: {raw[:40]!r}")
        return cls(int(ts), conv)


@dataclass(frozen=True, slots=True)
class Conversation:
    """One entry of a user's list: `last` None before any message; `group` the group's state
    (None for a pair); `read` every marker known, user -> message id."""

    conv: str
    ts: int
    last: Message | None
    unread: int
    read: dict[str, str]
    group: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class ConversationPage:
    items: list[Conversation]
    next: Cursor | None


@dataclass(frozen=True, slots=True)
class Located:
    """Where a message is in its conversation (`pos` None: not among those the index keeps),
    and where `user`'s marker is (-1: none; a position may be 0)."""

    pos: int | None
    marker: int


class ConversationIndex(Protocol):
    """The conversations of every user, by last activity (see the module docstring).

    Guarantees:
    - Every op is idempotent and ops commute where the log may interleave them (a replay beside
      the live shards): a marker only moves forward, a list's activity only rises, a group's
      state only by version, the newest message only by `pos`; `unread` counts the user's
      messages from others after the user's marker, exactly, whatever the order of the ops of
      one message and one read.
    - `page` and `locate` are each one round trip; a page's cost grows with its size, not with
      the user's number of conversations.
    - The index keeps at least the newest `keep` message ids of each conversation for
      `locate` (on Redis a few more, trimmed now and then); older ones read as unknown (pos
      None), the caller looks them up in the store of record.
    - Every method raises PeerNetError(unavailable) when the store does not answer.
    """

    async def page(self, user: str, limit: int, before: Cursor | None) -> ConversationPage:
        """`user`'s conversations, most recently active first (equal activity: by id, from
        the highest), at most `limit`, after `before`; `next` None on the last page."""

    async def locate(self, user: str, conv: str, msg_id: str) -> Located: ...

    async def apply(self, ops: Sequence[ConversationOp]) -> None:
        """Apply `ops` in order for every user they name (what `peernet replay` writes)."""
