"""Stable-hash routing of keys (user ids, conversation ids) to shards and partitions.

crc32, never `hash()`: Python salts `hash()` per process, and every process must agree.
"""

from __future__ import annotations

import zlib


def stable_hash(key: str) -> int:
    return zlib.crc32(key.encode("utf-8"))


def shard_for(key: str, shards: int) -> int:
    """The shard (0..shards-1) that owns `key`; the same in every process and every run."""
    if shards <= 0:
        raise ValueError("shards must be positive")
    return stable_hash(key) % shards


def session_group(index: int, count: int) -> str:
    """The group of session shard `index` of `count` and of the users it owns: its inbox
    checkpoints are named after it, and its users' inbox keys share one Redis hash slot under it
    (bus/inbox_redis.py)."""
    return f"session-{index}-of-{count}"
