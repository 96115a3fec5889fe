"""Read state at the gateway: the `read` frame (merged into the one handler table).

A `read` is checked against the conversation as it is now (a group's current members, a pair's
two), its message found in the conversation's order (the conversation index, one Redis round
trip; MongoDB for a message older than the index keeps), and compared with the reader's marker:
a message at or before it changes nothing and is acknowledged without an event. Otherwise a
`read` event {conv, id, pos} goes to the messages log keyed by the conversation (acks=all), with
the members as its recipients, and only then `ok`. The session shards apply it in the log's
order with the conversation's messages: the marker moves forward only, the reader's unread
messages up to it go, and each member's connections get the receipt (actors/conversations.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bus.conversations import ConversationIndex
from bus.store import MESSAGES, DocumentStore
from peernet.codec import Frame
from peernet.envelope import Event
from peernet.errors import unavailable
from serve.groups import Groups, is_group_conv, not_found, pair_peer
from serve.messaging import Messenger
from serve.validate import text_field

if TYPE_CHECKING:
    from serve.connection import Connection
    from serve.handlers import HandlerTable

# Message ids are 26 characters (peernet.ids); anything up to this is looked up, then not found.
MAX_ID_CHARS = 64


class ReadState:
    """The gateway's side of read markers (`index` None: `read` answers `unavailable`)."""

    def __init__(self, index: ConversationIndex | None, store: DocumentStore | None,
                 groups: Groups, messenger: Messenger, messages_topic: str) -> None:
        self._index = index
        self._store = store
        self._groups = groups
        self._messenger = messenger
        self._topic = messages_topic

    async def members(self, conv: str, user: str) -> list[str]:
        """The members of `conv`, `user` among them (else forbidden; an unknown group
        not_found, a malformed conversation bad_request)."""
        if is_group_conv(conv):
            return list((await self._groups.member_view(conv, user)).members)
        return [user, pair_peer(conv, user)]

    async def position(self, user: str, conv: str, msg_id: str) -> tuple[int, int]:
        """(the message's place in `conv`, `user`'s marker there: -1 when none); not_found for
        a message that is not one of `conv`'s."""
        if self._index is None:
            raise unavailable("read state is not configured on this gateway")
        located = await self._index.locate(user, conv, msg_id)
        if located.pos is not None:
            return located.pos, located.marker
        # Older than the index keeps (or from before it existed): the store of record has it
        # by then; a message the shards have not delivered yet the reader cannot have seen.
        docs = await self._store.documents(MESSAGES, [msg_id]) if self._store is not None else []
        if not docs or docs[0].get("conv") != conv or not isinstance(docs[0].get("pos"), int):
            raise not_found(f"no message {msg_id} in {conv}")
        return int(docs[0]["pos"]), located.marker

    async def read(self, user: str, conv: str, msg_id: str) -> Event | None:
        """Move `user`'s marker in `conv` to `msg_id`: the durable event, or None when the
        marker is there or further on already (nothing changes)."""
        members = await self.members(conv, user)
        pos, marker = await self.position(user, conv, msg_id)
        if pos <= marker:
            return None
        event = Event("read", user, {"conv": conv, "id": msg_id, "pos": pos})
        await self._messenger.append(event, key=conv, recipients=members, topic=self._topic)
        return event

    def handlers(self) -> HandlerTable:
        """The `read` frame, to be merged into the one handler table."""

        async def read(conn: Connection, frame: Frame) -> Frame | None:
            conv = text_field(frame, "conv", 200)
            msg_id = text_field(frame, "id", MAX_ID_CHARS)
            await self.read(conn.user, conv, msg_id)
            return {"t": "ok"}

        return {"read": read}
