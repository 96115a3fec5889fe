"""The load benchmark harness: open-loop WebSocket clients that speak PeerNet's public protocol
(or Socket.IO, for the baseline peer), exact delivery accounting and HDR latency histograms.

Run it with `python -m bench --help` or `peernet bench --help`.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
