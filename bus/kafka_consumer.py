"""LogConsumer on Apache Kafka through aiokafka: a consumer in a group (manual commits, held back
to the commit interval, renewed when its coordinator is stuck) or on assigned partitions, made by
KafkaEventLog.consumer (bus/kafka.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from bus.eventlog import Record
from bus.kafka import _WIRE_ERRORS, PLAINTEXT, _bounded, _unavailable
from bus.lifecycle import Lifecycle
from peernet.errors import PeerNetError

log = logging.getLogger(__name__)


class _TrackAssignment(ConsumerRebalanceListener):
    def __init__(self, owner: KafkaLogConsumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: Any) -> None:
        # Offsets held back by the commit interval go now, while the partitions are still ours
        # (best effort: another member re-reads from the last commit, and processing is
        # idempotent). After this they may not be committed by us any more.
        gone = {tp.partition for tp in revoked}
        with contextlib.suppress(Exception):
            await self._owner._commit_held(gone)
        for p in gone:
            self._owner._uncommitted.pop(p, None)
            self._owner._held.pop(p, None)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        return None


# A group consumer whose commits failed this many times in a row is replaced by a new one.
RENEW_AFTER_COMMIT_FAILURES = 3
# How long one offset commit may take (at most the consumer's own timeout). A commit is a few
# milliseconds when the coordinator answers; bounding it at 3 s, not the 10 s of other calls,
# brings a stuck coordinator's renewal to about 9 s after the broker is back instead of 30 s
# (chaos `kafka` in CI: deliveries still late at the end of its 40 s phase).
COMMIT_TIMEOUT_S = 3.0


# How long the broker holds a fetch that finds nothing new, by kind of reader. A fetch returns as
# soon as a record arrives (fetch_min_bytes 1), so in a group this only sets how often an idle
# consumer asks: 500 ms (Kafka's default) instead of 100 took an idle server's Kafka from 10%
# to 5% of a core and each shard's consumer loop from about 4% to 2.5% (docs/benchmarks.md).
# aiokafka sends a node no new fetch while one is in flight, so a reader of fixed partitions,
# which seeks (a catch-up, a replay), keeps the short wait: a seek waits out the fetch in flight.
GROUP_FETCH_WAIT_MS = 500
SEEKING_FETCH_WAIT_MS = 100
# With a linger the broker answers when this much has gathered or the linger has passed.
LINGER_FETCH_MIN_BYTES = 1 << 20


def fetch_wait(*, group: str | None, linger_ms: int) -> dict[str, int]:
    """aiokafka's fetch settings for a consumer in `group` (None: fixed partitions) with
    EventLog.consumer's `linger_ms`."""
    if linger_ms > 0:
        return {"fetch_max_wait_ms": linger_ms, "fetch_min_bytes": LINGER_FETCH_MIN_BYTES}
    return {"fetch_max_wait_ms": GROUP_FETCH_WAIT_MS if group is not None else SEEKING_FETCH_WAIT_MS,
            "fetch_min_bytes": 1}


