"""In-memory EventLog, PubSub, Cache, DocumentStore and PresenceStore for unit tests, built to
behave like the wire: bytes are copied, documents round-trip through BSON, consumer groups keep
their committed offsets in the log, pub/sub handlers run in a reader task, and every backend can
be taken down (`set_down`) to exercise PeerNetError(unavailable) paths.

Each object is one "server" plus its first client; `client()` returns another client of the same
server (another process, as far as the code under test can tell).
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import itertools
import logging
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import bson

from bus.eventlog import Appended, Headers, Record, TopicSpec
from bus.presence import NEVER_SEEN, ONLINE, Change, PresenceState
from bus.pubsub import Handler
from bus.store import Document, DuplicateKeyError
from peernet.errors import bad_request, unavailable
from peernet.routing import stable_hash

log = logging.getLogger(__name__)

# Kafka's default max.request.size; a bigger record is refused, as the producer would.
MAX_RECORD_BYTES = 1024 * 1024


def _partition_for_key(key: bytes, partitions: int) -> int:
    try:
        h = stable_hash(key.decode("utf-8"))
    except UnicodeDecodeError:
        h = zlib.crc32(key)  # what stable_hash computes for the utf-8 keys PeerNet uses
    return h % partitions


def _as_bytes(value: object, what: str) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be bytes, not {type(value).__name__}")
    return bytes(value)  # a copy of a mutable buffer: the caller may reuse it


# ---------------------------------------------------------------------------------------------
# EventLog


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


class MemoryEventLog:
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

    async def __aenter__(self) -> MemoryEventLog:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

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

    async def append(self, topic: str, value: bytes, *, key: bytes | None = None,
                     headers: Headers = ()) -> Appended:
        (appended,) = await self.append_many(topic, [(key, value, headers)])
        return appended

    async def append_many(self, topic: str,
                          items: Sequence[tuple[bytes | None, bytes, Headers]]) -> list[Appended]:
        self._check()
        partitions = self._server.topics.get(topic)
        if partitions is None:
            # Kafka (auto-create off) waits for the topic's metadata until the delivery timeout.
            raise unavailable(f"memory event log: unknown topic {topic}")
        prepared = []
        for key, value, headers in items:
            k = None if key is None else _as_bytes(key, "key")
            v = _as_bytes(value, "value")
            h = tuple((str(name), _as_bytes(hv, "header value")) for name, hv in headers)
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


class MemoryLogConsumer:
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

    async def __aenter__(self) -> MemoryLogConsumer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

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


# ---------------------------------------------------------------------------------------------
# PubSub


class _PubSubServer:
    def __init__(self) -> None:
        self.channels: dict[str, set[MemoryPubSub]] = {}
        self.down = False


class _MemorySubscription:
    def __init__(self, owner: MemoryPubSub, channel: str, handler: Handler) -> None:
        self._owner = owner
        self.channel = channel
        self.handler = handler
        self._active = True

    async def unsubscribe(self) -> None:
        if self._active:
            self._active = False
            self._owner._remove(self)


class MemoryPubSub:
    """PubSub in memory: each instance is one process with one connection to a shared server.

    `publish` returns the number of instances subscribed to the channel; each gets a copy of the
    payload on its bounded queue and calls handlers from its own reader task, never inside
    `publish`. A full queue (a slow subscriber) drops that instance's connection as Redis's
    output-buffer limit would: what was queued is lost and `on_reconnect` callbacks run.
    """

    def __init__(self, _server: _PubSubServer | None = None, *, queue_capacity: int = 10_000
                 ) -> None:
        self._server = _server or _PubSubServer()
        self._capacity = queue_capacity
        self._handlers: dict[str, list[_MemorySubscription]] = {}
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(queue_capacity)
        self._reader: asyncio.Task[None] | None = None
        self._reconnect_callbacks: list[Callable[[], None]] = []
        self._reconnect_scheduled = False
        self.reconnects = 0
        self.handler_errors = 0
        self.dropped = 0

    def client(self) -> MemoryPubSub:
        """Another process on the same pub/sub server."""
        return MemoryPubSub(self._server, queue_capacity=self._capacity)

    def set_down(self, down: bool) -> None:
        """Down: publish and subscribe raise PeerNetError(unavailable). Coming back up is a
        reconnect for every instance (their on_reconnect callbacks run)."""
        was_down, self._server.down = self._server.down, down
        if was_down and not down:
            for inst in {i for subs in self._server.channels.values() for i in subs}:
                inst.drop_connection()

    async def __aenter__(self) -> MemoryPubSub:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._server.down:
            raise unavailable("memory pub/sub is down")
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_forever())

    async def stop(self) -> None:
        for channel in list(self._handlers):
            self._server.channels.get(channel, set()).discard(self)
        self._handlers.clear()
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            try:
                await reader
            except asyncio.CancelledError:
                pass

    async def publish(self, channel: str, payload: bytes) -> int:
        if self._reader is None:
            raise RuntimeError("MemoryPubSub is not started")
        if self._server.down:
            raise unavailable("memory pub/sub is down")
        data = _as_bytes(payload, "payload")
        receivers = list(self._server.channels.get(channel, ()))
        for inst in receivers:
            inst._deliver(channel, data)
        return len(receivers)

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> None:
        for channel, payload in messages:
            await self.publish(channel, payload)

    def _deliver(self, channel: str, data: bytes) -> None:
        try:
            self._queue.put_nowait((channel, data))
        except asyncio.QueueFull:
            self.dropped += 1
            self.drop_connection()

    async def subscribe(self, channel: str, handler: Handler) -> _MemorySubscription:
        if self._reader is None:
            raise RuntimeError("MemoryPubSub is not started")
        if self._server.down:
            raise unavailable("memory pub/sub is down")
        sub = _MemorySubscription(self, channel, handler)
        self._handlers.setdefault(channel, []).append(sub)
        self._server.channels.setdefault(channel, set()).add(self)
        return sub

    def _remove(self, sub: _MemorySubscription) -> None:
        handlers = self._handlers.get(sub.channel)
        if handlers is None or sub not in handlers:
            return
        handlers.remove(sub)
        if not handlers:
            del self._handlers[sub.channel]
            subscribers = self._server.channels.get(sub.channel)
            if subscribers is not None:
                subscribers.discard(self)
                if not subscribers:
                    del self._server.channels[sub.channel]

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        self._reconnect_callbacks.append(callback)

    def channels(self) -> list[str]:
        """The channels this instance is subscribed to on the server."""
        return sorted(self._handlers)

    def subscriber_count(self, channel: str) -> int:
        """PUBSUB NUMSUB: how many instances are subscribed to `channel`."""
        return len(self._server.channels.get(channel, ()))

    def drop_connection(self) -> None:
        """Simulate a dropped connection: queued messages are lost; after the (immediate)
        reconnect the reader runs the on_reconnect callbacks."""
        while not self._queue.empty():
            self._queue.get_nowait()
            self.dropped += 1
        if not self._reconnect_scheduled:
            self._reconnect_scheduled = True
            self._queue.put_nowait(("", b""))  # a marker; channel names are never empty here

    async def _read_forever(self) -> None:
        while True:
            channel, data = await self._queue.get()
            if channel == "" and self._reconnect_scheduled:
                self._reconnect_scheduled = False
                self.reconnects += 1
                for callback in list(self._reconnect_callbacks):
                    try:
                        callback()
                    except Exception:
                        self.handler_errors += 1
                        log.exception("pub/sub on_reconnect callback failed")
                continue
            for sub in list(self._handlers.get(channel, ())):
                try:
                    sub.handler(channel, data)
                except Exception:
                    self.handler_errors += 1
                    log.exception("pub/sub handler for %r failed", channel)


# ---------------------------------------------------------------------------------------------
# Cache


class _CacheServer:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.data: dict[str, tuple[bytes, float | None]] = {}
        # group -> member -> (value, expires at)
        self.groups: dict[str, dict[str, tuple[bytes, float]]] = {}
        self.down = False


class MemoryCache:
    """Cache in memory, with expiry by `clock` (time.monotonic unless given, so tests can
    advance time)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 _server: _CacheServer | None = None) -> None:
        self._server = _server or _CacheServer(clock)

    def client(self) -> MemoryCache:
        return MemoryCache(_server=self._server)

    def set_down(self, down: bool) -> None:
        self._server.down = down

    async def __aenter__(self) -> MemoryCache:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def _live(self, key: str) -> bytes | None:
        s = self._server
        if s.down:
            raise unavailable("memory cache is down")
        entry = s.data.get(key)
        if entry is None:
            return None
        value, expires = entry
        if expires is not None and s.clock() >= expires:
            del s.data[key]
            return None
        return value

    def _expiry(self, ttl_s: float | None) -> float | None:
        if ttl_s is None:
            return None
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        # Redis keeps whole milliseconds, at least one.
        return self._server.clock() + max(1, round(ttl_s * 1000)) / 1000

    async def get(self, key: str) -> bytes | None:
        return self._live(key)

    async def set(self, key: str, value: bytes, *, ttl_s: float | None = None) -> None:
        expires = self._expiry(ttl_s)
        self._live(key)
        self._server.data[key] = (_as_bytes(value, "value"), expires)

    async def set_if_absent(self, key: str, value: bytes, *, ttl_s: float | None = None) -> bool:
        expires = self._expiry(ttl_s)
        if self._live(key) is not None:
            return False
        self._server.data[key] = (_as_bytes(value, "value"), expires)
        return True

    async def set_many(self, items: Sequence[tuple[str, bytes]], *, ttl_s: float | None = None) -> None:
        for key, value in items:
            await self.set(key, value, ttl_s=ttl_s)

    async def set_many_if_absent(self, items: Sequence[tuple[str, bytes]], *,
                                 ttl_s: float | None = None) -> list[bool]:
        return [await self.set_if_absent(key, value, ttl_s=ttl_s) for key, value in items]

    async def delete(self, key: str) -> None:
        self._live(key)
        self._server.data.pop(key, None)

    def _group(self, group: str) -> dict[str, tuple[bytes, float]]:
        """`group`'s live members (the expired ones dropped), as Redis would answer."""
        s = self._server
        if s.down:
            raise unavailable("memory cache is down")
        entries = s.groups.get(group, {})
        now = s.clock()
        for member in [m for m, (_, expires) in entries.items() if now >= expires]:
            del entries[member]
        return entries

    async def put_member(self, group: str, member: str, value: bytes, *, ttl_s: float) -> None:
        expires = self._expiry(ttl_s)
        assert expires is not None
        self._group(group)
        self._server.groups.setdefault(group, {})[member] = (_as_bytes(value, "value"), expires)

    async def members(self, group: str) -> dict[str, bytes]:
        return {member: value for member, (value, _) in self._group(group).items()}

    async def remove_member(self, group: str, member: str) -> None:
        self._group(group).pop(member, None)

    async def ping(self) -> None:
        if self._server.down:
            raise unavailable("memory cache is down")


