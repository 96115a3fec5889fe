"""AckBuffer: this replica's inbox acks, written together.

An `ack` frame has no reply and only moves the user's read mark forward (cumulative, never
back), so of the acks that arrive within an interval only each user's highest needs writing.
One Redis script per ack frame was about 13% of a replica's busy samples at 50 DMs/s (py-spy);
the harness's and the web client's acks are already one per tick, so that benchmark shows no
gain (docs/benchmarks.md), but a client acking every item no longer costs a write per frame.

What it guarantees: an ack is written within `flush_ms` while the inbox cache answers; while it
does not, the newest per user are kept (at most one entry per user acking on this replica) and
written once it answers again; `stop` writes what is left. A replica that dies loses at most
its last interval's acks: the next ack of those users, cumulative, repairs the mark.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from bus.inbox import InboxCache
from serve import metrics

log = logging.getLogger("peernet.acks")


class AckBuffer:
    def __init__(self, inbox: InboxCache, flush_ms: int) -> None:
        """`flush_ms` 0: every ack is written at once, in `add`."""
        self._inbox = inbox
        self._interval_s = flush_ms / 1000
        self._pending: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None
        self.failures = 0  # writes that failed (their acks were kept)

    async def add(self, user: str, seq: int) -> None:
        if self._keep(user, seq) and not self._interval_s:
            await self.flush()

    def _keep(self, user: str, seq: int) -> bool:
        """Hold `seq` as `user`'s pending mark unless one as high is held already."""
        if seq <= self._pending.get(user, 0):
            return False
        self._pending[user] = seq
        return True

    def pending(self) -> dict[str, int]:
        """What is waiting to be written, user -> seq (a copy)."""
        return dict(self._pending)

    async def flush(self) -> None:
        """Write what is pending; on failure keep it (merged with newer acks) for the next."""
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        try:
            await self._inbox.ack_many(batch)
        except Exception:
            self.failures += 1
            for user, seq in batch.items():
                self._keep(user, seq)
            raise

    async def start(self) -> None:
        if self._interval_s and self._task is None:
            self._task = asyncio.create_task(self._run(), name="ack-buffer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await self.flush()
        except Exception as exc:
            log.warning("acks of %d users not written at stop: %s", len(self._pending), exc)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.flush()
            except Exception as exc:
                metrics.BACKGROUND_ERRORS.labels("acks").inc()
                log.warning("acks of %d users not written (kept for the next try): %s",
                            len(self._pending), exc)
