"""GroupStore: the current membership of every group (Redis), what the gateway checks each
request against.

The event log is the truth: every membership change is a `group` event on the messages log,
keyed by the group's conversation, carrying the whole state after it with a version one higher
than the state before. The gateway writes a change here once its event is durable, under the
group's lock, so the changes of one group are appended and stored one at a time, in version
order; `peernet replay` writes every state again from the log (actors/replay.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

# A group holds at most this many members (the protocol's limit).
MAX_MEMBERS = 500


@dataclass(frozen=True, slots=True)
class Group:
    """A group's state: `members` in the order they joined (the creator first), so the
    longest-standing member is the first; `owner` is None only for a group everyone left.
    `version` is 1 at creation and one more at every change."""

    conv: str
    title: str
    owner: str | None
    members: tuple[str, ...]
    version: int

    def has(self, user: str) -> bool:
        return user in self.members

    def to_dict(self) -> dict[str, Any]:
        return {"conv": self.conv, "title": self.title, "owner": self.owner,
                "members": list(self.members), "version": self.version}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Group:
        """KeyError or TypeError when `d` is not a group's state."""
        owner = d["owner"]
        return cls(conv=str(d["conv"]), title=str(d["title"]),
                   owner=None if owner is None else str(owner),
                   members=tuple(str(u) for u in d["members"]), version=int(d["version"]))


class GroupStore(Protocol):
    """Groups by conversation, and a lock per group for changing one.

    Guarantees:
    - `put` stores a state unless the stored one has a higher version (equal: the later call
      wins, as a later record of the log does), and is visible to every process once it returns.
    - `lock` is held by one token at a time, for at most `ttl_ms` (a holder that dies frees it
      by expiry); `put(..., unlock=token)` and `unlock` free it only for its holder.
    - Every method raises PeerNetError(unavailable) when the store does not answer; nothing
      else of its failures leaves it.
    """

    async def get_many(self, convs: Sequence[str]) -> list[Group | None]:
        """Each group's current state, in order (None: no such group), in one round trip."""

    async def lock(self, conv: str, token: str, ttl_ms: int) -> bool:
        """Take the group's lock for `token`; False when another holds it."""

    async def unlock(self, conv: str, token: str) -> None: ...

    async def put(self, group: Group, *, unlock: str | None = None) -> None:
        """Store `group` (see the version rule above), then free the lock if `unlock` holds it."""

    async def put_many(self, groups: Sequence[Group]) -> None:
        """`put` of each, in order (replay)."""

    async def close(self) -> None: ...
