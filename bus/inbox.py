"""InboxCache: the fast, rebuildable copy of every user's inbox (Redis).

The durable inbox is the inbox topic of the EventLog (see actors/session.py); this cache holds
what clients read on `resume` and what the owner of a user's sequence needs after a restart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from bus.conversations import ConversationOp

Item = dict[str, Any]  # an inbox frame: {"t": "msg"|"note", "seq": S, "id": ID, "ts": TS, ...}


@dataclass(frozen=True, slots=True)
class Bounds:
    """The seq range a user's cached inbox holds; (0, 0) when it holds nothing."""

    oldest: int
    latest: int


class CacheBehind(Exception):
    """The cache does not hold what its writer last wrote: it was wiped, or lost its latest
    writes (a restart that kept an older snapshot). Nothing was written."""


class InboxCache(Protocol):
    """Per-user inbox items by seq.

    - `append` stores the items and the writer's checkpoints in one atomic step: after a crash
      the cache holds either all of them or none, so replaying the inbox log from the checkpoint
      restores every item (appending the same (user, seq) again is harmless).
    - Each checkpoint name has a version that every append under it increments. With
      `expect_version`, an append happens only when the stored version is the one the writer
      last saw, else it raises CacheBehind and writes nothing: a writer never builds on a cache
      that lost data behind its back.
    - Retention: a user's items are trimmed only when they are both older than `retention_ms` and
      not among the newest `retention_items`.
    - Everything may be lost (Redis wiped): `checkpoint` then answers None, `version` 0.
    - A cache that `publishes` shares its server with the PubSub of the deployment: `append`
      then also publishes each item, as stored (its MessagePack bytes), on a channel named for
      it, in the same step as the items are stored, so a push never precedes its item in the
      cache, and an append that stored nothing published nothing (an append retried after a
      lost reply may publish twice: pushes are at-least-once). Delivery to subscribers is the
      PubSub's (at most once).
    - `append` applies the batch's conversation ops (bus/conversations.py) in the same step,
      after the items; they name only users of the checkpoint's group, as the items do. A
      cache that `publishes` publishes a read's receipts when it moves a marker; one that does
      not (a double without pub/sub) drops them.
    """

    @property
    def publishes(self) -> bool:
        """Whether `append` can publish (it raises ValueError for channels otherwise)."""

    async def append(self, items: Sequence[tuple[str, Item]], *, checkpoint_name: str,
                     checkpoint: Mapping[int, int],
                     also: Mapping[str, Mapping[int, int]] | None = None,
                     expect_version: int | None = None,
                     publish: Sequence[str] = (),
                     conversations: Sequence[ConversationOp] = ()) -> int:
        """Store `items`, `checkpoint` under `checkpoint_name` and the `also` checkpoints
        (merged per partition) and apply `conversations` atomically, then publish item i,
        packed as stored, on channel `publish[i]` (`publish` empty: nothing, else one channel
        per item; ValueError otherwise); returns the new version of `checkpoint_name`. Nothing
        is published when it raises CacheBehind (read receipts neither)."""

    async def version(self, name: str) -> int:
        """The version of checkpoint `name` (0 when the cache has none)."""

    async def read(self, user: str, after: int, limit: int) -> list[Item]:
        """Items with seq > `after`, oldest first, at most `limit`."""

    async def bounds(self, user: str) -> Bounds: ...

    async def recent(self, user: str, count: int) -> list[Item]:
        """The newest `count` items, oldest first."""

    async def checkpoint(self, name: str) -> dict[int, int] | None:
        """The checkpoint stored with the last append under `name`, None when there is none."""

    async def ack_many(self, acks: Mapping[str, int]) -> dict[str, int]:
        """Record cumulative acks, user -> seq, in one write (each user's never moves back);
        returns the acked seq in force for each user given."""

    async def acked(self, user: str) -> int: ...
