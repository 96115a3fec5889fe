"""Per-connection limits: the token bucket of the frame rate and the flood detector."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up; one frame costs one token."""

    def __init__(self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = self._clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class FloodDetector:
    """Counts refused frames; persistent flooding is `limit` refusals with no 10 s quiet gap."""

    QUIET_S = 10.0

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.refused = 0
        self._last = 0.0

    def refuse(self) -> bool:
        """Count one refused frame; True when the connection should be closed."""
        now = time.monotonic()
        if now - self._last > self.QUIET_S:
            self.refused = 0
        self._last = now
        self.refused += 1
        return self.refused >= self.limit
