"""`peernet_gc_pause_seconds` (serve/metrics.py): each collection of the process is timed."""

from __future__ import annotations

import gc

from serve import metrics


def collections(generation: int) -> float:
    value = metrics.REGISTRY.get_sample_value("peernet_gc_pause_seconds_count",
                                              {"generation": str(generation)})
    return value or 0.0


def test_each_collection_is_observed_by_generation() -> None:
    metrics.watch_gc()
    metrics.watch_gc()  # once per process, however often the app starts
    assert gc.callbacks.count(metrics._on_gc) == 1
    before = collections(2)
    gc.collect()
    gc.collect()
    assert collections(2) == before + 2
