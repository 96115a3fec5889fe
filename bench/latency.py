"""Latency histograms: HdrHistogram (the `hdrhistogram` package) in microseconds, reported in
milliseconds, mergeable across load processes through its compressed encoding."""

from __future__ import annotations

from typing import Any

from hdrh.histogram import HdrHistogram

# 1 us to 1 hour at 3 significant figures: 0.1% relative error at every scale.
LOWEST_US = 1
HIGHEST_US = 3_600_000_000
SIGNIFICANT_FIGURES = 3

PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99_9", 99.9),
)


class LatencyHistogram:
    """Latencies of one kind. Values outside 1 us .. 1 h are clamped and counted, never dropped."""

    def __init__(self) -> None:
        self._h = HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_FIGURES)
        self.clamped = 0

    def record_us(self, us: int) -> None:
        if us < LOWEST_US or us > HIGHEST_US:
            self.clamped += 1
            us = min(max(us, LOWEST_US), HIGHEST_US)
        self._h.record_value(us)

    @property
    def count(self) -> int:
        return int(self._h.get_total_count())

    def percentile_ms(self, p: float) -> float:
        if self.count == 0:
            return 0.0
        return float(self._h.get_value_at_percentile(p)) / 1000.0

    def max_ms(self) -> float:
        return float(self._h.get_max_value()) / 1000.0 if self.count else 0.0

    def mean_ms(self) -> float:
        return float(self._h.get_mean_value()) / 1000.0 if self.count else 0.0

    def merge(self, other: LatencyHistogram) -> None:
        if other.count:
            self._h.add(other._h)
        self.clamped += other.clamped

    def encode(self) -> str:
        """A compact text form (HdrHistogram V2, compressed, base64) plus the clamp count."""
        return f"{self.clamped}:{self._h.encode().decode('ascii')}"

    @classmethod
    def decode(cls, text: str) -> LatencyHistogram:
        clamped, _, blob = text.partition(":")
        h = cls()
        h._h.decode_and_add(blob.encode("ascii"))
        h.clamped = int(clamped)
        return h

    def summary(self) -> dict[str, Any]:
        """count, p50, p90, p99, p99_9, max, mean (ms)."""
        out: dict[str, Any] = {"count": self.count}
        for name, p in PERCENTILES:
            out[name] = round(self.percentile_ms(p), 3)
        out["max"] = round(self.max_ms(), 3)
        out["mean"] = round(self.mean_ms(), 3)
        if self.clamped:
            out["clamped"] = self.clamped
        return out

    def cdf(self, ticks_per_half_distance: int = 5) -> list[tuple[float, float]]:
        """(latency ms, percentile) points for a latency-by-percentile plot."""
        if self.count == 0:
            return []
        points = [
            (float(item.value_iterated_to) / 1000.0, float(item.percentile_level_iterated_to))
            for item in self._h.get_percentile_iterator(ticks_per_half_distance)
        ]
        return points
