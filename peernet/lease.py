"""The presence lease: how its bound splits between the replicas that renew it and the presence
shards that check it (both sides must derive the same intervals from PEERNET_PRESENCE_LEASE_MS)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LeaseTiming:
    """How the lease bound `lease_ms` (a dead replica's users are offline within it) splits:
    shards check leases every `check_ms`, a lease lives `ttl_ms` after its renewal, and replicas
    renew it every `renew_ms`. Detection takes at most ttl + check < lease, leaving a check
    interval for recording and publishing the change."""

    lease_ms: int

    def __post_init__(self) -> None:
        if self.lease_ms < 300:
            raise ValueError("the presence lease must be at least 300 ms")

    @property
    def check_ms(self) -> int:
        return min(1_000, self.lease_ms // 10)

    @property
    def ttl_ms(self) -> int:
        return self.lease_ms - 2 * self.check_ms

    @property
    def renew_ms(self) -> int:
        return self.lease_ms // 6
