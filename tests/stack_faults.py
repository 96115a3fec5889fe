"""Whether a fault test may stop a service of the local stack (importable from every suite).

`stack.manager.pid_of` is None both for a service the user runs (external: not ours to stop)
and for one of ours that is not running (it crashed, or an earlier test left it down). Only the
first is a reason to skip: a fault test that skipped on a dead broker would report a pass."""

from __future__ import annotations

from typing import Any

import pytest

from peernet.config import PeerNetConfig


def require_ours_running(manager: Any, cfg: PeerNetConfig, name: str) -> None:
    """Skip when `name` is external; fail when it is the stack's own and not running."""
    if manager.SERVICES[name].is_external(cfg):
        # tests/conftest.py turns this skip into a failure in CI, which runs every service itself.
        pytest.skip(f"{name} is external ({manager.SERVICES[name].address(cfg)}): "
                    "not ours to stop")
    if manager.pid_of(cfg, name) is None:
        pytest.fail(f"{name} is the local stack's own ({cfg.stack.home}) but not running: "
                    f"crashed, or left down by an earlier test (see logs/{name}.log there)")
