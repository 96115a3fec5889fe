"""Cache: small shared key-value state with expiry (Redis), e.g. idempotency keys, and groups of
expiring entries, e.g. what each gateway replica publishes of its metrics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Cache(Protocol):
    """A shared key-value cache. Everything in it can be lost (a restart of Redis) and rebuilt
    (from the EventLog; a group's members by their next put); writes are visible to every
    process as soon as they return. A group shares the keyspace of plain keys: name it apart."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, *, ttl_s: float | None = None) -> None: ...

    async def set_if_absent(self, key: str, value: bytes, *, ttl_s: float | None = None) -> bool:
        """Set only when `key` has no value; True when this call set it (atomic across processes)."""

    async def set_many(self, items: Sequence[tuple[str, bytes]], *, ttl_s: float | None = None) -> None:
        """`set` of every (key, value), in one round trip; not atomic as a whole: a failure
        (PeerNetError unavailable) may leave some set and others not."""

    async def set_many_if_absent(self, items: Sequence[tuple[str, bytes]], *,
                                 ttl_s: float | None = None,
                                 first: Sequence[tuple[str, bytes]] = ()) -> list[bool]:
        """`set_if_absent` of every (key, value), in one round trip: for each, in order, True
        when this call set it. Each key is claimed atomically on its own (the batch is not a
        transaction); a key named twice is set by its first entry only. `first`: (key, value)
        pairs `set` unconditionally in the same round trip, before the claims (as `set_many`:
        a failure may leave some set and others not)."""

    async def delete(self, key: str) -> None: ...

    async def put_member(self, group: str, member: str, value: bytes, *, ttl_s: float) -> None:
        """Set `member` of `group` to `value`, live for `ttl_s` from now: each member expires by
        itself (a writer that stops putting leaves the group within its ttl)."""

    async def members(self, group: str) -> dict[str, bytes]:
        """Every live member of `group` and its latest value, in one step (empty: none)."""

    async def remove_member(self, group: str, member: str) -> None:
        """Take `member` out of `group` now (absent: nothing happens)."""

    async def ping(self) -> None:
        """Raise PeerNetError(unavailable) unless the cache answers."""
