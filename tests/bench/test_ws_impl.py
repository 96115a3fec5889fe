"""bench/ws_impl.py: each WebSocket implementation serves the echo app in its own process and
answers every message, and the run reports each one's CPU per message."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from ports import free_ports

ROOT = Path(__file__).resolve().parents[2]


def test_every_implementation_answers_and_is_reported() -> None:
    out = subprocess.run(
        # Enough messages that each server's CPU is above /proc's 10 ms resolution: with 400,
        # the cheapest took under one tick and read 0 (CI, 2026-12-07).
        [sys.executable, "-m", "bench.ws_impl", "--messages", "6000", "--clients", "4",
         "--rounds", "1", "--port", str(free_ports(1)[0])],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=True).stdout
    medians = dict(re.findall(r"^  (\S+)\s+([\d.]+) us", out, re.MULTILINE))
    assert set(medians) == {"lean", "websockets-sansio", "websockets", "wsproto"}, out
    assert all(float(v) > 0 for v in medians.values()), out
