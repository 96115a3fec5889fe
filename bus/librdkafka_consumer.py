"""LogConsumer on Apache Kafka through librdkafka (confluent-kafka): in a group (manual commits
with bus/kafka_consumer.py's policy, GroupCommits) or on assigned partitions, made by
RdKafkaEventLog.consumer (bus/librdkafka.py)."""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from confluent_kafka import (
    OFFSET_STORED,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from bus.eventlog import Record
from bus.kafka_consumer import COMMIT_TIMEOUT_S, GroupCommits, check_reader, fetch_wait
from bus.librdkafka import _unavailable, blocking
from bus.lifecycle import Lifecycle
from peernet.errors import PeerNetError, unavailable

log = logging.getLogger(__name__)

_T = TypeVar("_T")
# (topic, partitions) -> each partition's end offset
EndOffsets = Callable[[str, Sequence[int]], Awaitable[dict[int, int]]]

# The position of a partition assigned at the group's offset before the first record says which.
UNKNOWN = -1
# librdkafka fetches ahead on its own threads, up to this much per consumer (its default is
# 64 MB): enough for many batches of PeerNet's small records, not a catch-up's whole backlog.
PREFETCH_KBYTES = 8192


class RdKafkaLogConsumer(GroupCommits, Lifecycle):
    """LogConsumer on a librdkafka Consumer (auto-commit off: offsets advance only by `commit`).

    Every call to the client runs on one thread of this consumer's own (the client serializes
    its calls anyway), so the event loop never blocks; a call waits for a `poll` in progress,
    which returns within its `timeout_ms`. Start positions are fixed when partitions are taken:
    the group's committed offset, else the beginning or (not `from_beginning`) the end as of
    then, so a record appended after `start` returns is read, as with aiokafka. The group uses
    the round-robin assignor, as aiokafka does, so members of both backends can share a group
    (a rolling change of PEERNET_KAFKA_CLIENT). Commits, their interval and renewal are
    GroupCommits' (bus/kafka_consumer.py)."""

    def __init__(self, client_options: dict[str, Any], topic: str, *, group: str | None,
                 partitions: Sequence[int] | None, from_beginning: bool,
                 request_timeout_ms: int, timeout_s: float, client_id: str,
                 commit_interval_ms: int = 0, linger_ms: int = 0,
                 end_offsets: EndOffsets | None = None) -> None:
        """`client_options`: the event log's librdkafka settings (bootstrap, TLS, logger);
        `end_offsets`: how the end offsets are asked without this consumer's own client
        (RdKafkaEventLog.end_offsets), which answers only between polls."""
        check_reader(group, partitions)
        super().__init__(topic, group, timeout_s, commit_interval_ms)
        self._partitions = list(partitions) if partitions is not None else None
        self._from_beginning = from_beginning
        wait = fetch_wait(group=group, linger_ms=linger_ms)
        self._options: dict[str, Any] = {
            **client_options,
            "client.id": f"{client_id}-consumer",
            # librdkafka wants a group even for assigned partitions; nothing joins or commits it.
            "group.id": group if group is not None else f"{client_id}-unjoined",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest" if from_beginning else "latest",
            "socket.timeout.ms": request_timeout_ms,
            "fetch.wait.max.ms": wait["fetch_max_wait_ms"],
            "fetch.min.bytes": wait["fetch_min_bytes"],
            "session.timeout.ms": 10_000,
            "heartbeat.interval.ms": 1_000,
            "isolation.level": "read_uncommitted",
            "partition.assignment.strategy": "roundrobin",
            "queued.max.messages.kbytes": PREFETCH_KBYTES,
        }
        self._consumer: Consumer | None = None
        self._ends = end_offsets
        self._thread = self._new_thread()
        # What this consumer reads now, and the offset of the next record `poll` returns of
        # each: kept here, since asking the client waits for a poll in progress.
        self._positions: dict[int, int] = {}
        self._taken = False  # the group has handed us our share (possibly none) since start
        self._early: list[Record] = []  # returned by the client while `start` waited for it

    @staticmethod
    def _new_thread() -> concurrent.futures.ThreadPoolExecutor:
        return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="peernet-kafka-consumer")

    async def _call(self, fn: Callable[..., _T], *args: Any, timeout_s: float, what: str) -> _T:
        return await blocking(fn, *args, timeout_s=timeout_s, what=f"{what} {self._topic}",
                              executor=self._thread)

    async def start(self) -> None:
        """Join the group (or take the assigned partitions) and fix the start positions, so that
        a record appended after `start` returns is read even when not `from_beginning`."""
        self._taken = False
        self._early = []
        self._positions = {}
        try:
            self._consumer = Consumer(self._options)
        except KafkaException as exc:
            raise _unavailable(f"make consumer of {self._topic}", exc) from exc
        try:
            await self._call(self._join, timeout_s=self._timeout_s, what="start consumer of")
        except BaseException:
            await self._close()
            raise
        self._started = True

    def _join(self) -> None:
        """On the consumer's thread: take the partitions and wait until they are ours."""
        c = self._consumer
        assert c is not None
        if self._partitions is not None:
            tps = [TopicPartition(self._topic, p) for p in self._partitions]
            self._assign(c, tps, committed=False)
            return
        c.subscribe([self._topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                    on_lost=self._on_revoke)
        # Inside `start`'s own bound, so that this thread is free when `start` gives up.
        deadline = time.monotonic() + max(0.0, self._timeout_s - 0.5)
        while not self._taken:
            if time.monotonic() >= deadline:
                raise TimeoutError("the group assigned no partitions in time")
            self._early.extend(self._records(_fetched(c, 500, 0.1)))

    def _on_assign(self, c: Consumer, tps: list[TopicPartition]) -> None:
        try:
            self._assign(c, tps, committed=True)
        except KafkaException as exc:
            # Inside a poll, a raise would leave the partitions unassigned: librdkafka looks the
            # group's offsets up itself instead, and the positions are learnt from the records.
            log.warning("kafka consumer of %s: start offsets not fixed (%s); reading from the "
                        "group's committed offsets", self._topic, exc)
            for tp in tps:
                self._positions[tp.partition] = UNKNOWN
            c.assign([TopicPartition(self._topic, tp.partition, OFFSET_STORED) for tp in tps])
        self._taken = True

    def _assign(self, c: Consumer, tps: list[TopicPartition], *, committed: bool) -> None:
        """Assign `tps` at fixed offsets: the group's committed one, else the beginning (its
        low watermark) or the end as of now. KafkaException when one cannot be had."""
        timeout = self._timeout_s
        fixed = c.committed(tps, timeout=timeout) if committed and tps else tps
        out, positions = [], {}
        for tp in fixed:
            if tp.error is not None:
                # Not "no commit": starting at the beginning or end would replay or skip.
                raise KafkaException(tp.error)
            offset = tp.offset
            if offset < 0:
                low, high = c.get_watermark_offsets(TopicPartition(self._topic, tp.partition),
                                                    timeout=timeout, cached=False)
                offset = low if self._from_beginning else high
            out.append(TopicPartition(self._topic, tp.partition, offset))
            positions[tp.partition] = offset
        self._positions.update(positions)
        c.assign(out)

    def _on_revoke(self, c: Consumer, tps: list[TopicPartition]) -> None:
        # On the consumer's thread, inside a poll: the held-back offsets of the partitions going
        # away are committed here and now, while they are still ours (GroupCommits._revoked,
        # which the loop cannot run while it waits for this poll).
        gone = {tp.partition for tp in tps}
        held = [TopicPartition(self._topic, p, o) for p, o in self._held.items() if p in gone]
        if held and tps:
            try:
                c.commit(offsets=held, asynchronous=False)
            except KafkaException as exc:
                log.warning("kafka consumer of %s: commit on revocation failed: %s",
                            self._topic, exc)
        self._forget(gone)
        for p in gone:
            self._positions.pop(p, None)
        self._early = [r for r in self._early if r.partition not in gone]
        c.unassign()

    def _records(self, msgs: list[Message]) -> list[Record]:
        out: list[Record] = []
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.fatal():
                    raise KafkaException(err)
                # A broker away, a partition moved: librdkafka retries on its own.
                log.info("kafka consumer of %s: %s", self._topic, err)
                continue
            partition = m.partition() or 0
            offset = m.offset() or 0
            value = m.value()
            out.append(Record(self._topic, partition, offset, m.key(),
                              # a compaction tombstone has no value; PeerNet never writes one
                              value if value is not None else b"",
                              _headers(m),
                              m.timestamp()[1]))
        return out

    async def stop(self) -> None:
        """Commit what the commit interval held back and leave the group (if the broker
        answers), and close, in bounded time."""
        await self._stop_commits()
        self._started = False
        await self._close()

    async def _close(self, timeout_s: float = 10.0) -> None:
        c, self._consumer = self._consumer, None
        thread, self._thread = self._thread, self._new_thread()
        if c is not None:
            try:
                await blocking(c.close, timeout_s=timeout_s, what=f"close consumer of {self._topic}",
                               executor=thread)
            except PeerNetError as exc:
                log.warning("%s", exc)
        thread.shutdown(wait=False)

    async def _replace_client(self) -> None:
        await self._close()

    async def poll(self, *, max_records: int = 500, timeout_ms: int = 200) -> list[Record]:
        if self._renewing:
            await self._start_renewed()
        if self._consumer is None:
            raise unavailable(f"kafka: consumer of {self._topic} is not started")
        if self._early:
            out, self._early = self._early[:max_records], self._early[max_records:]
        else:
            c = self._consumer
            out = await self._call(lambda: self._records(_fetched(c, max_records, timeout_ms / 1000)),
                                   timeout_s=timeout_ms / 1000 + self._timeout_s, what="poll")
        # As aiokafka's getmany: by partition, each in offset order.
        out.sort(key=lambda r: r.partition)
        for r in out:
            if r.partition in self._positions:
                self._positions[r.partition] = r.offset + 1
                self._uncommitted[r.partition] = r.offset + 1
        return [r for r in out if r.partition in self._positions]

    def _assigned(self) -> set[int]:
        return set(self._positions)

    async def _commit_offsets(self, offsets: dict[int, int]) -> None:
        c = self._consumer
        if c is None:
            return
        tps = [TopicPartition(self._topic, p, o) for p, o in offsets.items()]
        bound = min(self._timeout_s, COMMIT_TIMEOUT_S)
        await self._call(_commit_until, c, tps, time.monotonic() + bound - 0.2,
                         timeout_s=bound, what="commit")

    async def seek(self, partition: int, offset: int) -> None:
        c = self._consumer
        if c is None:
            return
        await self._call(c.seek, TopicPartition(self._topic, partition, offset),
                         timeout_s=self._timeout_s, what="seek")
        self._positions[partition] = offset
        self._early = [r for r in self._early if r.partition != partition]
        self._forget({partition})

    async def end_offsets(self) -> dict[int, int]:
        c = self._consumer
        partitions = sorted(self._positions)
        if c is None or not partitions:
            return {}
        if self._ends is not None:
            return await self._ends(self._topic, partitions)
        timeout = self._timeout_s

        def ends() -> dict[int, int]:
            return {p: c.get_watermark_offsets(TopicPartition(self._topic, p), timeout=timeout,
                                               cached=False)[1] for p in partitions}

        return await self._call(ends, timeout_s=timeout + 1, what="end offsets")

    async def positions(self) -> dict[int, int]:
        return {p: o for p, o in self._positions.items() if o != UNKNOWN}

    def assignment(self) -> list[int]:
        """The partitions this consumer reads now (a group member's share changes on
        rebalance)."""
        return sorted(self._positions)


def _headers(m: Message) -> tuple[tuple[str, bytes], ...]:
    raw = m.headers() or ()
    items = raw.items() if isinstance(raw, dict) else raw
    return tuple((k, v.encode() if isinstance(v, str) else v or b"") for k, v in items)


def _commit_until(c: Consumer, tps: list[TopicPartition], deadline: float) -> None:
    """Commit, retrying a retriable refusal until `deadline` as aiokafka's commit does (a new
    topic the group coordinator does not know yet answers UNKNOWN_TOPIC_OR_PART for a moment);
    librdkafka's synchronous commit gives up at the first."""
    while True:
        try:
            c.commit(offsets=tps, asynchronous=False)
            return
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if not (isinstance(err, KafkaError) and err.retriable()) or time.monotonic() >= deadline:
                raise
        time.sleep(0.1)


# After the first record, how long a poll lets librdkafka finish queueing the rest of that
# fetch response, so that one poll returns what one fetch brought (as aiokafka's getmany), not
# only the partitions queued by the time the first was taken.
REST_OF_FETCH_S = 0.001


def _fetched(c: Consumer, max_records: int, timeout_s: float) -> list[Message]:
    """What has been fetched, as soon as there is anything: up to `max_records`, waiting at most
    `timeout_s` for the first. Consumer.consume would wait out its whole timeout unless it
    filled `max_records` (a second per hop at a low rate); poll returns with the first."""
    first = c.poll(timeout_s)
    if first is None:
        return []
    return [first, *c.consume(max_records - 1, REST_OF_FETCH_S)] if max_records > 1 else [first]
