"""EventLog and LogConsumer in memory, for unit tests, behaving like Kafka on the wire: records
are copied bytes, refused over Kafka's size limit, keyed to a stable partition; consumer groups
share partitions and keep their committed offsets in the log; `set_down` makes every call
PeerNetError(unavailable).

Each MemoryEventLog is one "server" plus its first client; `client()` returns another client of
the same server (another process, as far as the code under test can tell).
"""

from __future__ import annotations

import asyncio
import itertools
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from bus.eventlog import Appended, EventLog, Headers, Record, TopicSpec
from bus.lifecycle import Lifecycle
from bus.memory_wire import as_bytes
from peernet.errors import bad_request, unavailable
from peernet.routing import stable_hash

# Kafka's default max.request.size; a bigger record is refused, as the producer would.
MAX_RECORD_BYTES = 1024 * 1024


def _partition_for_key(key: bytes, partitions: int) -> int:
    try:
        h = stable_hash(key.decode("utf-8"))
    except UnicodeDecodeError:
        h = zlib.crc32(key)  # what stable_hash computes for the utf-8 keys PeerNet uses
    return h % partitions


@dataclass
class _LogServer:
    topics: dict[str, list[list[Record]]] = field(default_factory=dict)
    # (group, topic) -> partition -> committed offset
    committed: dict[tuple[str, str], dict[int, int]] = field(default_factory=dict)
    # (group, topic) -> members in join order
    members: dict[tuple[str, str], list[MemoryLogConsumer]] = field(default_factory=dict)
    generation: int = 0  # bumped on membership change: members re-sync their assignment
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    down: bool = False
    round_robin: Iterator[int] = field(default_factory=itertools.count)

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def check_up(self) -> None:
        if self.down:
            raise unavailable("memory event log is down")


class MemoryEventLog(EventLog, Lifecycle):
    """EventLog in memory. Keyed records go to partition stable_hash(key) % partitions (not
    Kafka's murmur2: callers must not depend on the partition number, only on its stability)."""

    def __init__(self, _server: _LogServer | None = None) -> None:
        self._server = _server or _LogServer()
        self._started = False

    def client(self) -> MemoryEventLog:
        """Another client of the same log (another process)."""
        return MemoryEventLog(self._server)

    def set_down(self, down: bool) -> None:
        """Make every call (of every client) raise PeerNetError(unavailable), or stop that."""
        self._server.down = down
        self._server.notify()

    async def start(self) -> None:
        self._server.check_up()
        self._started = True

    async def stop(self) -> None:
        self._started = False

    def _check(self) -> None:
        if not self._started:
            raise RuntimeError("MemoryEventLog is not started")
        self._server.check_up()

    async def ensure_topics(self, specs: Sequence[TopicSpec]) -> None:
        self._server.check_up()
        for spec in specs:
            if spec.partitions < 1:
                raise ValueError(f"topic {spec.name}: partitions must be positive")
            self._server.topics.setdefault(spec.name, [[] for _ in range(spec.partitions)])

    async def append_many(self, topic: str,
                          items: Sequence[tuple[bytes | None, bytes, Headers]]) -> list[Appended]:
        self._check()
        partitions = self._server.topics.get(topic)
        if partitions is None:
            # Kafka (auto-create off) waits for the topic's metadata until the delivery timeout.
            raise unavailable(f"memory event log: unknown topic {topic}")
        prepared = []
        for key, value, headers in items:
            k = None if key is None else as_bytes(key, "key")
            v = as_bytes(value, "value")
            h = tuple((str(name), as_bytes(hv, "header value")) for name, hv in headers)
            size = len(v) + len(k or b"") + sum(len(n) + len(hv) for n, hv in h)
            if size > MAX_RECORD_BYTES:
                raise bad_request(f"record of {size} bytes is over {MAX_RECORD_BYTES}")
            prepared.append((k, v, h))
        out = []
        now_ms = time.time_ns() // 1_000_000
        for k, v, h in prepared:
            p = (_partition_for_key(k, len(partitions)) if k is not None
                 else next(self._server.round_robin) % len(partitions))
            offset = len(partitions[p])
            partitions[p].append(Record(topic, p, offset, k, v, h, now_ms))
            out.append(Appended(topic, p, offset))
        self._server.notify()
        return out

    def consumer(self, topic: str, *, group: str | None = None,
                 partitions: Sequence[int] | None = None,
                 from_beginning: bool = True, linger_ms: int = 0) -> MemoryLogConsumer:
        return MemoryLogConsumer(self._server, topic, group=group, partitions=partitions,
                                 from_beginning=from_beginning)

    async def ping(self) -> None:
        self._server.check_up()

    def records(self, topic: str) -> list[Record]:
        """Every record of `topic`, by partition then offset (for assertions in tests)."""
        return [r for part in self._server.topics.get(topic, []) for r in part]


