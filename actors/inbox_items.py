"""What each event puts in whose inbox: the one mapping from log events to inbox items."""

from __future__ import annotations

from bus.inbox import Item
from peernet.envelope import Event

# The header that carries an event's recipients is named in the core (peernet/wire.py), where the
# gateway that writes it and the shards that read it both find it; kept importable from here.
from peernet.wire import RECIPIENTS_HEADER as RECIPIENTS_HEADER
from peernet.wire import parse_recipients as parse_recipients
from peernet.wire import recipients_header as recipients_header


def inbox_item(event: Event, user: str) -> Item | None:
    """The item (without `seq`) that `event` puts in `user`'s inbox, or None."""
    d = event.data
    if event.type == "dm":
        return {"t": "msg", "id": event.id, "conv": d["conv"], "from": event.actor, "to": d["to"],
                "body": d["body"], "ts": event.ts}
    if event.type == "group_msg":
        return {"t": "msg", "id": event.id, "conv": d["conv"], "from": event.actor,
                "body": d["body"], "ts": event.ts}
    if event.type == "group":
        # The member list after the change; empty for a user it took out.
        members = list(d["members"])
        return {"t": "note", "id": event.id, "kind": "group", "from": event.actor,
                "ts": event.ts, "conv": d["conv"], "change": d["change"], "title": d["title"],
                "owner": d["owner"], "members": members if user in members else []}
    if event.type in ("follow", "like"):
        item: Item = {"t": "note", "id": event.id, "kind": event.type, "from": event.actor,
                      "ts": event.ts}
        if "post" in d:
            item["post"] = d["post"]
        return item
    return None
