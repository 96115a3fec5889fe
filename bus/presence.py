"""PresenceStore: what presence keeps outside the shard actors (Redis): each user's current
status, each gateway replica's lease, and the users each shard has recorded per replica, so
that a restarted presence shard rebuilds its online users from the live leases."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

Status = Literal["online", "offline"]
ONLINE: Status = "online"
OFFLINE: Status = "offline"


@dataclass(frozen=True, slots=True)
class PresenceState:
    """A user's status and since when (ms); offline since 0 is a user never seen."""

    status: Status
    since: int


NEVER_SEEN = PresenceState(OFFLINE, 0)


@dataclass(frozen=True, slots=True)
class Change:
    """A user went online or offline at `ts` (ms)."""

    user: str
    status: Status
    ts: int


class PresenceStore(Protocol):
    """Presence state shared by gateway replicas and presence shards.

    - Leases: a replica's lease is live from `renew_lease` until `ttl_ms` later; nothing else
      ends it early except `release_lease`. Every process sees the same answer to `live`.
    - `record` is atomic: the replica's recorded users and the users' statuses change together
      or not at all, so what `held` answers after a crash matches what `read` answers.
    - An online user's status never expires; an offline user's `since` may (the store's
      last-seen retention), after which the user reads as never seen.
    - Everything may be lost (Redis wiped): leases then read as lapsed, and replicas re-report.
    Every method raises PeerNetError(unavailable) when the store does not answer.
    """

    async def renew_lease(self, replica: str, ttl_ms: int) -> bool:
        """Extend (or take) `replica`'s lease; True when it was still live, False when it had
        lapsed or never existed (the shards may have counted the replica's users out)."""

    async def release_lease(self, replica: str) -> None: ...

    async def live(self, replicas: Sequence[str]) -> set[str]:
        """Which of `replicas` hold a live lease (one round trip)."""

    async def read(self, users: Sequence[str]) -> dict[str, PresenceState]:
        """Every user's state, NEVER_SEEN for unknown users (one round trip)."""

    async def held(self, shard: str) -> dict[str, set[str]]:
        """What shard `shard` recorded: replica -> the users it holds."""

    async def record(self, shard: str, replica: str, *, add: Sequence[str] = (),
                     remove: Sequence[str] = (), changes: Sequence[Change] = (),
                     forget: bool = False) -> None:
        """Record that `replica` now holds `add` and no longer holds `remove`, and write the
        statuses `changes`, atomically. `forget`: drop everything recorded for `replica`."""
