"""What each event puts in whose inbox: the one mapping from log events to inbox items."""

from __future__ import annotations

from bus.inbox import Item
from peernet.envelope import Event

# The Kafka header that names an event's inbox recipients ("a,b"), so that session shards can
# skip events for users they do not own without decoding them.
RECIPIENTS_HEADER = "to"

# The frame types that are inbox items (they carry the per-user `seq`).
INBOX_FRAME_TYPES = frozenset({"msg", "note"})


def recipients_header(users: list[str]) -> tuple[str, bytes]:
    return (RECIPIENTS_HEADER, ",".join(dict.fromkeys(users)).encode())


def parse_recipients(headers: tuple[tuple[str, bytes], ...]) -> list[str]:
    for name, value in headers:
        if name == RECIPIENTS_HEADER:
            return value.decode().split(",") if value else []
    return []


def inbox_item(event: Event, user: str) -> Item | None:
    """The item (without `seq`) that `event` puts in `user`'s inbox, or None."""
    d = event.data
    if event.type == "dm":
        return {"t": "msg", "id": event.id, "conv": d["conv"], "from": event.actor, "to": d["to"],
                "body": d["body"], "ts": event.ts}
    if event.type in ("follow", "like"):
        item: Item = {"t": "note", "id": event.id, "kind": event.type, "from": event.actor,
                      "ts": event.ts}
        if "post" in d:
            item["post"] = d["post"]
        return item
    return None
