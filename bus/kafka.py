"""EventLog on Apache Kafka through aiokafka: an idempotent acks=all producer, topics, and the
factory of consumers, which are bus/kafka_consumer.py's (in a group with manual commits, or on
assigned partitions)."""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    KafkaError,
    MessageSizeTooLargeError,
    TopicAlreadyExistsError,
    for_code,
)
from aiokafka.helpers import create_ssl_context
from aiokafka.partitioner import murmur2

from bus.eventlog import Appended, EventLog, Headers, TopicSpec
from bus.lifecycle import Lifecycle
from peernet.config import KAFKA_SECURITY_PROTOCOLS, ServicesConfig
from peernet.errors import ErrorCode, PeerNetError, bad_request, unavailable

if TYPE_CHECKING:
    from bus.kafka_consumer import KafkaLogConsumer

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# What a dead or restarting broker surfaces as, besides aiokafka's own KafkaError.
_WIRE_ERRORS = (KafkaError, OSError, TimeoutError)


def _unavailable(what: str, exc: BaseException) -> PeerNetError:
    detail = str(exc) or ("no answer in time" if isinstance(exc, TimeoutError) else "")
    return unavailable(f"kafka: {what}: {type(exc).__name__}: {detail}")


async def _bounded(aw: Awaitable[_T], timeout_s: float, what: str) -> _T:
    """Await `aw` for at most `timeout_s`; any wire failure becomes PeerNetError(unavailable)."""
    try:
        async with asyncio.timeout(timeout_s):
            return await aw
    except _WIRE_ERRORS as exc:
        raise _unavailable(what, exc) from exc


