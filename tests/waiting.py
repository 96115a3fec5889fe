"""Waiting on a condition instead of sleeping (importable from every suite): a sleep long
enough for a loaded machine makes every run slow, and one short enough for a quiet one fails
on a loaded machine, or passes before the thing it waits for has happened."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any


async def eventually(check: Callable[[], Any], within_s: float = 5.0,
                     interval: float = 0.01) -> None:
    """Wait until `check()` (or what it returns, when that is awaitable) is truthy; fail with
    the last value after `within_s`."""
    deadline = time.monotonic() + within_s
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within_s}s (last value {value!r})")
        await asyncio.sleep(interval)


def wait_until(check: Callable[[], Any], within_s: float = 5.0, interval: float = 0.01) -> None:
    """`eventually` for a test that is not a coroutine (its app runs in another thread)."""
    deadline = time.monotonic() + within_s
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within_s}s (last value {value!r})")
        time.sleep(interval)
