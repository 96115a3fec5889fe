"""The real backends across crashes and restarts of the local stack's services (SIGKILL of
Kafka, restart of Redis): what was acknowledged survives, calls fail fast while a service is
down, and the same client objects work again once it is back."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from bus_helpers import SERVICE_WAIT_S, Services, eventually, unique
from stack_faults import require_ours_running

from bus.eventlog import LogConsumer, Record, TopicSpec
from bus.kafka import KafkaEventLog
from bus.pubsub_redis import RedisPubSub
from bus.redis import RedisCache
from peernet.config import PeerNetConfig
from peernet.errors import ErrorCode, PeerNetError

pytestmark = pytest.mark.stack

DELIVERY_TIMEOUT_MS = 4000


async def _restart(manager: Any, cfg: PeerNetConfig, name: str) -> None:
    # stack.manager blocks: run it beside the loop, whose clients must keep running meanwhile.
    await asyncio.to_thread(manager.start_service, cfg, name, wait=False)
    await asyncio.to_thread(manager.wait_ready, cfg, name, SERVICE_WAIT_S)


async def _poll_until(consumer: LogConsumer, count: int, within_s: float = 30) -> list[Record]:
    """Poll until at least `count` records arrived (or `within_s` passed); then what is left."""
    got: list[Record] = []
    deadline = time.monotonic() + within_s
    while len(got) < count and time.monotonic() < deadline:
        got += await consumer.poll(timeout_ms=500)
    return got + await consumer.poll(timeout_ms=500)


async def _read_all(log: KafkaEventLog, topic: str, count: int) -> list[Record]:
    consumer = log.consumer(topic, partitions=[0])
    await consumer.start()
    try:
        return await _poll_until(consumer, count)
    finally:
        await consumer.stop()


async def test_acknowledged_event_survives_kafka_sigkill(
        bus_cfg: PeerNetConfig, services: Services, stack_control: Any) -> None:
    """(done when) an event the log acknowledged is read back after the broker is killed with
    SIGKILL and restarted; while it is down, append fails with `unavailable` in bounded time; the
    same EventLog object appends again after the restart."""
    require_ours_running(stack_control, bus_cfg, "kafka")
    log = KafkaEventLog(services.kafka_bootstrap, request_timeout_ms=2000,
                        delivery_timeout_ms=DELIVERY_TIMEOUT_MS, ping_timeout_ms=1000)
    await log.start()
    try:
        topic = unique("test.bus.crash")
        await log.ensure_topics([TopicSpec(topic, 1)])
        acked = [await log.append(topic, f"before-{i}".encode(), key=b"k") for i in range(3)]
        # A group member that lives through the crash.
        member = log.consumer(topic, group=unique("g"))
        await member.start()
        seen = [r.value for r in await _poll_until(member, 3)]
        await member.commit()
        # Clients that will be stopped while the broker is down.
        doomed = KafkaEventLog(services.kafka_bootstrap, request_timeout_ms=2000,
                               delivery_timeout_ms=2000)
        await doomed.start()
        doomed_member = doomed.consumer(topic, group=unique("g"))
        await doomed_member.start()

        await asyncio.to_thread(stack_control.stop_service, bus_cfg, "kafka", kill=True)

        t0 = time.monotonic()
        with pytest.raises(PeerNetError) as down:
            await log.append(topic, b"while-down", key=b"k")
        waited = time.monotonic() - t0
        assert down.value.code is ErrorCode.UNAVAILABLE and down.value.retriable
        assert waited < DELIVERY_TIMEOUT_MS / 1000 + 2
        # Fail fast: the next append is refused at once, not after another full timeout (a
        # gateway connection answers its queued requests in order).
        t0 = time.monotonic()
        with pytest.raises(PeerNetError) as refused:
            await log.append(topic, b"right-after", key=b"k")
        assert refused.value.code is ErrorCode.UNAVAILABLE and refused.value.retriable
        assert time.monotonic() - t0 < 0.5
        with pytest.raises(PeerNetError) as pinged:
            await log.ping()
        assert pinged.value.code is ErrorCode.UNAVAILABLE

        # Stopping never hangs on a dead broker, even with a record still pending.
        with pytest.raises(PeerNetError):
            await doomed.append(topic, b"never-flushed", key=b"k")
        t0 = time.monotonic()
        await doomed_member.stop()
        await doomed.stop()
        assert time.monotonic() - t0 < 8

        await _restart(stack_control, bus_cfg, "kafka")

        # The same object: its producer reconnects by itself (a few tries while the restarted
        # broker elects the partition's leader).
        after = None
        deadline = time.monotonic() + 30
        while after is None:
            try:
                after = await log.append(topic, b"after-restart", key=b"k")
            except PeerNetError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        await log.ping()

        values = [r.value for r in await _read_all(log, topic, 5)]
        # Everything acknowledged is there, in order, with the offsets it was given.
        assert values[:3] == [b"before-0", b"before-1", b"before-2"]
        assert [a.offset for a in acked] == [0, 1, 2]
        assert values[-1] == b"after-restart"
        # The refused append may or may not have been stored (at-least-once): never twice.
        assert values[3:-1] in ([], [b"while-down"])
        assert after.offset == len(values) - 1
        assert log.producer_restarts == 0

        # The group member polled on through the crash and reads on from where it was.
        seen += [r.value for r in await _poll_until(member, len(values) - 3)]
        assert seen == values
        await member.commit()
        await member.stop()
    finally:
        await log.stop()


async def test_redis_restart_pubsub_reconnects_and_cache_recovers(
        bus_cfg: PeerNetConfig, services: Services, stack_control: Any) -> None:
    require_ours_running(stack_control, bus_cfg, "redis")
    subscriber = RedisPubSub(services.redis_url, max_backoff_s=0.5)
    publisher = RedisPubSub(services.redis_url)
    cache = RedisCache(services.redis_url, socket_timeout_s=1.0)
    await subscriber.start()
    await publisher.start()
    await cache.start()
    try:
        channel = unique("test:restart")
        got: list[bytes] = []
        reconnected: list[int] = []
        subscriber.on_reconnect(lambda: reconnected.append(len(got)))
        await subscriber.subscribe(channel, lambda ch, p: got.append(p))
        await publisher.publish(channel, b"before")
        await eventually(lambda: got == [b"before"])

        await asyncio.to_thread(stack_control.stop_service, bus_cfg, "redis")
        with pytest.raises(PeerNetError) as down:
            await cache.ping()
        assert down.value.code is ErrorCode.UNAVAILABLE
        with pytest.raises(PeerNetError):
            await publisher.publish(channel, b"lost")

        await _restart(stack_control, bus_cfg, "redis")
        await eventually(lambda: reconnected, within_s=15)
        assert subscriber.reconnects == 1
        assert subscriber.connection_errors >= 1
        await cache.ping()
        assert await publisher.publish(channel, b"after") == 1
        await eventually(lambda: got == [b"before", b"after"])
    finally:
        await cache.stop()
        await publisher.stop()
        await subscriber.stop()