# ---------------------------------------------------------------------------------------------
# DocumentStore

# MongoDB's sort order of BSON types (null stands for a missing field too).
_TYPE_RANK: tuple[tuple[type, int], ...] = (
    (type(None), 1), (bool, 8), (int, 2), (float, 2), (bson.Int64, 2),
    (bson.Decimal128, 2), (str, 3), (dict, 4), (list, 5), (bytes, 6), (bson.Binary, 6),
    (bson.ObjectId, 7), (datetime.datetime, 9), (bson.Timestamp, 10),
)


def _rank(v: Any) -> int:
    for t, r in _TYPE_RANK:  # bool before int: bool is an int subclass
        if type(v) is t:
            return r
    for t, r in _TYPE_RANK:
        if isinstance(v, t):
            return r
    return 11


def _canon(v: Any) -> Any:
    """A hashable, ordered stand-in for a BSON value: equal where MongoDB's comparison is
    (1 == 1.0 == Int64(1)), distinct across types (True is not 1)."""
    r = _rank(v)
    if isinstance(v, dict):
        return (r, tuple((k, _canon(x)) for k, x in v.items()))
    if isinstance(v, list):
        return (r, tuple(_canon(x) for x in v))
    if isinstance(v, bson.Decimal128):
        return (r, v.to_decimal())
    if v is None:
        return (r, 0)
    return (r, v)