class KafkaLogConsumer(Lifecycle):
    """LogConsumer on an AIOKafkaConsumer (auto-commit off: offsets advance only by `commit`).

    Renewal: after a broker restart aiokafka's group coordinator can stay stuck: every commit
    times out for minutes while polls still answer (seen in CI: a session shard retried its
    commit for four minutes and delivered nothing). After RENEW_AFTER_COMMIT_FAILURES failed
    commits in a row the consumer is closed and a new one joins the group in its place; it
    reads again from the group's committed offsets, so the records since the last commit come
    again (every PeerNet consumer absorbs a redelivery) and nothing is skipped. Until the new one
    has started, `poll` and `commit` try to start it and raise `unavailable` while they cannot.
    """

    def __init__(self, bootstrap: str, topic: str, *, group: str | None,
                 partitions: Sequence[int] | None, from_beginning: bool,
                 request_timeout_ms: int, timeout_s: float, client_id: str,
                 commit_interval_ms: int = 0, linger_ms: int = 0,
                 client_options: dict[str, Any] | None = None) -> None:
        """`client_options`: KafkaSecurity.client_options(), as the event log's own clients.
        `linger_ms`: EventLog.consumer's; see `fetch_wait`."""
        if group is None and partitions is None:
            raise ValueError("a consumer needs a group or explicit partitions")
        if group is not None and partitions is not None:
            raise ValueError("a consumer reads either in a group or assigned partitions")
        self._topic = topic
        self._group = group
        self._partitions = list(partitions) if partitions is not None else None
        self._timeout_s = timeout_s
        options: dict[str, Any] = dict(
            bootstrap_servers=bootstrap,
            **(client_options or PLAINTEXT.client_options()),
            client_id=f"{client_id}-consumer",
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest" if from_beginning else "latest",
            request_timeout_ms=request_timeout_ms,
            **fetch_wait(group=group, linger_ms=linger_ms),
            session_timeout_ms=10_000,
            heartbeat_interval_ms=1_000,
            isolation_level="read_uncommitted",
        )
        self._options = options
        self._consumer = self._new_consumer()
        self._commit_failures = 0  # in a row
        self._renewing = False  # the consumer was replaced and the new one has not started
        self.renewals = 0
        # partition -> offset after the last record poll returned, not yet committed
        self._uncommitted: dict[int, int] = {}
        self._started = False
        # partition -> offset a `commit` asked for and the commit interval held back
        self._held: dict[int, int] = {}
        self._commit_interval_s = commit_interval_ms / 1000
        self._last_commit = -float("inf")

    def _new_consumer(self) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(**self._options)

    async def start(self) -> None:
        """Join the group (or take the assigned partitions) and fix the start positions, so that
        a record appended after `start` returns is read even when not `from_beginning`."""
        c = self._consumer
        if self._partitions is None:
            c.subscribe([self._topic], listener=_TrackAssignment(self))
        else:
            c.assign([TopicPartition(self._topic, p) for p in self._partitions])
        try:
            async with asyncio.timeout(self._timeout_s):
                await c.start()
                for tp in c.assignment():
                    await c.position(tp)
        except _WIRE_ERRORS as exc:
            await _stop_consumer(c)
            raise _unavailable(f"start consumer of {self._topic}", exc) from exc
        self._started = True

    async def stop(self) -> None:
        """Commit what the commit interval held back and leave the group (if the broker
        answers), and close, in bounded time."""
        if self._started and self._group is not None and self._held:
            with contextlib.suppress(Exception):
                await self._commit_held()
        self._started = False
        await _stop_consumer(self._consumer)

    async def _renew(self) -> None:
        """Close the consumer and put a new one in its place (see the class)."""
        self.renewals += 1
        log.warning("kafka consumer of %s (group %s): %d commits failed in a row; replacing it "
                    "with a new one, which reads again from the group's committed offsets",
                    self._topic, self._group, self._commit_failures)
        old, self._consumer = self._consumer, self._new_consumer()
        self._started = False
        self._renewing = True
        self._uncommitted.clear()
        self._held.clear()
        self._commit_failures = 0
        await _stop_consumer(old)
        await self._start_renewed()

    async def _start_renewed(self) -> None:
        try:
            await self.start()
        except PeerNetError:
            # start() closed the failed one: the next call tries a fresh consumer.
            self._consumer = self._new_consumer()
            raise
        self._renewing = False
        log.info("kafka consumer of %s (group %s) renewed", self._topic, self._group)

    async def poll(self, *, max_records: int = 500, timeout_ms: int = 200) -> list[Record]:
        if self._renewing:
            await self._start_renewed()
        try:
            batches = await asyncio.wait_for(
                self._consumer.getmany(timeout_ms=timeout_ms, max_records=max_records),
                timeout_ms / 1000 + self._timeout_s)
        except _WIRE_ERRORS as exc:
            raise _unavailable(f"poll {self._topic}", exc) from exc
        out: list[Record] = []
        for tp in sorted(batches, key=lambda t: t.partition):
            msgs = batches[tp]
            if not msgs:
                continue
            out.extend(
                Record(m.topic, m.partition, m.offset, m.key,
                       # a compaction tombstone has no value; PeerNet never writes one
                       m.value if m.value is not None else b"",
                       tuple((k, bytes(v)) for k, v in (m.headers or ())),
                       m.timestamp)
                for m in msgs)
            self._uncommitted[tp.partition] = msgs[-1].offset + 1
        return out

    async def commit(self) -> None:
        if self._group is None:
            raise RuntimeError("commit needs a consumer group")
        if not self._uncommitted:
            return
        if time.monotonic() - self._last_commit < self._commit_interval_s:
            # Held back: a later commit, `stop` or a revocation commits these offsets (and only
            # these: what `poll` returns after this call is not the caller's to commit yet).
            self._held.update(self._uncommitted)
            return
        await self._commit(dict(self._uncommitted))

    async def _commit_held(self, only: set[int] | None = None) -> None:
        held = {p: o for p, o in self._held.items() if only is None or p in only}
        if held:
            await self._commit(held)

    async def _commit(self, wanted: dict[int, int]) -> None:
        if self._renewing:
            await self._start_renewed()
            return  # the renewed consumer has nothing of its own to commit yet
        assigned = {tp.partition for tp in self._consumer.assignment()}
        offsets = {TopicPartition(self._topic, p): o for p, o in wanted.items() if p in assigned}
        if offsets:
            try:
                await _bounded(self._consumer.commit(offsets),
                               min(self._timeout_s, COMMIT_TIMEOUT_S), "commit")
            except PeerNetError:
                self._commit_failures += 1
                if self._commit_failures >= RENEW_AFTER_COMMIT_FAILURES:
                    with contextlib.suppress(PeerNetError):
                        await self._renew()
                raise
            self._commit_failures = 0
            self._last_commit = time.monotonic()
        for tp, o in offsets.items():
            if self._uncommitted.get(tp.partition) == o:
                del self._uncommitted[tp.partition]
            if self._held.get(tp.partition, o + 1) <= o:
                del self._held[tp.partition]

    async def seek(self, partition: int, offset: int) -> None:
        self._consumer.seek(TopicPartition(self._topic, partition), offset)
        self._uncommitted.pop(partition, None)
        self._held.pop(partition, None)

    async def end_offsets(self) -> dict[int, int]:
        tps = list(self._consumer.assignment())
        if not tps:
            return {}
        ends = await _bounded(self._consumer.end_offsets(tps), self._timeout_s, "end offsets")
        return {tp.partition: o for tp, o in ends.items()}

    async def positions(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for tp in self._consumer.assignment():
            out[tp.partition] = await _bounded(self._consumer.position(tp), self._timeout_s,
                                               "position")
        return out

    def assignment(self) -> list[int]:
        """The partitions this consumer reads now (a group member's share changes on
        rebalance)."""
        return sorted(tp.partition for tp in self._consumer.assignment())


async def _stop_consumer(consumer: AIOKafkaConsumer, timeout_s: float = 10.0) -> None:
    stopping = asyncio.ensure_future(consumer.stop())
    done, _ = await asyncio.wait({stopping}, timeout=timeout_s)
    if not done:
        stopping.cancel()
        log.warning("kafka consumer did not stop within %.0fs", timeout_s)
    elif stopping.cancelled():
        # aiokafka 0.14's Fetcher.close() cancels its fetch tasks and awaits them; one cancelled
        # in its retry sleep (broker down) re-raises CancelledError, and stop() ends half-way.
        # Finish it here: the remaining fetch tasks, then the connections.
        fetcher = getattr(consumer, "_fetcher", None)
        pending = [t for t in getattr(fetcher, "_pending_tasks", ()) if not t.done()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        client = getattr(consumer, "_client", None)
        if client is not None:
            await client.close()
    elif stopping.exception() is not None:
        log.warning("stopping the kafka consumer failed: %r", stopping.exception())
