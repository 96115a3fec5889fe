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
from serve.messaging import Messenger
from serve.presence import Presence, state_map
from serve.social import social_handlers
from serve.validate import dm_conv, int_field, optional_text, text_field, user_field, user_list

if TYPE_CHECKING:
    from serve.connection import Connection

Handler = Callable[["Connection", Frame], Awaitable[Frame | None]]
HandlerTable = dict[str, Handler]


def build_handlers(messenger: Messenger, presence: Presence, acks: AckBuffer) -> HandlerTable:
    async def ping(conn: Connection, frame: Frame) -> Frame | None:
        return {"t": "pong"}

    async def hello(conn: Connection, frame: Frame) -> Frame | None:
        raise bad_request("hello was already received on this connection")

    async def dm(conn: Connection, frame: Frame) -> Frame | None:
        to = user_field(frame, "to")
        if to == conn.user:
            raise bad_request("a direct message to oneself is not allowed")
        body = text_field(frame, "body", conn.cfg.max_body_chars)
        cid = optional_text(frame, "cid", 64)
        sent = await messenger.send_dm(conn.user, to, body, cid)
        return {"t": "ok", "id": sent.id, "conv": sent.conv, "ts": sent.ts}

    async def typing(conn: Connection, frame: Frame) -> Frame | None:
        to = user_field(frame, "to")
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

    return {**social_handlers(messenger),
            "ping": ping, "hello": hello, "dm": dm, "typing": typing, "ack": ack,
            "watch": watch, "unwatch": unwatch}