_MISSING = object()


def _values_at(doc: Any, path: list[str]) -> list[Any]:
    """The values a dotted path reaches, MongoDB-style: arrays along the way are traversed."""
    if not path:
        return [doc]
    if isinstance(doc, dict):
        if path[0] not in doc:
            return [_MISSING]
        return _values_at(doc[path[0]], path[1:])
    if isinstance(doc, list):
        if path[0].isdigit():
            i = int(path[0])
            return _values_at(doc[i], path[1:]) if i < len(doc) else [_MISSING]
        out: list[Any] = []
        for item in doc:
            if isinstance(item, (dict, list)):
                out.extend(v for v in _values_at(item, path) if v is not _MISSING)
        return out or [_MISSING]
    return [_MISSING]


def _candidates(v: Any) -> list[Any]:
    # A field holding an array matches a condition on the array or on any element.
    return [v, *v] if isinstance(v, list) else [v]


def _eq(v: Any, target: Any) -> bool:
    if v is _MISSING:
        return target is None
    return any(_canon(c) == _canon(target) for c in _candidates(v))


def _cmp(v: Any, target: Any, op: Callable[[Any, Any], bool]) -> bool:
    if v is _MISSING:
        return False
    t = _canon(target)
    return any(_rank(c) == _rank(target) and op(_canon(c), t) for c in _candidates(v))


_OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "$eq": _eq,
    "$ne": lambda v, t: not _eq(v, t),
    "$gt": lambda v, t: _cmp(v, t, lambda a, b: a > b),
    "$gte": lambda v, t: _cmp(v, t, lambda a, b: a >= b),
    "$lt": lambda v, t: _cmp(v, t, lambda a, b: a < b),
    "$lte": lambda v, t: _cmp(v, t, lambda a, b: a <= b),
    "$in": lambda v, t: any(_eq(v, x) for x in t),
    "$nin": lambda v, t: not any(_eq(v, x) for x in t),
    "$exists": lambda v, t: (v is not _MISSING) == bool(t),
}


def _field_matches(values: list[Any], cond: Any) -> bool:
    if isinstance(cond, dict) and cond and all(k.startswith("$") for k in cond):
        for op, target in cond.items():
            fn = _OPERATORS.get(op)
            if fn is None:
                raise NotImplementedError(f"memory store: query operator {op} not supported")
            if op in ("$ne", "$nin"):  # true only if no reached value matches
                if not all(fn(v, target) for v in values):
                    return False
            elif not any(fn(v, target) for v in values):
                return False
        return True
    return any(_eq(v, cond) for v in values)


def _matches(doc: Document, query: Mapping[str, Any]) -> bool:
    for key, cond in query.items():
        if key == "$and":
            if not all(_matches(doc, q) for q in cond):
                return False
        elif key == "$or":
            if not any(_matches(doc, q) for q in cond):
                return False
        elif key == "$nor":
            if any(_matches(doc, q) for q in cond):
                return False
        elif key.startswith("$"):
            raise NotImplementedError(f"memory store: query operator {key} not supported")
        elif not _field_matches(_values_at(doc, key.split(".")), cond):
            return False
    return True


def _sort_key(doc: Document, path: str) -> Any:
    v = _values_at(doc, path.split("."))[0]
    return _canon(None if v is _MISSING else v)


@dataclass
class _Collection:
    docs: dict[Any, bytes] = field(default_factory=dict)  # canon(_id) -> BSON
    # key pattern -> unique
    indexes: dict[tuple[tuple[str, int], ...], bool] = field(default_factory=dict)


class _StoreServer:
    def __init__(self) -> None:
        self.collections: dict[str, _Collection] = {}
        self.down = False


