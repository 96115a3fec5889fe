"""Projections: the store of record (MongoDB) written from the event log by a consumer group.

Writes are upserts keyed by event id, so a replayed record changes nothing; offsets are committed
only after the write. When MongoDB is slow or down, the projector waits and retries while
delivery, which does not depend on it, goes on; it catches up from the log afterwards.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from bus.eventlog import EventLog, LogConsumer, Record
from bus.store import Document, DocumentStore
from peernet.config import PeerNetConfig
from peernet.envelope import EnvelopeError, Event
from peernet.errors import PeerNetError

log = logging.getLogger("peernet.projector")

PROJECTIONS_GROUP = "peernet.projections"


@dataclass
class ProjectorStats:
    records: int = 0
    written: int = 0
    errors: int = 0
    last_error: str = ""
    started: bool = False


class Projector:
    """Reads the events topic and keeps the MongoDB collections of the store of record."""

    def __init__(self, cfg: PeerNetConfig, log_: EventLog, store: DocumentStore) -> None:
        self._cfg = cfg
        self._log = log_
        self._store = store
        self._consumer: LogConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.stats = ProjectorStats()

    async def start(self) -> None:
        await self._until_ok("indexes", self.ensure_indexes)
        self._consumer = self._log.consumer(self._cfg.topics.events, group=PROJECTIONS_GROUP)
        await self._consumer.start()
        self._task = asyncio.create_task(self._run(), name="projector")
        self.stats.started = True

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._consumer is not None:
            await self._consumer.stop()

    async def ensure_indexes(self) -> None:
        await self._store.ensure_index("messages", [("conv", 1), ("pos", -1)])

    async def _run(self) -> None:
        assert self._consumer is not None
        while not self._stopping:
            try:
                records = await self._consumer.poll(max_records=500, timeout_ms=500)
            except PeerNetError as exc:
                self._count_error("poll", exc)
                await asyncio.sleep(0.5)
                continue
            if not records:
                continue
            await self._until_ok("write", functools.partial(self.apply, records))
            await self._until_ok("commit", self._consumer.commit)

    async def apply(self, records: Sequence[Record]) -> None:
        messages: list[Document] = []
        for record in records:
            self.stats.records += 1
            try:
                event = Event.decode(record.value)
            except EnvelopeError as exc:
                self._count_error("decode", exc)
                continue
            if event.type == "dm":
                d = event.data
                # `pos`, the record's offset in the conversation's partition, is the one order
                # every participant saw; history pages by it.
                messages.append({"_id": event.id, "conv": d["conv"], "from": event.actor,
                                 "to": d["to"], "body": d["body"], "ts": event.ts,
                                 "pos": record.offset})
        if messages:
            await self._store.upsert_many("messages", messages)
            self.stats.written += len(messages)

    async def _until_ok(self, what: str, action: Callable[[], Awaitable[object]]) -> None:
        delay = 0.1
        while True:
            try:
                await action()
                return
            except PeerNetError as exc:
                if self._stopping:
                    raise
                self._count_error(what, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _count_error(self, what: str, exc: BaseException) -> None:
        self.stats.errors += 1
        self.stats.last_error = f"{what}: {exc}"
        log.warning("projector: %s failed: %s", what, exc)
