"""Helpers of the unit suite (importable from test modules, unlike conftest): names, items,
configuration and waiting."""

from __future__ import annotations

import uuid
from typing import Any

from waiting import eventually as eventually  # re-exported: the unit suite's waits

from bus.inbox import Item
from peernet.config import PeerNetConfig, load_config
from peernet.ids import new_id, now_ms
from peernet.routing import shard_for

# Small limits so that floods and overflows happen within a few frames. The timeouts leave room
# for a loaded machine; FAST_TIMING is for the tests of the timeouts themselves.
FAST_GATEWAY: dict[str, str] = {
    "PEERNET_HELLO_TIMEOUT_S": "3",
    "PEERNET_HEARTBEAT_MS": "3000",
    "PEERNET_OUTBOUND_QUEUE": "8",
    "PEERNET_RATE_PER_S": "20",
    "PEERNET_RATE_BURST": "20",
    "PEERNET_FLOOD_CLOSE_AFTER": "10",
    "PEERNET_MAX_FRAME_BYTES": "8192",
    "PEERNET_TOKEN_SECRET": "unit-test-secret-of-at-least-32-bytes",
    "PEERNET_DEV_TOKENS": "1",
    "PEERNET_EVENTS_PARTITIONS": "4",
    "PEERNET_INBOX_PARTITIONS": "4",
}


FAST_TIMING: dict[str, str] = {
    "PEERNET_HELLO_TIMEOUT_S": "0.5",
    "PEERNET_HEARTBEAT_MS": "300",
}


def unit_cfg(env: dict[str, str] | None = None) -> PeerNetConfig:
    return load_config({**FAST_GATEWAY, **(env or {})})


def unique_user(prefix: str = "u") -> str:
    """A user id (^[a-z0-9_]{1,32}$) no other test uses."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def users_of_shard(index: int, count: int, n: int, prefix: str = "u") -> list[str]:
    """`n` user ids that shard `index` of `count` owns."""
    out: list[str] = []
    i = 0
    while len(out) < n:
        name = f"{prefix}{i}"
        if shard_for(name, count) == index:
            out.append(name)
        i += 1
    return out


def inbox_item(seq: int, *, ts: int | None = None, body: str | None = None, **extra: Any) -> Item:
    """An inbox `msg` item as a session shard stores it."""
    return {"t": "msg", "seq": seq, "id": extra.pop("id", new_id()), "conv": "dm:a:b", "from": "a",
            "to": "b", "body": body if body is not None else f"m{seq}",
            "ts": now_ms() if ts is None else ts, **extra}
