"""What each log record does to the conversation index (bus/conversations.py): the one mapping
from messages, reads and membership changes to its ops, which the session shards apply for
their users as they deliver and `peernet replay` applies for everyone."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from actors.groups import Memberships, is_group_record
from bus.conversations import ChangeOp, ConversationOp, Message, MessageOp, ReadOp
from bus.eventlog import Record
from peernet.codec import pack
from peernet.envelope import EnvelopeError, Event
from peernet.wire import parse_recipients

# The records of the messages log that concern conversations.
CONVERSATION_EVENTS = frozenset({"dm", "group_msg", "read", "group"})
# Those that are messages: an inbox item each.
MESSAGE_EVENTS = frozenset({"dm", "group_msg"})

# Groups a rebuild follows at once: every group of the log, as far as memory goes.
REBUILD_GROUPS = 1_000_000


def history_message(event: Event) -> Message | None:
    """A message event as history gives it (MSG without `t` and `seq`; a group's has no `to`),
    None for any other event."""
    d = event.data
    if event.type == "dm":
        return {"id": event.id, "conv": d["conv"], "from": event.actor, "to": d["to"],
                "body": d["body"], "ts": event.ts}
    if event.type == "group_msg":
        return {"id": event.id, "conv": d["conv"], "from": event.actor, "body": d["body"],
                "ts": event.ts}
    return None


def receipt(event: Event) -> dict[str, object]:
    """The push a `read` event gives the members' connections."""
    d = event.data
    return {"t": "read", "conv": d["conv"], "user": event.actor, "id": d["id"], "ts": event.ts}


def conversation_op(event: Event, offset: int, users: Sequence[str], *,
                    notify: bool) -> ConversationOp | None:
    """The op of `event`, read at `offset` of its conversation's partition, for `users` (the
    recipients it concerns: those whose inbox got a message, the members a read is told to, the
    members after a change and those it removed); None for an event of no conversation or
    concerning none of `users`. `notify`: a read's receipt goes to `users`' connections.
    KeyError or TypeError for a malformed event."""
    if not users or event.type not in CONVERSATION_EVENTS:
        return None
    d = event.data
    message = history_message(event)
    if message is not None:
        return MessageOp(str(d["conv"]), offset, message, tuple(users))
    if event.type == "read":
        return ReadOp(str(d["conv"]), int(d["pos"]), str(d["id"]), event.actor, event.ts,
                      tuple(users), tuple(users) if notify else (),
                      pack(receipt(event)) if notify else b"")
    members = [str(u) for u in d["members"]]
    state: dict[str, Any] = {"conv": str(d["conv"]), "title": str(d["title"]), "owner": d["owner"],
             "members": members, "version": int(d["version"])}
    inside = set(members)
    return ChangeOp(state["conv"], event.ts, state,
                    tuple(u for u in users if u in inside),
                    tuple(u for u in users if u not in inside))


# Message ids a rebuild remembers to drop a second record of one message (a producer's retry
# lands next to the first); the index drops those it still holds too.
REBUILD_SEEN_IDS = 100_000


class ConversationRebuild:
    """The ops of the messages log's records, read in each partition's order, for every user
    they concern: what `peernet replay` applies. Recipients as the shards find them: a
    message's header, or for a group's message the members of a newer change read before it
    (actors/groups.py), which a rebuild from offset 0 always knows."""

    def __init__(self) -> None:
        self._memberships = Memberships(capacity=REBUILD_GROUPS)
        self._seen: OrderedDict[str, None] = OrderedDict()
        self.skipped = 0

    def ops(self, records: Sequence[Record]) -> list[ConversationOp]:
        out: list[ConversationOp] = []
        for record in records:
            try:
                event = Event.decode(record.value)
                recipients = parse_recipients(record.headers)
                if is_group_record(record.key):
                    recipients = self._memberships.recipients(event, recipients)
                if event.type in MESSAGE_EVENTS and self._seen_before(event.id):
                    continue
                op = conversation_op(event, record.offset, recipients, notify=False)
            except (EnvelopeError, KeyError, TypeError, ValueError):
                self.skipped += 1  # the projector counts it as an error
                continue
            if op is not None:
                out.append(op)
        return out

    def _seen_before(self, event_id: str) -> bool:
        if event_id in self._seen:
            return True
        self._seen[event_id] = None
        if len(self._seen) > REBUILD_SEEN_IDS:
            self._seen.popitem(last=False)
        return False
