"""EventLog on Apache Kafka through librdkafka (confluent-kafka), chosen by
PEERNET_KAFKA_CLIENT=librdkafka: the same guarantees as bus/kafka.py's aiokafka log, for a
seventh of the CPU of a session shard's cycle and half of a lone produce (bench/kafka_clients.py,
docs/benchmarks-journal.md). Its consumers are bus/librdkafka_consumer.py's."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from confluent_kafka import KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec

from bus.eventlog import Appended, EventLog, Headers, TopicSpec
from bus.kafka import PLAINTEXT, FailFast, KafkaSecurity
from bus.lifecycle import Lifecycle
from peernet.errors import ErrorCode, PeerNetError, bad_request, unavailable

if TYPE_CHECKING:
    from bus.librdkafka_consumer import RdKafkaLogConsumer

log = logging.getLogger(__name__)
# librdkafka's own log lines, served on our threads instead of written to stderr.
client_log = logging.getLogger("bus.librdkafka.client")

_T = TypeVar("_T")

# aiokafka's max_request_size, so that the two backends refuse the same records (librdkafka's
# own default is 1,000,000).
MAX_RECORD_BYTES = 1_048_576
# How long the delivery thread blocks in one poll when nothing is delivered: only how soon a
# stopped log's thread notices (a report ends the wait at once).
DELIVERY_POLL_S = 0.5
_TOO_LARGE = (KafkaError.MSG_SIZE_TOO_LARGE,)


def _unavailable(what: str, exc: BaseException) -> PeerNetError:
    detail = str(exc) or ("no answer in time" if isinstance(exc, TimeoutError) else "")
    return unavailable(f"kafka: {what}: {type(exc).__name__}: {detail}")


async def blocking(fn: Callable[..., _T], *args: Any, timeout_s: float, what: str,
                   executor: concurrent.futures.Executor | None = None) -> _T:
    """Run a blocking librdkafka call on a thread for at most `timeout_s`; a failure or no
    answer becomes PeerNetError(unavailable). The thread may go on after a timeout: librdkafka
    bounds its own calls by the timeouts each is given."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            return await loop.run_in_executor(executor, lambda: fn(*args))
    except (KafkaException, OSError, TimeoutError, RuntimeError) as exc:
        raise _unavailable(what, exc) from exc


def security_options(security: KafkaSecurity) -> dict[str, Any]:
    """librdkafka's names for KafkaSecurity: TLS checks the broker's certificate and host name
    as aiokafka's context does; a missing file fails where the client is built."""
    if security.protocol != "SSL":
        return {"security.protocol": "plaintext"}
    options: dict[str, Any] = {"security.protocol": "ssl",
                               "ssl.endpoint.identification.algorithm": "https",
                               "ssl.ca.location": security.cafile or "probe"}
    if security.certfile:
        options["ssl.certificate.location"] = security.certfile
        options["ssl.key.location"] = security.keyfile or security.certfile
    return options


class _Deliveries:
    """The producer's delivery reports, served by one thread of ours (librdkafka runs a
    producer's callbacks only inside `poll`) and settled on the event loop in one
    `call_soon_threadsafe` per poll: one wake of the loop for every report a poll brings."""

    def __init__(self, producer: Producer, loop: asyncio.AbstractEventLoop) -> None:
        self._producer = producer
        self._loop = loop
        # Appended by the callbacks, on the delivery thread or a flushing one: deque's append
        # and popleft are atomic, so none is lost between the two.
        self._reports: collections.deque[tuple[asyncio.Future[Message], KafkaError | None,
                                               Message]] = collections.deque()
        self._closing = False
        self.fatal: KafkaError | None = None
        self._thread = threading.Thread(target=self._serve, name="peernet-kafka-delivery",
                                        daemon=True)
        self._thread.start()

    def report(self, fut: asyncio.Future[Message], err: KafkaError | None, msg: Message) -> None:
        self._reports.append((fut, err, msg))

    def on_error(self, err: KafkaError) -> None:
        # A fatal error (the idempotent producer's sequence lost) fails every later send: the
        # log replaces the producer. The others (a broker away) are retried by librdkafka.
        if err.fatal():
            self.fatal = err
            log.error("kafka producer: fatal error %s", err)
        else:
            log.info("kafka producer: %s", err)

    def _serve(self) -> None:
        while not self._closing:
            self._producer.poll(DELIVERY_POLL_S)
            self.hand_over()

    def hand_over(self) -> None:
        if self._reports:
            try:
                self._loop.call_soon_threadsafe(self._settle)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

    def _settle(self) -> None:
        while self._reports:
            fut, err, msg = self._reports.popleft()
            if fut.done():
                continue
            if err is None:
                fut.set_result(msg)
            else:
                fut.set_exception(KafkaException(err))

    def close(self) -> None:
        """Let the thread end (within DELIVERY_POLL_S); reports from now on are served by
        whoever flushes."""
        self._closing = True


