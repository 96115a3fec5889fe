"""The one table from frame type to handler. A handler gets the connection and the decoded
frame, returns the reply (the dispatcher adds `rid`) or None, and raises PeerNetError for the
client's errors."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from peernet.codec import Frame, pack
from peernet.errors import bad_request
from peernet.wire import user_channel
from serve.acks import AckBuffer
from serve.groups import Groups, is_group_conv, pair_peer
from serve.messaging import Messenger
from serve.presence import Presence, state_map
from serve.reads import ReadState
from serve.social import social_handlers
from serve.validate import (
    dm_conv,
    int_field,
    optional_text,
    text_field,
    user_field,
    user_list,
)

if TYPE_CHECKING:
    from serve.connection import Connection

Handler = Callable[["Connection", Frame], Awaitable[Frame | None]]
HandlerTable = dict[str, Handler]


def conv_or_to(frame: Frame) -> tuple[str | None, str | None]:
    """(conv, None) or (None, to): a request names exactly one of the two."""
    conv, to = frame.get("conv"), frame.get("to")
    if (conv is None) == (to is None):
        raise bad_request("name exactly one of 'to' and 'conv'")
    if conv is not None:
        if not isinstance(conv, str):
            raise bad_request("'conv' must be a conversation id")
        return conv, None
    return None, user_field(frame, "to")


def build_handlers(messenger: Messenger, presence: Presence, acks: AckBuffer,
                   groups: Groups | None = None, reads: ReadState | None = None) -> HandlerTable:
    """`groups` None: the group frames answer `unavailable`; `reads` None: `read` does."""
    groups = groups or Groups(None, messenger, "")
    reads = reads or ReadState(None, None, groups, messenger, "")

    async def ping(conn: Connection, frame: Frame) -> Frame | None:
        return {"t": "pong"}

    async def hello(conn: Connection, frame: Frame) -> Frame | None:
        raise bad_request("hello was already received on this connection")

    async def dm(conn: Connection, frame: Frame) -> Frame | None:
        conv, to = conv_or_to(frame)
        body = text_field(frame, "body", conn.cfg.max_body_chars)
        cid = optional_text(frame, "cid", 64)
        if conv is not None and is_group_conv(conv):
            # Checked against the group as it is now; the shards deliver by the membership at
            # the message's place in the log (a send that raced a removal: actors/groups.py).
            group = await groups.member_view(conv, conn.user)
            sent = await messenger.send_to_group(conn.user, group, body, cid)
            return {"t": "ok", "id": sent.id, "conv": sent.conv, "ts": sent.ts}
        to = pair_peer(conv, conn.user) if conv is not None else to
        assert to is not None
        if to == conn.user:
            raise bad_request("a direct message to oneself is not allowed")
        sent = await messenger.send_dm(conn.user, to, body, cid)
        return {"t": "ok", "id": sent.id, "conv": sent.conv, "ts": sent.ts}

    async def typing(conn: Connection, frame: Frame) -> Frame | None:
        conv, to = conv_or_to(frame)
        if conv is not None and is_group_conv(conv):
            group = await groups.member_view(conv, conn.user)
            payload = pack({"t": "typing", "from": conn.user, "conv": conv})
            await conn.deps.pubsub.publish_many(
                [(user_channel(u), payload) for u in group.members if u != conn.user])
            return None
        to = pair_peer(conv, conn.user) if conv is not None else to
        assert to is not None
        if to == conn.user:
            raise bad_request("typing to oneself is not allowed")
        await conn.deps.pubsub.publish(user_channel(to), pack(
            {"t": "typing", "from": conn.user, "conv": dm_conv(conn.user, to)}))
        return None

    async def ack(conn: Connection, frame: Frame) -> Frame | None:
        seq = int_field(frame, "seq", lo=0, hi=2**53)
        await acks.add(conn.user, seq)
        return None

    async def watch(conn: Connection, frame: Frame) -> Frame | None:
        users = user_list(frame, "users", conn.cfg.max_watch)
        return {"t": "presence_state", "users": state_map(await presence.watch(conn, users))}

    async def unwatch(conn: Connection, frame: Frame) -> Frame | None:
        presence.unwatch(conn, user_list(frame, "users", conn.cfg.max_watch))
        return {"t": "ok"}

    return {**social_handlers(messenger), **groups.handlers(), **reads.handlers(),
            "ping": ping, "hello": hello, "dm": dm, "typing": typing, "ack": ack,
            "watch": watch, "unwatch": unwatch}
