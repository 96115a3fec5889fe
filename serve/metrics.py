"""The gateway's Prometheus metrics (one registry per process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)

CONNECTIONS = Gauge("peernet_connections", "Open WebSocket connections", registry=REGISTRY)
FRAMES_IN = Counter("peernet_frames_in_total", "Frames received, by type", ["type"],
                    registry=REGISTRY)
FRAMES_OUT = Counter("peernet_frames_out_total", "Frames sent, by type", ["type"],
                     registry=REGISTRY)
ERRORS = Counter("peernet_errors_total", "Error frames sent, by code", ["code"], registry=REGISTRY)
CLOSES = Counter("peernet_closes_total", "Connections closed by the server, by close code",
                 ["code"], registry=REGISTRY)
DELIVERY_LATENCY = Histogram(
    "peernet_delivery_latency_seconds",
    "From an inbox item's event time to its push on a socket",
    buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
    registry=REGISTRY)
APPEND_LATENCY = Histogram(
    "peernet_log_append_seconds", "Durable appends to the event log (acks=all)",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 5), registry=REGISTRY)
PRESENCE_PUSH_LATENCY = Histogram(
    "peernet_presence_push_latency_seconds",
    "From a presence change at its shard to its arrival at a watching replica",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 5), registry=REGISTRY)
PRESENCE_ERRORS = Counter("peernet_presence_errors_total",
                          "Presence reports and lease renewals that failed, and lapsed leases",
                          ["kind"], registry=REGISTRY)


def render() -> bytes:
    return generate_latest(REGISTRY)
