"""The HDR histogram wrapper: percentiles within HdrHistogram's precision, merging across load
processes through the encoding, clamping instead of dropping."""

from __future__ import annotations

import itertools
import random

from pytest import approx

from bench.latency import LatencyHistogram


def test_percentiles_of_a_known_distribution() -> None:
    h = LatencyHistogram()
    for ms in range(1, 1001):  # 1..1000 ms, once each
        h.record_us(ms * 1000)
    s = h.summary()
    assert s["count"] == 1000
    assert s["p50"] == approx(500, rel=1e-3)
    assert s["p90"] == approx(900, rel=1e-3)
    assert s["p99"] == approx(990, rel=1e-3)
    assert s["p99_9"] == approx(999, rel=1e-3)
    assert s["max"] == approx(1000, rel=1e-3)
    assert s["mean"] == approx(500.5, rel=1e-3)


def test_merging_encoded_parts_equals_recording_everything_in_one() -> None:
    rng = random.Random(5)
    values = [int(rng.lognormvariate(9, 1.2)) + 1 for _ in range(5000)]
    whole, parts = LatencyHistogram(), [LatencyHistogram() for _ in range(3)]
    for i, v in enumerate(values):
        whole.record_us(v)
        parts[i % 3].record_us(v)
    merged = LatencyHistogram()
    for p in parts:
        merged.merge(LatencyHistogram.decode(p.encode()))
    assert merged.summary() == whole.summary()


def test_out_of_range_values_are_clamped_and_counted() -> None:
    h = LatencyHistogram()
    h.record_us(-20)  # a clock step backwards
    h.record_us(0)
    h.record_us(10**13)  # beyond an hour
    assert h.count == 3 and h.clamped == 3
    assert h.summary()["clamped"] == 3
    assert LatencyHistogram.decode(h.encode()).clamped == 3


def test_empty_histogram() -> None:
    h = LatencyHistogram()
    zero = {"p50": 0.0, "p90": 0.0, "p99": 0.0, "p99_9": 0.0, "max": 0.0, "mean": 0.0}
    assert h.summary() == {"count": 0, **zero}
    assert h.cdf() == []
    assert LatencyHistogram.decode(h.encode()).count == 0


def test_cdf_is_monotonic_and_ends_at_the_max() -> None:
    h = LatencyHistogram()
    for us in range(1000, 200_000, 997):
        h.record_us(us)
    pts = h.cdf()
    assert pts[-1][1] == 100.0
    assert pts[-1][0] == approx(h.max_ms(), rel=1e-3)
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in itertools.pairwise(pts))
