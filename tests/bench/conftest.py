"""Fixtures of the harness's tests. `bench_target` is what the smoke tests drive: the real
PeerNet from the `peernet_url` fixture (provided by tests/conftest.py), or, with
PEERNET_BENCH_SMOKE_TARGET=socketio, the Socket.IO baseline the harness starts itself."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import bench.runner

# The fake server module sits beside the tests; make it importable however pytest is invoked.
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def quick_phases(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shorten the pauses that matter on a real deployment and not against the fake server."""
    monkeypatch.setattr(bench.runner, "SETTLE_S", 0.0)
    monkeypatch.setattr(bench.runner, "PHASE_LEAD_S", 0.3)


@pytest.fixture
def bench_target(request: pytest.FixtureRequest) -> tuple[str, str | None]:
    """("peernet", url) or ("socketio", None)."""
    if os.environ.get("PEERNET_BENCH_SMOKE_TARGET", "peernet") == "socketio":
        return "socketio", None
    try:
        url = request.getfixturevalue("peernet_url")
    except pytest.FixtureLookupError:
        pytest.skip("no `peernet_url` fixture: the PeerNet smoke run needs tests/conftest.py to provide one")
    return "peernet", str(url)
