"""Cache: small shared key-value state with expiry (Redis), e.g. idempotency keys."""

from __future__ import annotations

from typing import Protocol


class Cache(Protocol):
    """A shared key-value cache. Everything in it can be lost (a restart of Redis) and rebuilt
    from the EventLog; writes are visible to every process as soon as they return."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, *, ttl_s: float | None = None) -> None: ...

    async def set_if_absent(self, key: str, value: bytes, *, ttl_s: float | None = None) -> bool:
        """Set only when `key` has no value; True when this call set it (atomic across processes)."""

    async def delete(self, key: str) -> None: ...

    async def ping(self) -> None:
        """Raise PeerNetError(unavailable) unless the cache answers."""
