"""TurnBatch: the calls that the gateway's connections make in one turn of the event loop, sent
to a backend as one batched call at the end of that turn.

Under load many sockets are read in the same turn (one epoll wake-up hands the loop every ready
socket), so their requests' Redis commands can share one round trip with no added wait: the
batch goes as soon as the turn that filled it ends. At low load a batch holds one call and costs
what the single call did.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from serve import metrics

log = logging.getLogger("peernet.batching")

T = TypeVar("T")
R = TypeVar("R")


class TurnBatch(Generic[T, R]):
    """`submit(item)` resolves to `run`'s answer for that item. `run` gets the items of one turn
    (at most `max_size`; a fuller turn is split), in submission order, and returns one answer per
    item in the same order; when it raises, every caller of the batch gets the exception. A
    caller that was cancelled meanwhile is simply not answered: its item still ran."""

    def __init__(self, name: str, run: Callable[[list[T]], Awaitable[Sequence[R]]], *,
                 max_size: int = 256) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self._name = name
        self._run = run
        self._max = max_size
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._scheduled = False
        self._running: set[asyncio.Task[None]] = set()

    def submit(self, item: T) -> asyncio.Future[R]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future()
        self._pending.append((item, fut))
        if len(self._pending) >= self._max:
            self._flush()
        elif not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        metrics.BATCH_SIZE.labels(self._name).observe(len(batch))
        task = asyncio.create_task(self._send(batch), name=f"batch-{self._name}")
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _send(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            answers = await self._run([item for item, _ in batch])
            if len(answers) != len(batch):
                raise RuntimeError(f"{self._name}: {len(answers)} answers for {len(batch)} items")
        except asyncio.CancelledError:
            for _, fut in batch:
                fut.cancel()
            raise
        except Exception as exc:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for (_, fut), answer in zip(batch, answers, strict=True):
            if not fut.done():
                fut.set_result(answer)
