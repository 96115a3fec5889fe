"""InboxCache: the fast, rebuildable copy of every user's inbox (Redis).

The durable inbox is the inbox topic of the EventLog (see actors/session.py); this cache holds
what clients read on `resume` and what the owner of a user's sequence needs after a restart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

Item = dict[str, Any]  # an inbox frame: {"t": "msg"|"note", "seq": S, "id": ID, "ts": TS, ...}


@dataclass(frozen=True, slots=True)
class Bounds:
    """The seq range a user's cached inbox holds; (0, 0) when it holds nothing."""

    oldest: int
    latest: int


class InboxCache(Protocol):
    """Per-user inbox items by seq.

    - `append` stores the items and the writer's checkpoint in one atomic step: after a crash the
      cache holds either both or neither, so replaying the inbox log from the checkpoint restores
      every item (appending the same (user, seq) again is harmless).
    - Retention: a user's items are trimmed only when they are both older than `retention_ms` and
      not among the newest `retention_items`.
    - Everything may be lost (Redis wiped): `checkpoint` then answers None and the owner rebuilds.
    """

    async def append(self, items: Sequence[tuple[str, Item]], *, checkpoint_name: str,
                     checkpoint: Mapping[int, int]) -> None: ...

    async def read(self, user: str, after: int, limit: int) -> list[Item]:
        """Items with seq > `after`, oldest first, at most `limit`."""

    async def bounds(self, user: str) -> Bounds: ...

    async def recent(self, user: str, count: int) -> list[Item]:
        """The newest `count` items, oldest first."""

    async def checkpoint(self, name: str) -> dict[int, int] | None:
        """The checkpoint stored with the last append under `name`, None when there is none."""

    async def ack(self, user: str, seq: int) -> int:
        """Record a cumulative ack (never moves back); returns the acked seq in force."""

    async def acked(self, user: str) -> int: ...