class MemoryDocumentStore:
    """DocumentStore in memory. Documents are stored as BSON and decoded on every read, so
    callers get copies with exactly the types MongoDB gives back; `_id` and unique indexes are
    enforced (a missing field counts as null; arrays are compared whole, not per element).
    Queries support equality, $eq/$ne/$gt/$gte/$lt/$lte/$in/$nin/$exists, $and/$or/$nor and
    dotted paths; anything else raises NotImplementedError rather than answer wrongly."""

    def __init__(self, _server: _StoreServer | None = None) -> None:
        self._server = _server or _StoreServer()

    def client(self) -> MemoryDocumentStore:
        return MemoryDocumentStore(self._server)

    def set_down(self, down: bool) -> None:
        self._server.down = down

    async def __aenter__(self) -> MemoryDocumentStore:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def _coll(self, name: str) -> _Collection:
        if self._server.down:
            raise unavailable("memory document store is down")
        if not name or "$" in name:
            raise ValueError(f"invalid collection name {name!r}")
        return self._server.collections.setdefault(name, _Collection())

    @staticmethod
    def _decode(raw: bytes) -> Document:
        return dict(bson.decode(raw))

    def _check_unique(self, coll: _Collection, name: str, doc: Document, own_id: Any) -> None:
        for keys, unique in coll.indexes.items():
            if not unique:
                continue
            mine = tuple(_sort_key(doc, k) for k, _ in keys)
            for other_id, raw in coll.docs.items():
                if other_id == own_id:
                    continue
                other = self._decode(raw)
                if tuple(_sort_key(other, k) for k, _ in keys) == mine:
                    raise DuplicateKeyError(
                        f"{name}: E11000 duplicate key on {[k for k, _ in keys]}: {mine}")

    async def ensure_index(self, collection: str, keys: Sequence[tuple[str, int]], *,
                           unique: bool = False) -> None:
        coll = self._coll(collection)
        pattern = tuple((str(k), int(d)) for k, d in keys)
        if not pattern:
            raise ValueError("an index needs keys")
        existing = coll.indexes.get(pattern)
        if existing is not None:
            if existing != unique:
                raise ValueError(f"{collection}: index {list(pattern)} exists with other options")
            return
        if unique:
            seen: set[Any] = set()
            for raw in coll.docs.values():
                doc = self._decode(raw)
                k = tuple(_sort_key(doc, f) for f, _ in pattern)
                if k in seen:
                    raise DuplicateKeyError(f"{collection}: unique index {list(pattern)} over "
                                            f"duplicates: {k}")
                seen.add(k)
        coll.indexes[pattern] = unique

    def _encode(self, doc: Mapping[str, Any]) -> tuple[Any, bytes, Document]:
        if "_id" not in doc:
            doc = {"_id": bson.ObjectId(), **doc}
        else:
            doc = {"_id": doc["_id"], **{k: v for k, v in doc.items() if k != "_id"}}
        raw = bson.encode(doc)  # TypeError/InvalidDocument on what BSON cannot carry
        decoded = self._decode(raw)
        return _canon(decoded["_id"]), raw, decoded

    async def insert(self, collection: str, doc: Document) -> None:
        coll = self._coll(collection)
        key, raw, decoded = self._encode(doc)
        if key in coll.docs:
            raise DuplicateKeyError(f"{collection}: E11000 duplicate key on _id: {decoded['_id']!r}")
        self._check_unique(coll, collection, decoded, key)
        coll.docs[key] = raw

    async def upsert_many(self, collection: str, docs: Sequence[Document]) -> None:
        coll = self._coll(collection)
        for doc in docs:
            if "_id" not in doc:
                raise ValueError("upsert_many needs an _id in every document")
        for doc in docs:  # in order: a refused document stops the rest, as ordered bulk writes
            key, raw, decoded = self._encode(doc)
            self._check_unique(coll, collection, decoded, key)
            coll.docs[key] = raw

    async def insert_new(self, collection: str, docs: Sequence[Document]) -> None:
        coll = self._coll(collection)
        if any("_id" not in doc for doc in docs):
            raise ValueError("insert_new needs an _id in every document")
        refused: list[str] = []
        for doc in docs:  # unordered: a refused document does not stop the rest
            key, raw, decoded = self._encode(doc)
            if key in coll.docs:
                continue
            try:
                self._check_unique(coll, collection, decoded, key)
            except DuplicateKeyError as exc:
                refused.append(str(exc))
                continue
            coll.docs[key] = raw
        if refused:
            raise DuplicateKeyError("; ".join(refused))

    async def find(self, collection: str, query: Mapping[str, Any], *,
                   sort: Sequence[tuple[str, int]] = (), limit: int = 0) -> list[Document]:
        coll = self._coll(collection)
        found = [d for d in map(self._decode, coll.docs.values()) if _matches(d, query)]
        for path, direction in reversed(list(sort)):  # stable sorts, last key first
            found.sort(key=functools.partial(_sort_key, path=path), reverse=direction < 0)
        return found[:limit] if limit > 0 else found

    async def delete_many(self, collection: str, query: Mapping[str, Any]) -> int:
        coll = self._coll(collection)
        doomed = [k for k, raw in coll.docs.items() if _matches(self._decode(raw), query)]
        for k in doomed:
            del coll.docs[k]
        return len(doomed)

    async def ping(self) -> None:
        if self._server.down:
            raise unavailable("memory document store is down")