@dataclass(frozen=True)
class KafkaSecurity:
    """How PeerNet's Kafka clients reach the brokers (PEERNET_KAFKA_SECURITY_PROTOCOL and
    PEERNET_KAFKA_SSL_*): PLAINTEXT, or SSL: TLS, the broker's certificate and host name checked
    against `cafile` (the system's CAs when empty), and a client certificate (`certfile`, with
    its key in `keyfile` or in the same file) for a broker that requires one."""

    protocol: str = "PLAINTEXT"
    cafile: str = ""
    certfile: str = ""
    keyfile: str = ""

    def __post_init__(self) -> None:
        if self.protocol not in KAFKA_SECURITY_PROTOCOLS:
            raise ValueError(f"kafka security protocol {self.protocol!r} is not one of "
                             f"{', '.join(KAFKA_SECURITY_PROTOCOLS)}")
        if self.keyfile and not self.certfile:
            raise ValueError("a Kafka client key (PEERNET_KAFKA_SSL_KEYFILE) needs its "
                             "certificate (PEERNET_KAFKA_SSL_CERTFILE)")

    @classmethod
    def of(cls, services: ServicesConfig) -> KafkaSecurity:
        return cls(services.kafka_security_protocol, services.kafka_ssl_cafile,
                   services.kafka_ssl_certfile, services.kafka_ssl_keyfile)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of SSL (None for PLAINTEXT); reads the files now, so that a missing
        or unreadable one fails where the client is built, not on its first connection."""
        if self.protocol != "SSL":
            return None
        return create_ssl_context(cafile=self.cafile or None, certfile=self.certfile or None,
                                  keyfile=self.keyfile or None)

    def client_options(self) -> dict[str, Any]:
        """The keyword arguments that every aiokafka client (producer, consumer, admin) takes."""
        context = self.ssl_context()
        if context is None:
            return {"security_protocol": "PLAINTEXT"}
        return {"security_protocol": "SSL", "ssl_context": context}


PLAINTEXT = KafkaSecurity()


class FailFast:
    """The fail-fast state of one event log (a circuit breaker): closed; open until a time
    after a failure; then one trial call at a time until a call succeeds."""

    def __init__(self, cooldown_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._open_until: float | None = None
        self._trial = False
        # Appends refused without trying the broker: surfaced in the gateway's metrics.
        self.refused = 0

    def admit(self) -> bool:
        """Let a call through (True when it is the trial of an open breaker) or raise
        PeerNetError(unavailable)."""
        if self._open_until is None or self.cooldown_s <= 0:
            return False
        if self._clock() >= self._open_until and not self._trial:
            self._trial = True
            return True
        self.refused += 1
        raise unavailable("kafka: the event log failed a moment ago; not tried again yet, retry")

    def done(self, trial: bool, *, ok: bool | None) -> None:
        """Record how an admitted call ended (None: it ended without an answer either way)."""
        if trial:
            self._trial = False
        if ok is None:
            return
        if ok:
            self._open_until = None
        elif self.cooldown_s > 0:
            self._open_until = self._clock() + self.cooldown_s


class KafkaEventLog(EventLog, Lifecycle):
    """EventLog on Kafka.

    One idempotent producer (acks=all, default murmur2 partitioner, so a key maps to the same
    partition from every process and client that uses Kafka's default). Every call is bounded by
    `delivery_timeout_ms`: a dead broker gives PeerNetError(unavailable), never a hang. A record
    whose append timed out may still be written later by the producer's retries (at-least-once).
    The producer survives broker restarts; if its sender dies (a fatal idempotence error) it is
    replaced on the next append.

    Fail fast (`fail_fast_ms`): once an append has failed as `unavailable`, appends are refused
    at once for that long, and then one append at a time tries the broker until one succeeds.
    A caller that processes requests in order (a gateway connection) thus answers every queued
    request within about one `delivery_timeout_ms`, not one timeout per request queued behind
    a dead broker. 0 turns it off.
    """

    def __init__(self, bootstrap: str, *, request_timeout_ms: int = 5000,
                 delivery_timeout_ms: int = 10_000, linger_ms: int = 0,
                 client_id: str = "peernet", ping_timeout_ms: int = 2000,
                 fail_fast_ms: int = 1000, commit_interval_ms: int = 0,
                 security: KafkaSecurity = PLAINTEXT) -> None:
        self._commit_interval_ms = commit_interval_ms
        # One TLS context for all of this log's clients (producer, consumers, admin).
        self._client_options = security.client_options()
        self._breaker = FailFast(fail_fast_ms / 1000)
        self._bootstrap = bootstrap
        self._request_timeout_ms = request_timeout_ms
        self._delivery_timeout_s = delivery_timeout_ms / 1000
        self._linger_ms = linger_ms
        self._client_id = client_id
        self._ping_timeout_s = ping_timeout_ms / 1000
        self._producer: AIOKafkaProducer | None = None
        self._producer_lock = asyncio.Lock()
        self._stopped = False
        # Producers replaced after their sender died: surfaced, not swallowed.
        self.producer_restarts = 0

    @property
    def bootstrap(self) -> str:
        return self._bootstrap

    async def start(self) -> None:
        """Connect the producer; PeerNetError(unavailable) if the cluster does not answer."""
        self._stopped = False
        await self._ready_producer()

    async def stop(self) -> None:
        """Flush what is pending for at most `delivery_timeout_ms`, then close: records that
        could not be flushed by then belonged to appends that already raised `unavailable`."""
        self._stopped = True
        async with self._producer_lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            await _stop_producer(producer, self._delivery_timeout_s)

    def _new_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            **self._client_options,
            client_id=self._client_id,
            acks="all",
            enable_idempotence=True,
            linger_ms=self._linger_ms,
            compression_type=None,
            request_timeout_ms=self._request_timeout_ms,
            retry_backoff_ms=100,
            partitioner=key_partitioner,
        )

    async def _ready_producer(self) -> AIOKafkaProducer:
        producer = self._producer
        if producer is not None and not _sender_dead(producer):
            return producer
        async with self._producer_lock:
            if self._stopped:
                raise unavailable("kafka: event log is stopped")
            if self._producer is not None and _sender_dead(self._producer):
                log.error("kafka producer's sender died; replacing the producer")
                self.producer_restarts += 1
                dead, self._producer = self._producer, None
                await _stop_producer(dead, 0)
            if self._producer is None:
                fresh = self._new_producer()
                try:
                    # start() bootstraps and fetches a producer id; both retry without end
                    # while the broker is away.
                    await _bounded(fresh.start(), self._delivery_timeout_s, "start producer")
                except BaseException:
                    await _stop_producer(fresh, 0)
                    raise
                self._producer = fresh
            return self._producer

    async def ensure_topics(self, specs: Sequence[TopicSpec]) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self._bootstrap, **self._client_options,
                                    client_id=f"{self._client_id}-admin",
                                    request_timeout_ms=self._request_timeout_ms)
        try:
            await _bounded(admin.start(), self._delivery_timeout_s, "admin start")
            existing = set(await _bounded(admin.list_topics(), self._delivery_timeout_s,
                                          "list topics"))
            missing = [s for s in specs if s.name not in existing]
            if missing:
                response = await _bounded(admin.create_topics([
                    NewTopic(s.name, s.partitions, s.replication_factor,
                             topic_configs=dict(s.config))
                    for s in missing
                ]), self._delivery_timeout_s, "create topics")
                for topic, code, *rest in response.topic_errors:
                    if code == 0:
                        continue
                    error = for_code(code)
                    if error is TopicAlreadyExistsError:
                        continue  # created meanwhile by another process
                    raise PeerNetError(ErrorCode.UNAVAILABLE,
                                       f"kafka: cannot create topic {topic}: {error.__name__} "
                                       f"{rest[0] if rest else ''}",
                                       retriable=bool(getattr(error, "retriable", False)))
                await self._wait_for_leaders(admin, [s.name for s in missing])
        finally:
            await _stop_quietly(admin)

    async def _wait_for_leaders(self, admin: AIOKafkaAdminClient, topics: list[str]) -> None:
        """Wait until every partition of new `topics` has a leader, so that the first append
        does not spend its time budget on metadata retries."""
        async with asyncio.timeout(self._delivery_timeout_s):
            while True:
                described = await admin.describe_topics(topics)
                if all(t["error_code"] == 0 and t["partitions"]
                       and all(p["leader"] >= 0 for p in t["partitions"]) for t in described):
                    return
                await asyncio.sleep(0.05)

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
            # The lock inside may be held by a producer start: wait for it within the deadline.
            async with asyncio.timeout_at(deadline):
                producer = await self._ready_producer()
        except TimeoutError as exc:
            raise _unavailable(f"append to {topic}: producer not ready", exc) from exc
        futures: list[asyncio.Future[Any]] = []
        try:
            async with asyncio.timeout_at(deadline):
                for key, value, headers in items:
                    futures.append(await producer.send(topic, value, key=key,
                                                       headers=list(headers)))
        except MessageSizeTooLargeError as exc:
            raise bad_request(f"kafka: record too large for {topic}: {exc}") from exc
        except _WIRE_ERRORS as exc:
            raise _unavailable(f"append to {topic}", exc) from exc
        # asyncio.wait, not wait_for: cancelling a delivery future on timeout would only hide
        # the record's fate; the producer keeps retrying it either way.
        _, pending = await asyncio.wait(futures, timeout=max(0.0, deadline - loop.time()))
        if pending:
            raise unavailable(f"kafka: {len(pending)} of {len(futures)} records to {topic} "
                              f"not acknowledged within {self._delivery_timeout_s:.1f}s")
        out: list[Appended] = []
        for fut in futures:
            failure = fut.exception()
            if isinstance(failure, MessageSizeTooLargeError):
                raise bad_request(f"kafka: record too large for {topic}: {failure}") from failure
            if failure is not None:
                raise _unavailable(f"append to {topic}", failure) from failure
            md = fut.result()
            out.append(Appended(md.topic, md.partition, md.offset))
        return out

    def consumer(self, topic: str, *, group: str | None = None,
                 partitions: Sequence[int] | None = None,
                 from_beginning: bool = True, linger_ms: int = 0) -> KafkaLogConsumer:
        from bus.kafka_consumer import KafkaLogConsumer  # which imports this module's helpers

        return KafkaLogConsumer(self._bootstrap, topic, group=group, partitions=partitions,
                                from_beginning=from_beginning, linger_ms=linger_ms,
                                request_timeout_ms=self._request_timeout_ms,
                                timeout_s=self._delivery_timeout_s,
                                client_id=self._client_id,
                                commit_interval_ms=self._commit_interval_ms,
                                client_options=self._client_options)

    async def ping(self) -> None:
        producer = self._producer
        if producer is not None and not _sender_dead(producer):
            await _bounded(producer.client.fetch_all_metadata(), self._ping_timeout_s, "ping")
            return
        admin = AIOKafkaAdminClient(bootstrap_servers=self._bootstrap, **self._client_options,
                                    client_id=f"{self._client_id}-ping",
                                    request_timeout_ms=int(self._ping_timeout_s * 1000))
        try:
            async with asyncio.timeout(self._ping_timeout_s):
                await admin.start()
                await admin.list_topics()
        except _WIRE_ERRORS as exc:
            raise _unavailable("ping", exc) from exc
        finally:
            await _stop_quietly(admin)


@functools.lru_cache(maxsize=65_536)
def _key_hash(key: bytes) -> int:
    return murmur2(key) & 0x7FFFFFFF


def key_partitioner(key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
    """aiokafka's DefaultPartitioner (Kafka's: murmur2 of the key, modulo the partitions), with
    each key's hash kept: aiokafka's murmur2 is pure Python, about 10 us for a conversation key,
    and the same conversations come again and again. A record with no key goes to a random
    available partition, as there."""
    if key is None:
        return random.choice(available or all_partitions)
    return all_partitions[_key_hash(key) % len(all_partitions)]


def _sender_dead(producer: AIOKafkaProducer) -> bool:
    # aiokafka has no public health flag: a sender task that has ended (OutOfOrderSequence,
    # an unexpected error) fails every later send, so the producer must be replaced.
    sender = getattr(producer, "_sender", None)
    task = getattr(sender, "sender_task", None)
    return task is not None and task.done()


async def _stop_producer(producer: AIOKafkaProducer, flush_s: float) -> None:
    """Stop a producer in bounded time. aiokafka's stop() waits without end for pending batches
    while the broker is away; after `flush_s` its sender is cancelled, which lets stop() close."""
    stopping = asyncio.ensure_future(producer.stop())
    try:
        await asyncio.wait_for(asyncio.shield(stopping), flush_s)
        return
    except TimeoutError:
        sender = getattr(producer, "_sender", None)
        task = getattr(sender, "sender_task", None)
        if task is not None and not task.done():
            log.warning("kafka producer: pending records not flushed within %.1fs; dropped", flush_s)
            task.cancel()
    except Exception:
        log.warning("stopping the kafka producer failed", exc_info=True)
        return
    try:
        await asyncio.wait_for(stopping, 10)
    except Exception:
        log.warning("stopping the kafka producer failed", exc_info=True)


async def _stop_quietly(client: Any) -> None:
    """Stop an aiokafka client, logging rather than raising: used on paths that already fail."""
    try:
        stop = client.close if isinstance(client, AIOKafkaAdminClient) else client.stop
        await asyncio.wait_for(stop(), 10)
    except Exception:
        log.warning("stopping %s failed", type(client).__name__, exc_info=True)
