"""EventLog: the durable, ordered event log (Kafka), and LogConsumer, a reader of it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

Headers = tuple[tuple[str, bytes], ...]


@dataclass(frozen=True, slots=True)
class Record:
    """One record read from the log."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: Headers
    timestamp: int


@dataclass(frozen=True, slots=True)
class Appended:
    """Where an appended record now lives."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    replication_factor: int = 1
    config: tuple[tuple[str, str], ...] = ()


class EventLog(Protocol):
    """The durable event log.

    Guarantees:
    - `append` and `append_many` return only once every in-sync replica has the records
      (acks=all, idempotent producer): what they return is durable and will be read back.
    - Records with the same key go to the same partition (stable partitioner) and keep the order
      in which they were appended; `append_many` keeps the order of its items.
    - When the log cannot take a record within the configured timeout, they raise
      PeerNetError(unavailable). The record may or may not have been stored (at-least-once): the
      caller must not acknowledge it, and may retry.
    """

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def ensure_topics(self, specs: Sequence[TopicSpec]) -> None:
        """Create the topics that do not exist yet (existing ones are left as they are)."""

    async def append(self, topic: str, value: bytes, *, key: bytes | None = None,
                     headers: Headers = ()) -> Appended:
        """Append one record: `append_many` of one, for the implementations that subclass this."""
        (appended,) = await self.append_many(topic, [(key, value, headers)])
        return appended

    async def append_many(self, topic: str,
                          items: Sequence[tuple[bytes | None, bytes, Headers]]) -> list[Appended]:
        """Append (key, value, headers) items, all sent before any is awaited."""

    def consumer(self, topic: str, *, group: str | None = None,
                 partitions: Sequence[int] | None = None,
                 from_beginning: bool = True, linger_ms: int = 0) -> LogConsumer:
        """A reader of `topic`: in consumer group `group` (partitions spread over its members,
        offsets committed by `commit`), or of exactly `partitions` with no group. Give exactly
        one of the two (ValueError otherwise). A group with no commit yet, and a reader without
        a group, start at the beginning of each partition or, unless `from_beginning`, at its
        end as of `start`.

        `linger_ms`: a reader that can wait lets records gather for up to this long before they
        are fetched, trading that much latency for fewer, larger fetches (0: a record is fetched
        as soon as it is appended). It changes only when records arrive, never which or in what
        order."""

    async def ping(self) -> None:
        """Raise PeerNetError(unavailable) unless the cluster answers a metadata request."""


class LogConsumer(Protocol):
    """Reads records in offset order per partition.

    With a group, offsets advance only through `commit`, which the caller calls after it has
    processed what `poll` returned: a restarted consumer resumes from the last commit, so a record
    is processed at least once. Without a group nothing is committed; start positions are
    `from_beginning` or `seek`.
    """

    async def start(self) -> None:
        """Join the group (or take the partitions) and fix the start positions: a record
        appended after `start` returns is read. PeerNetError(unavailable) if the log does not
        answer in time."""

    async def stop(self) -> None:
        """Leave the group and close, in bounded time even when the log is down."""

    async def poll(self, *, max_records: int = 500, timeout_ms: int = 200) -> list[Record]:
        """The next records (possibly none after `timeout_ms`)."""

    async def commit(self) -> None:
        """Commit the offsets of every record `poll` has returned so far. A log may hold commits
        back to at most one per interval (KafkaEventLog's `commit_interval_ms`): the offsets
        are then committed by a later `commit`, by `stop`, or when the group takes partitions
        away, and a crash in between redelivers up to an interval's records, which at-least-once
        allows (every PeerNet consumer is idempotent)."""

    async def seek(self, partition: int, offset: int) -> None: ...

    async def end_offsets(self) -> dict[int, int]:
        """The offset after the last record of each partition this consumer reads."""

    async def positions(self) -> dict[int, int]:
        """The offset of the next record `poll` will return, per partition."""

    @property
    def renewals(self) -> int:
        """How many times this consumer replaced its client because its commits kept failing
        (a group coordinator that stays lost; bus/kafka_consumer.py `RENEW_AFTER_COMMIT_FAILURES`). 0
        for a log that never needs to."""


@dataclass(frozen=True, slots=True)
class ConsumerLag:
    """How far one consumer of a group trails the log: per partition it reads now, the records
    after its position (end offset minus the offset of the next record `poll` returns), and
    how many times it has renewed its client (`LogConsumer.renewals`)."""

    group: str
    topic: str
    partitions: dict[int, int]
    renewals: int = 0


async def consumer_lag(consumer: LogConsumer, *, group: str, topic: str) -> ConsumerLag:
    """The lag of `consumer` now. A partition that moved to another member between the two
    reads (a rebalance) is left out: that member reports it."""
    ends = await consumer.end_offsets()
    positions = await consumer.positions()
    return ConsumerLag(group, topic, {p: max(0, end - positions[p])
                                      for p, end in sorted(ends.items()) if p in positions},
                       consumer.renewals)