class MemoryLogConsumer(Lifecycle):
    """LogConsumer in memory. Group members share the partitions round-robin by join order and
    take over a partition from its last commit, as Kafka's group protocol does."""

    def __init__(self, server: _LogServer, topic: str, *, group: str | None,
                 partitions: Sequence[int] | None, from_beginning: bool) -> None:
        if (group is None) == (partitions is None):
            raise ValueError("a consumer reads either in a group or assigned partitions")
        self._server = server
        self._topic = topic
        self._group = group
        self._fixed = list(partitions) if partitions is not None else None
        self._from_beginning = from_beginning
        self._positions: dict[int, int] = {}
        self._uncommitted: dict[int, int] = {}
        self.renewals = 0  # its commits never fail: nothing to renew
        self._generation = -1
        self._next_first = 0  # rotates the partition served first, against starvation
        self._started = False

    @property
    def _key(self) -> tuple[str, str]:
        assert self._group is not None
        return (self._group, self._topic)

    def _parts(self) -> list[list[Record]]:
        parts = self._server.topics.get(self._topic)
        if parts is None:
            raise unavailable(f"memory event log: unknown topic {self._topic}")
        return parts

    async def start(self) -> None:
        self._server.check_up()
        parts = self._parts()
        if self._fixed is not None:
            for p in self._fixed:
                if not 0 <= p < len(parts):
                    raise ValueError(f"{self._topic} has no partition {p}")
                self._positions[p] = 0 if self._from_beginning else len(parts[p])
        else:
            self._server.members.setdefault(self._key, []).append(self)
            self._server.generation += 1
            self._server.notify()
            self._sync_assignment()
        self._started = True

    async def stop(self) -> None:
        if self._started and self._group is not None:
            members = self._server.members.get(self._key, [])
            if self in members:
                members.remove(self)
                self._server.generation += 1
                self._server.notify()
        self._started = False
        self._positions.clear()
        self._uncommitted.clear()

    def _sync_assignment(self) -> None:
        if self._group is None or self._generation == self._server.generation:
            return
        self._generation = self._server.generation
        members = self._server.members.get(self._key, [])
        n_parts = len(self._parts())
        mine = ({p for p in range(n_parts) if p % len(members) == members.index(self)}
                if self in members else set())
        committed = self._server.committed.get(self._key, {})
        for p in list(self._positions):
            if p not in mine:
                del self._positions[p]
                self._uncommitted.pop(p, None)
        for p in sorted(mine - set(self._positions)):
            if p in committed:
                self._positions[p] = committed[p]
            else:
                self._positions[p] = 0 if self._from_beginning else len(self._parts()[p])

    def _check(self) -> None:
        if not self._started:
            raise RuntimeError("consumer is not started")
        self._server.check_up()

    def _take(self, max_records: int) -> list[Record]:
        parts = self._parts()
        order = sorted(self._positions)
        if not order:
            return []
        first = self._next_first % len(order)
        self._next_first += 1
        out: list[Record] = []
        for p in order[first:] + order[:first]:
            room = max_records - len(out)
            if room <= 0:
                break
            pos = self._positions[p]
            batch = parts[p][pos:pos + room]
            if batch:
                out.extend(batch)
                self._positions[p] = pos + len(batch)
                self._uncommitted[p] = self._positions[p]
        out.sort(key=lambda r: (r.partition, r.offset))
        return out

    async def poll(self, *, max_records: int = 500, timeout_ms: int = 200) -> list[Record]:
        if max_records < 1:
            raise ValueError("max_records must be positive")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_ms / 1000
        while True:
            self._check()
            self._sync_assignment()
            changed = self._server.changed
            got = self._take(max_records)
            remaining = deadline - loop.time()
            if got or remaining <= 0:
                return got
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                pass

    async def commit(self) -> None:
        if self._group is None:
            raise RuntimeError("commit needs a consumer group")
        self._check()
        self._sync_assignment()
        committed = self._server.committed.setdefault(self._key, {})
        for p, offset in self._uncommitted.items():
            if p in self._positions:
                committed[p] = offset
        self._uncommitted.clear()

    async def seek(self, partition: int, offset: int) -> None:
        self._check()
        if partition not in self._positions:
            raise ValueError(f"partition {partition} is not assigned to this consumer")
        self._positions[partition] = max(0, offset)
        self._uncommitted.pop(partition, None)

    async def end_offsets(self) -> dict[int, int]:
        self._check()
        self._sync_assignment()
        parts = self._parts()
        return {p: len(parts[p]) for p in sorted(self._positions)}

    async def positions(self) -> dict[int, int]:
        self._check()
        self._sync_assignment()
        return dict(sorted(self._positions.items()))

    def assignment(self) -> list[int]:
        self._sync_assignment()
        return sorted(self._positions)


__all__ = ["MAX_RECORD_BYTES", "MemoryEventLog", "MemoryLogConsumer"]
