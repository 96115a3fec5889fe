"""Rolling upgrades of a running `peernet serve`: `peernet upgrade` after new code is installed.

The serve process restarts what runs PeerNet's code one piece at a time, so that something is
always serving and nothing acknowledged is lost:

1. each shard actor in turn: killed and restarted by Ray (its class is imported afresh, so the
   new code runs), started again, and rebuilt from the inbox log and Redis before the next goes
   (deliveries of its users wait meanwhile, as after a crash: docs/reliability.md);
2. the gateway: redeployed with a new version, which Serve rolls one replica at a time; the
   sockets of a stopped replica close and their clients reconnect with `resume`.

`peernet upgrade` asks with SIGHUP and follows the `upgrade` record the serve process keeps in
its state file (serve/deployment.py's state_file), printing each step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from serve.ray_cluster import actor_pid, call, kill_for_restart

log = logging.getLogger("peernet.upgrade")

# How long one actor may take to come back with new code, and the whole upgrade.
ACTOR_RESTART_TIMEOUT_S = 120.0
UPGRADE_TIMEOUT_S = 900.0


@dataclass
class UpgradeRecord:
    """What the serve process says of the upgrade in progress or last done."""

    number: int
    requested_at: float
    step: str = "starting"
    done: bool = False
    ok: bool = False
    took_s: float | None = None
    error: str | None = None
    actors_restarted: list[str] = field(default_factory=list)
    gateway_version: str | None = None


async def _actor_pid(handle: Any, timeout_s: float) -> int:
    return await asyncio.wait_for(actor_pid(handle), timeout_s)


async def restart_actor(name: str, handle: Any, timeout_s: float = ACTOR_RESTART_TIMEOUT_S) -> float:
    """Kill `handle`'s process and wait until Ray has restarted it and its logic runs again;
    the seconds it took."""
    t0 = time.monotonic()
    before = await _actor_pid(handle, 30.0)
    kill_for_restart(handle)
    deadline = t0 + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            if await _actor_pid(handle, 5.0) != before:
                await asyncio.wait_for(call(handle, "ensure_started"), 60.0)
                return time.monotonic() - t0
        except Exception as exc:  # restarting: calls fail or wait until it is back
            last = f"{type(exc).__name__}: {exc}"[:200]
        await asyncio.sleep(0.25)
    raise TimeoutError(f"{name} was not back within {timeout_s:.0f} s ({last})")


def rolling_upgrade(handles: dict[str, Any], redeploy_gateway: Callable[[str], None],
                    record: UpgradeRecord, save: Callable[[UpgradeRecord], None]) -> UpgradeRecord:
    """Restart every actor in `handles` one at a time, then redeploy the gateway; `save` is
    called after each step. Returns `record`, done, with `ok` or `error`."""
    t0 = time.monotonic()
    try:
        for i, (name, handle) in enumerate(handles.items(), 1):
            record.step = f"actor {i}/{len(handles)}: restarting {name}"
            save(record)
            took = asyncio.run(restart_actor(name, handle))
            record.actors_restarted.append(name)
            log.info("upgrade %d: %s restarted in %.1f s", record.number, name, took)
        version = f"u{record.number}-{int(record.requested_at)}"
        record.step = f"gateway: rolling the replicas to version {version}"
        save(record)
        redeploy_gateway(version)
        record.gateway_version = version
        record.ok = True
        record.step = "done"
    except Exception as exc:
        record.error = f"{type(exc).__name__}: {exc}"[:500]
        record.step = f"failed at: {record.step}"
        log.error("upgrade %d failed: %s", record.number, record.error)
    record.done = True
    record.took_s = round(time.monotonic() - t0, 1)
    save(record)
    return record


def update_state(path: Path, fields: dict[str, Any], *, tmp_suffix: str = ".tmp") -> None:
    """Rewrite `fields` of the state file at `path` (written whole to `tmp_suffix`, then
    renamed); nothing when there is no readable state file. Writers in different threads use
    different suffixes."""
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    state.update(fields)
    tmp = path.with_suffix(tmp_suffix)
    tmp.write_text(json.dumps(state))
    tmp.replace(path)


def save_record(path: Path, record: UpgradeRecord) -> None:
    """Write `record` into the state file at `path`."""
    update_state(path, {"upgrade": asdict(record)})


def read_record(path: Path) -> dict[str, Any] | None:
    try:
        record: dict[str, Any] | None = json.loads(path.read_text()).get("upgrade")
    except (OSError, ValueError, AttributeError):
        return None
    return record


def request_upgrade(path: Path, pid: int, *, timeout_s: float = UPGRADE_TIMEOUT_S,
                    say: Callable[[str], None] = print) -> dict[str, Any]:
    """Ask the serve process `pid` (state file `path`) for a rolling upgrade and follow it to
    the end; its final record. Raises TimeoutError when it does not finish in `timeout_s`."""
    before = read_record(path)
    number = (before or {}).get("number", 0)
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout_s
    shown = ""
    while time.monotonic() < deadline:
        record = read_record(path)
        if record and record.get("number", 0) > number:
            if record["step"] != shown:
                shown = record["step"]
                say(f"peernet upgrade: {shown}")
            if record.get("done"):
                return record
        time.sleep(0.25)
    raise TimeoutError(f"the upgrade did not finish within {timeout_s:.0f} s (last step: {shown})")
