"""Identifiers: time-ordered, unique, URL-safe ids for events, messages and posts."""

from __future__ import annotations

import os
import time


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def new_id() -> str:
    """A 26-character id that sorts by creation time (48-bit ms clock + 80 random bits), like ULID."""
    value = (now_ms() << 80) | int.from_bytes(os.urandom(10), "big")
    alphabet = "0123456789abcdefghjkmnpqrstvwxyz"
    out = []
    for _ in range(26):
        value, rem = divmod(value, 32)
        out.append(alphabet[rem])
    return "".join(reversed(out))
