"""ConsumerLoop: the one loop by which every log consumer (SessionShard, FeedShard, Projector)
reads the event log: a batch fetched, handed whole to the consumer's handler, then committed.

One policy for all of them:
- a consumer group per topic read, named `{group}@{topic}` (deployments on other topics of one
  Kafka never share a group);
- a batch is what one poll returns (the broker's fetch wait grows it under load; an idle
  consumer's poll waits long), optionally gathered for `gather_ms` more (the projector, which
  writes behind delivery and pays per batch);
- the handler gets the whole batch; a handler that raises has the same batch handed again,
  with a backoff of 50 ms doubling to 2 s, never skipped (a skipped batch could lose or renumber
  items); every failure is counted and logged by the owner's `on_error`. An owner whose handler
  retries its own steps and must not run a half-done batch again (the session shard, which has
  numbered its items by then) says `retry_handler=False`: a failure that escapes its handler
  stops that topic's loop for good and is reported through `on_stopped`;
- offsets are committed only after the handler returned (at most once per
  `PEERNET_KAFKA_COMMIT_INTERVAL_MS`, by the EventLog), so a crash replays, never skips;
- with several topics, each has its own consumer and task, and handler calls never overlap:
  an owner that numbers items (the session shard) sees one batch at a time.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from bus.eventlog import ConsumerLag, EventLog, LogConsumer, Record, consumer_lag
from peernet.errors import PeerNetError

log = logging.getLogger("peernet.consumer")

T = TypeVar("T")

Handler = Callable[[Sequence[Record]], Awaitable[object]]
OnError = Callable[[str, BaseException, bool], None]  # what, exception, whether to log a trace

# How long an idle poll waits before the loop checks whether it is stopping; a record that
# arrives meanwhile ends the wait at once.
IDLE_POLL_MS = 1000
RETRY_FIRST_S = 0.05
RETRY_CAP_S = 2.0


def group_name(group: str, topic: str) -> str:
    return f"{group}@{topic}"


async def until_ok(what: str, action: Callable[[], Awaitable[T]], *, on_error: OnError,
                   stopping: Callable[[], bool]) -> T:
    """Run `action` until it succeeds, counting and logging each failure through `on_error`
    (a PeerNetError is a backend away; anything else is a bug, logged with its trace: either
    way the step is retried, never skipped), 50 ms apart doubling to 2 s; raises only once
    `stopping()` says so. The one retry policy of the log consumers."""
    delay = RETRY_FIRST_S
    while True:
        try:
            return await action()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if stopping():
                raise
            on_error(what, exc, not isinstance(exc, PeerNetError))
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_CAP_S)


class ConsumerLoop:
    def __init__(self, log_: EventLog, topics: Sequence[str], group: str, handle: Handler, *,
                 name: str, on_error: OnError, max_records: int = 500, linger_ms: int = 0,
                 gather_ms: int = 0, retry_handler: bool = True, step: str = "handle batch",
                 on_stopped: Callable[[BaseException], None] | None = None) -> None:
        if not topics:
            raise ValueError("a consumer loop reads at least one topic")
        self._log = log_
        self._topics = list(dict.fromkeys(topics))
        self._group = group
        self._handle = handle
        self._name = name
        self._on_error = on_error
        self._max = max_records
        self._linger_ms = linger_ms
        self._gather_ms = gather_ms
        self._consumers: dict[str, LogConsumer] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._turn = asyncio.Lock()
        self._stopping = False
        self._held: dict[str, int] = {}  # records fetched and not yet handled, per topic
        self._handling: str | None = None  # the topic whose batch the handler holds
        self._on_stopped = on_stopped
        self._retry_handler = retry_handler
        self._step = step  # what a handler failure is called in the owner's errors
        self.failed: BaseException | None = None  # what stopped a task for good, if anything

    @property
    def topics(self) -> list[str]:
        return list(self._topics)

    def consumer(self, topic: str) -> LogConsumer:
        """The consumer of `topic` (once started)."""
        return self._consumers[topic]

    def groups(self) -> list[str]:
        return [group_name(self._group, t) for t in self._topics]

    async def start(self) -> None:
        """Join each topic's group (retried until the log answers), then start consuming."""
        for topic in self._topics:
            consumer = self._log.consumer(topic, group=group_name(self._group, topic),
                                          linger_ms=self._linger_ms)
            await self.retry(f"start consumer of {topic}", consumer.start)
            self._consumers[topic] = consumer
        for topic, consumer in self._consumers.items():
            task = asyncio.create_task(self._run(topic, consumer), name=f"{self._name}:{topic}")
            task.add_done_callback(self._ended)
            self._tasks.append(task)

    async def stop(self) -> None:
        """Stop consuming and leave the groups; raises what stopped a loop for good, if anything
        did (the owner has reported it already)."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        for consumer in self._consumers.values():
            await consumer.stop()
        if self.failed is not None:
            raise self.failed

    def queue_depth(self) -> int:
        """Records fetched and not yet handled: every record of a batch counts from its poll
        until the handler has returned (a batch is handled, and retried, as one)."""
        return sum(self._held.values())

    def waiting(self) -> int:
        """Records fetched and not yet handed to the handler (a batch waiting for another
        topic's batch to be handled, or still gathering)."""
        return sum(n for t, n in self._held.items() if t != self._handling)

    async def lag(self) -> list[ConsumerLag]:
        """Each topic's lag behind its end, for this member's partitions."""
        return [await consumer_lag(c, group=group_name(self._group, t), topic=t)
                for t, c in self._consumers.items()]

    async def _run(self, topic: str, consumer: LogConsumer) -> None:
        while not self._stopping:
            try:
                records = await consumer.poll(max_records=self._max, timeout_ms=IDLE_POLL_MS)
            except Exception as exc:
                self._on_error(f"poll {topic}", exc, not isinstance(exc, PeerNetError))
                await asyncio.sleep(0.5)
                continue
            if not records:
                continue
            self._held[topic] = len(records)
            try:
                if self._gather_ms:
                    records = await self._gather(topic, consumer, records)
                async with self._turn:
                    self._handling = topic
                    try:
                        if self._retry_handler:
                            await self.retry(self._step, functools.partial(self._handle, records))
                        else:
                            await self._handle(records)
                    finally:
                        self._handling = None
            finally:
                self._held[topic] = 0
            await self.retry(f"commit {topic}", consumer.commit)

    async def _gather(self, topic: str, consumer: LogConsumer, records: list[Record]) -> list[Record]:
        """More records for up to `gather_ms` after the first (the in-memory log, which has no
        broker-side linger, needs it as well)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._gather_ms / 1000
        while len(records) < self._max:
            left_ms = int((deadline - loop.time()) * 1000)
            if left_ms <= 0:
                break
            try:
                records.extend(await consumer.poll(max_records=self._max - len(records),
                                                   timeout_ms=left_ms))
                self._held[topic] = len(records)
            except Exception as exc:  # handle what we have; the next poll retries
                self._on_error(f"poll {topic}", exc, not isinstance(exc, PeerNetError))
                break
        return records

    async def retry(self, what: str, action: Callable[[], Awaitable[object]]) -> None:
        """`until_ok` with this loop's error report, stopping when the loop stops."""
        await until_ok(what, action, on_error=self._on_error, stopping=lambda: self._stopping)

    def _ended(self, task: asyncio.Task[None]) -> None:
        # Every step catches its failures; one that still escapes has stopped this topic's
        # delivery for good, which the owner reports (its `started` goes false).
        exc = None if task.cancelled() else task.exception()
        if exc is None:
            return
        self.failed = exc
        log.error("%s: the consumer loop stopped", task.get_name(), exc_info=exc)
        if self._on_stopped is not None:
            self._on_stopped(exc)
