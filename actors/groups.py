"""What a session shard knows of groups: each group's membership as of the shard's place in the
messages log, learnt from the `group` events in log order, and so the recipients of a group's
message by the log's order rather than by what the gateway read.

A message is checked at the gateway against the group as stored then (its `mv`, the version it
read); a membership change can still be appended between that read and the message's own append.
The log's order of the group's partition decides: a message placed after a change of a higher
version goes to the members after that change (a member removed before it gets nothing of it;
one that raced its own removal is delivered to the members that remain). Without a newer change
known, the message's own recipients (the members at `mv`) stand.

The view is in memory and bounded: after a restart, or for a group evicted, only changes read
from then on are known, so a send that raced a change read before the restart goes to the
members the gateway read (docs/architecture.md, "Groups").
"""

from __future__ import annotations

from collections import OrderedDict

from bus.groups import Group
from peernet.envelope import Event
from peernet.wire import GROUP_CONV_PREFIX

# Groups a shard remembers, the most recently changed or used; a forgotten one costs only the
# race rule above until its next change.
REMEMBERED_GROUPS = 10_000

_KEY_PREFIX = GROUP_CONV_PREFIX.encode()


def is_group_record(key: bytes | None) -> bool:
    """Whether a messages-log record belongs to a group (they are keyed by the conversation)."""
    return key is not None and key.startswith(_KEY_PREFIX)


def group_state(event: Event) -> Group | None:
    """The state after a membership change event (None for any other event)."""
    return Group.from_dict(event.data) if event.type == "group" else None


class Memberships:
    """Groups' members as of the log position read so far (see the module docstring)."""

    def __init__(self, capacity: int = REMEMBERED_GROUPS) -> None:
        self._capacity = capacity
        self._groups: OrderedDict[str, Group] = OrderedDict()
        self.raced = 0  # messages delivered by a newer membership than their sender read

    def __len__(self) -> int:
        return len(self._groups)

    def learn(self, group: Group) -> None:
        """A change read from the log; of equal versions the later in the log wins."""
        known = self._groups.get(group.conv)
        if known is None or known.version <= group.version:
            self._groups[group.conv] = group
        self._groups.move_to_end(group.conv)
        while len(self._groups) > self._capacity:
            self._groups.popitem(last=False)

    def recipients(self, event: Event, header: list[str]) -> list[str]:
        """Whose inboxes `event`, read at this point of the log, goes to: for a membership change
        (learnt here) and any other event, the recipients it names; for a group's message, the
        members of a newer change read before it, if any."""
        state = group_state(event)
        if state is not None:
            self.learn(state)
            return header
        if event.type != "group_msg":
            return header
        known = self._groups.get(str(event.data["conv"]))
        if known is not None and known.version > int(event.data["mv"]):
            self.raced += 1
            return list(known.members)
        return header
