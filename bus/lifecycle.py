"""The start and stop every backend has, `async with` on them, and the stopping of a backend's
own task, written once for all."""

from __future__ import annotations

import asyncio
from typing import Any, Self


class Lifecycle:
    """Mixed into a backend: `async with backend:` starts it and stops it on the way out. A backend
    with nothing to open or close (most in-memory ones) keeps the no-op `start` and `stop`."""

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def cancelled(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` (a backend's reader, say) and return once it has ended."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
