"""`peernet_frames_in_total` and `peernet_frames_out_total` (serve/metrics.py's Tally): counted
per frame type on the frame path and exposed like Prometheus counters when scraped."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from serve import metrics


def sample(name: str, frame_type: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, {"type": frame_type}) or 0.0


def test_frames_are_counted_by_type_and_scraped_as_counters() -> None:
    before_dm = sample("peernet_frames_in_total", "dm")
    before_msg = sample("peernet_frames_out_total", "msg")
    metrics.frame_in("dm")
    metrics.frame_in("dm")
    metrics.frame_out("msg")
    assert sample("peernet_frames_in_total", "dm") == before_dm + 2
    assert sample("peernet_frames_out_total", "msg") == before_msg + 1
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    assert families["peernet_frames_in"].type == "counter"
    assert families["peernet_frames_in"].documentation == "Frames received, by type"
    assert {s.labels["type"] for s in families["peernet_frames_out"].samples} >= {"msg"}


def test_a_tally_counts_only_what_it_is_given() -> None:
    registry = CollectorRegistry()
    tally = metrics.Tally("t_total", "a tally", "kind", registry)
    assert registry.get_sample_value("t_total", {"kind": "a"}) is None
    for kind in ("a", "b", "a"):
        tally.inc(kind)
    assert registry.get_sample_value("t_total", {"kind": "a"}) == 2
    assert registry.get_sample_value("t_total", {"kind": "b"}) == 1