# ---------------------------------------------------------------------------------------------
# PresenceStore


class _PresenceServer:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.users: dict[str, tuple[PresenceState, float | None]] = {}
        self.leases: dict[str, float] = {}
        self.held: dict[str, dict[str, set[str]]] = {}  # shard -> replica -> users
        self.down = False


class MemoryPresenceStore:
    """PresenceStore in memory, with expiry by `clock` (seconds; time.monotonic unless given,
    so tests can advance time). Answers are copies; `set_down` makes every call unavailable."""

    def __init__(self, *, last_seen_ttl_s: float = 30 * 24 * 3600,
                 clock: Callable[[], float] = time.monotonic,
                 _server: _PresenceServer | None = None) -> None:
        self._server = _server or _PresenceServer(clock)
        self._last_seen_s = last_seen_ttl_s

    def client(self) -> MemoryPresenceStore:
        return MemoryPresenceStore(last_seen_ttl_s=self._last_seen_s, _server=self._server)

    def set_down(self, down: bool) -> None:
        self._server.down = down

    def wipe(self) -> None:
        """Lose everything, as a restarted Redis without persistence would."""
        s = self._server
        s.users.clear()
        s.leases.clear()
        s.held.clear()

    def _s(self) -> _PresenceServer:
        if self._server.down:
            raise unavailable("memory presence store is down")
        return self._server

    def _lease_live(self, replica: str) -> bool:
        s = self._server
        expires = s.leases.get(replica)
        if expires is None:
            return False
        if s.clock() >= expires:
            del s.leases[replica]
            return False
        return True

    async def renew_lease(self, replica: str, ttl_ms: int) -> bool:
        s = self._s()
        was_live = self._lease_live(replica)
        s.leases[replica] = s.clock() + max(1, ttl_ms) / 1000
        return was_live

    async def release_lease(self, replica: str) -> None:
        self._s().leases.pop(replica, None)

    async def live(self, replicas: Sequence[str]) -> set[str]:
        self._s()
        return {r for r in replicas if self._lease_live(r)}

    async def read(self, users: Sequence[str]) -> dict[str, PresenceState]:
        s = self._s()
        now = s.clock()
        out: dict[str, PresenceState] = {}
        for user in users:
            entry = s.users.get(user)
            if entry is not None and entry[1] is not None and now >= entry[1]:
                del s.users[user]
                entry = None
            out[user] = NEVER_SEEN if entry is None else entry[0]
        return out

    async def held(self, shard: str) -> dict[str, set[str]]:
        return {r: set(u) for r, u in self._s().held.get(shard, {}).items()}

    async def record(self, shard: str, replica: str, *, add: Sequence[str] = (),
                     remove: Sequence[str] = (), changes: Sequence[Change] = (),
                     forget: bool = False) -> None:
        s = self._s()
        if not (add or remove or changes or forget):
            return
        by_replica = s.held.setdefault(shard, {})
        if forget:
            by_replica.pop(replica, None)
        else:
            users = by_replica.setdefault(replica, set())
            users.difference_update(remove)
            users.update(add)
        now = s.clock()
        for c in changes:
            expires = None if c.status == ONLINE else now + self._last_seen_s
            s.users[c.user] = (PresenceState(c.status, c.ts), expires)


__all__ = [
    "MAX_RECORD_BYTES",
    "MemoryCache",
    "MemoryDocumentStore",
    "MemoryEventLog",
    "MemoryLogConsumer",
    "MemoryPresenceStore",
    "MemoryPubSub",
]