class RdKafkaEventLog(EventLog, Lifecycle):
    """EventLog on Kafka through librdkafka, with KafkaEventLog's guarantees and settings
    (bus/kafka.py): one idempotent producer (acks=all; murmur2 of the key like Java's and
    aiokafka's partitioner, so a key lands on the same partition whichever backend wrote it);
    every call bounded by `delivery_timeout_ms` (also librdkafka's message timeout, so a record
    is given up by then), a dead broker PeerNetError(unavailable), a record too large
    bad_request; a producer with a fatal error replaced on the next append; the same fail-fast
    breaker. Batching, protocol and retries run on librdkafka's threads."""

    def __init__(self, bootstrap: str, *, request_timeout_ms: int = 5000,
                 delivery_timeout_ms: int = 10_000, linger_ms: int = 0,
                 client_id: str = "peernet", ping_timeout_ms: int = 2000,
                 fail_fast_ms: int = 1000, commit_interval_ms: int = 0,
                 security: KafkaSecurity = PLAINTEXT) -> None:
        self._bootstrap = bootstrap
        self._request_timeout_ms = request_timeout_ms
        self._delivery_timeout_s = delivery_timeout_ms / 1000
        self._ping_timeout_s = ping_timeout_ms / 1000
        self._client_id = client_id
        self._commit_interval_ms = commit_interval_ms
        self._breaker = FailFast(fail_fast_ms / 1000)
        self._options: dict[str, Any] = {
            "bootstrap.servers": bootstrap, **security_options(security), "logger": client_log,
            # TCP_NODELAY, as asyncio (so aiokafka) sets it: a lone small request waits for no
            # ACK of the one before (measured: p99 of an awaited append 199 ms with Nagle, 47
            # without, on a loaded machine).
            "socket.nagle.disable": True}
        self._producer_options: dict[str, Any] = {
            **self._options,
            "client.id": client_id,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": linger_ms,
            "compression.type": "none",
            "request.timeout.ms": request_timeout_ms,
            "message.timeout.ms": delivery_timeout_ms,
            "retry.backoff.ms": 100,
            "message.max.bytes": MAX_RECORD_BYTES,
            "partitioner": "murmur2_random",
        }
        self._producer: tuple[Producer, _Deliveries] | None = None
        self._offsets_admin: AdminClient | None = None
        self._producer_lock = asyncio.Lock()
        self._stopped = False
        # Producers replaced after a fatal error: surfaced, not swallowed.
        self.producer_restarts = 0

    @property
    def bootstrap(self) -> str:
        return self._bootstrap

    async def start(self) -> None:
        """Make the producer and see the cluster answer; PeerNetError(unavailable) if not."""
        self._stopped = False
        await self._ready_producer()

    async def stop(self) -> None:
        """Flush what is pending for at most `delivery_timeout_ms`, then close: records that
        could not be flushed by then belonged to appends that already raised `unavailable`."""
        self._stopped = True
        async with self._producer_lock:
            current, self._producer = self._producer, None
        if current is not None:
            await _close_producer(*current, flush_s=self._delivery_timeout_s)

    async def _ready_producer(self) -> tuple[Producer, _Deliveries]:
        current = self._producer
        if current is not None and current[1].fatal is None:
            return current
        async with self._producer_lock:
            if self._stopped:
                raise unavailable("kafka: event log is stopped")
            if self._producer is not None and self._producer[1].fatal is not None:
                log.error("kafka producer failed for good (%s); replacing the producer",
                          self._producer[1].fatal)
                self.producer_restarts += 1
                dead, self._producer = self._producer, None
                await _close_producer(*dead, flush_s=0)
            if self._producer is None:
                self._producer = await self._new_producer()
            return self._producer

    async def _new_producer(self) -> tuple[Producer, _Deliveries]:
        loop = asyncio.get_running_loop()
        deliveries: _Deliveries | None = None

        def on_error(err: KafkaError) -> None:
            if deliveries is not None:
                deliveries.on_error(err)

        try:
            producer = Producer({**self._producer_options, "error_cb": on_error})
        except KafkaException as exc:
            raise _unavailable("make producer", exc) from exc
        deliveries = _Deliveries(producer, loop)
        try:
            # The producer connects in the background: a metadata request says whether the
            # cluster answers now, as aiokafka's start does.
            await blocking(producer.list_topics, None, self._delivery_timeout_s,
                           timeout_s=self._delivery_timeout_s + 1, what="start producer")
        except BaseException:
            await _close_producer(producer, deliveries, flush_s=0)
            raise
        return producer, deliveries

    async def append_many(self, topic: str,
                          items: Sequence[tuple[bytes | None, bytes, Headers]]) -> list[Appended]:
        if not items:
            return []
        trial = self._breaker.admit()  # raises unavailable while the broker is known to be away
        try:
            out = await self._append_many(topic, items)
        except PeerNetError as exc:
            self._breaker.done(trial, ok=exc.code is not ErrorCode.UNAVAILABLE)
            raise
        except BaseException:
            self._breaker.done(trial, ok=None)  # cancelled: says nothing of the broker
            raise
        self._breaker.done(trial, ok=True)
        return out

    async def _append_many(self, topic: str,
                           items: Sequence[tuple[bytes | None, bytes, Headers]]) -> list[Appended]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._delivery_timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                producer, deliveries = await self._ready_producer()
        except TimeoutError as exc:
            raise _unavailable(f"append to {topic}: producer not ready", exc) from exc
        futures: list[asyncio.Future[Message]] = []
        try:
            for key, value, headers in items:
                fut: asyncio.Future[Message] = loop.create_future()
                producer.produce(topic, value, key, headers=list(headers) or None,
                                 on_delivery=functools.partial(deliveries.report, fut))
                futures.append(fut)
        except KafkaException as exc:
            raise _refused(topic, exc.args[0]) from exc
        except BufferError as exc:  # librdkafka's queue is full: the broker is far behind
            raise _unavailable(f"append to {topic}", exc) from exc
        # asyncio.wait, not wait_for: the producer keeps retrying a record until its message
        # timeout (the same deadline) either way.
        _, pending = await asyncio.wait(futures, timeout=max(0.0, deadline - loop.time()))
        if pending:
            raise unavailable(f"kafka: {len(pending)} of {len(futures)} records to {topic} "
                              f"not acknowledged within {self._delivery_timeout_s:.1f}s")
        out: list[Appended] = []
        for done in futures:
            failure = done.exception()
            if isinstance(failure, KafkaException):
                raise _refused(topic, failure.args[0]) from failure
            msg = done.result()
            out.append(Appended(topic, msg.partition() or 0, msg.offset() or 0))
        return out

    async def ensure_topics(self, specs: Sequence[TopicSpec]) -> None:
        admin = AdminClient({**self._options, "client.id": f"{self._client_id}-admin",
                             "socket.timeout.ms": self._request_timeout_ms})
        timeout = self._delivery_timeout_s
        existing = await blocking(admin.list_topics, None, timeout, timeout_s=timeout + 1,
                                  what="list topics")
        missing = [s for s in specs if s.name not in existing.topics]
        if not missing:
            return
        created = admin.create_topics(
            [NewTopic(s.name, s.partitions, s.replication_factor, config=dict(s.config))
             for s in missing], request_timeout=timeout)
        for topic, fut in created.items():
            try:
                await asyncio.wait_for(asyncio.wrap_future(fut), timeout + 1)
            except KafkaException as exc:
                err: KafkaError = exc.args[0]
                if err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    continue  # created meanwhile by another process
                raise PeerNetError(ErrorCode.UNAVAILABLE,
                                   f"kafka: cannot create topic {topic}: {err.name()} {err.str()}",
                                   retriable=err.retriable()) from exc
            except TimeoutError as exc:
                raise _unavailable(f"create topic {topic}", exc) from exc
        await self._wait_for_leaders(admin, [s.name for s in missing])

    async def _wait_for_leaders(self, admin: AdminClient, topics: list[str]) -> None:
        """Wait until every partition of new `topics` has a leader, so that the first append
        does not spend its time budget on metadata retries."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._delivery_timeout_s
        for topic in topics:
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    raise unavailable(f"kafka: topic {topic} has no leader for every partition")
                md = (await blocking(admin.list_topics, topic, left, timeout_s=left + 1,
                                     what="describe topics")).topics.get(topic)
                if md is not None and md.error is None and md.partitions and all(
                        p.leader >= 0 for p in md.partitions.values()):
                    break
                await asyncio.sleep(0.05)

    def consumer(self, topic: str, *, group: str | None = None,
                 partitions: Sequence[int] | None = None,
                 from_beginning: bool = True, linger_ms: int = 0) -> RdKafkaLogConsumer:
        from bus.librdkafka_consumer import RdKafkaLogConsumer  # which imports this module

        return RdKafkaLogConsumer(self._options, topic, group=group, partitions=partitions,
                                  from_beginning=from_beginning, linger_ms=linger_ms,
                                  request_timeout_ms=self._request_timeout_ms,
                                  timeout_s=self._delivery_timeout_s,
                                  client_id=self._client_id,
                                  commit_interval_ms=self._commit_interval_ms,
                                  end_offsets=self.end_offsets)

    async def end_offsets(self, topic: str, partitions: Sequence[int]) -> dict[int, int]:
        """The offset after the last record of each of `partitions`, asked of the brokers by an
        admin client of this log's, made on first use: a consumer's own client would answer only
        once its poll in progress returns (up to a second), and /metrics asks the shards' lag
        with a one-second budget."""
        if not partitions:
            return {}
        if self._offsets_admin is None:
            self._offsets_admin = AdminClient({**self._options,
                                               "client.id": f"{self._client_id}-offsets"})
        timeout = self._delivery_timeout_s
        asked = self._offsets_admin.list_offsets(
            {TopicPartition(topic, p): OffsetSpec.latest() for p in partitions},
            request_timeout=timeout)
        out: dict[int, int] = {}
        try:
            async with asyncio.timeout(timeout + 1):
                for tp, fut in asked.items():
                    out[tp.partition] = (await asyncio.wrap_future(fut)).offset
        except (KafkaException, TimeoutError) as exc:
            raise _unavailable(f"end offsets of {topic}", exc) from exc
        return out

    async def ping(self) -> None:
        current = self._producer
        if current is not None and current[1].fatal is None:
            client: Producer | AdminClient = current[0]
        else:
            client = AdminClient({**self._options, "client.id": f"{self._client_id}-ping"})
        await blocking(client.list_topics, None, self._ping_timeout_s,
                       timeout_s=self._ping_timeout_s + 0.5, what="ping")


def _refused(topic: str, err: KafkaError) -> PeerNetError:
    """A record librdkafka refused or the broker failed: too large is the caller's fault
    (bad_request, as aiokafka's MessageSizeTooLargeError), anything else the log's."""
    if err.code() in _TOO_LARGE:
        return bad_request(f"kafka: record too large for {topic}: {err.str()}")
    return unavailable(f"kafka: append to {topic}: {err.name()}: {err.str()}")


async def _close_producer(producer: Producer, deliveries: _Deliveries, *, flush_s: float) -> None:
    """Flush for at most `flush_s`, drop what is left, and close, in bounded time."""
    deliveries.close()
    loop = asyncio.get_running_loop()

    def close() -> None:
        left = producer.flush(flush_s)
        deliveries.hand_over()
        if left:
            log.warning("kafka producer: %d pending records not flushed within %.1fs; dropped",
                        left, flush_s)
            producer.purge()
            producer.flush(0)  # serves the purged records' reports
            deliveries.hand_over()
        producer.close()

    try:
        await asyncio.wait_for(loop.run_in_executor(None, close), flush_s + 10)
    except Exception:
        log.warning("closing the kafka producer failed", exc_info=True)
