"""`python -m bench.kafka_clients`: the client-side CPU per message of aiokafka (as bus/kafka.py and
bus/kafka_consumer.py configure it) against confluent-kafka (librdkafka), on a running Kafka, to
decide whether a librdkafka EventLog is worth building (issue 17: only if it at least halves it).

The CPU is this process's, every thread (getrusage RUSAGE_SELF, user + sys), so librdkafka's own
threads count. Records a case consumes come from a feeder in a separate process, whose CPU does
not count. Each case gets its own topics (`bench.kc.<pid>.*`, 8 partitions like PeerNet's),
deleted at the end. The clients alternate within each round.

Cases:
- produce-low: ~300 B keyed records with headers, acks=all, idempotent, awaited one at a time at
  `--rate` a second (the gateway at low load; its linger of 2 ms);
- produce-high: the same in batches of 100 sent before any is awaited, as fast as they go;
- consume-trickle: a group consumer, records arriving one at a time at `--rate` a second, from
  fetch to the record in the app's hands;
- consume-burst: the same, records arriving 1,000 at once each second;
- cycle: the session shard's: poll, produce what came (acks=all, linger 0) and await it, commit
  (held back to once a second, as PEERNET_KAFKA_COMMIT_INTERVAL_MS), records arriving at `--rate`;
- idle: a started producer and a group consumer polled with a 1 s timeout (a shard's loop), for
  `--seconds` with nothing to read: its figure is microseconds of CPU per second, not per message.

This module imports Kafka clients itself (the one bench module allowed to, .importlinter), and
nothing of bus/: the settings below are copied from there.

One module of about 700 lines: a program of its own whose cases share the two clients' set-up,
the pacing loop and the CPU accounting, and read best one after another.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import functools
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

Headers = list[tuple[str, str | bytes | None]]
Item = tuple[bytes, bytes, Headers]
# (topic, partition, offset, key, value, headers, timestamp): what bus/ makes of a record.
Rec = tuple[str, int, int, bytes | None, bytes, tuple[tuple[str, bytes], ...], int]

PARTITIONS = 8
HIGH_BATCH = 100
HIGH_TOTAL = 20_000
BURST = 1_000
COMMIT_INTERVAL_S = 1.0  # PEERNET_KAFKA_COMMIT_INTERVAL_MS
GATEWAY_LINGER_MS = 2  # PEERNET_GATEWAY_LINGER_MS
CASES = ("produce-low", "produce-high", "consume-trickle", "consume-burst", "cycle", "idle")
CLIENTS = ("aiokafka", "rdk", "rdk-aio")
# A producer that sends nothing: what pacing sends at a low rate costs by itself (a timer's wake
# per send), to be taken from the others' produce-low figures. Not a consumer.
NULL = "none"


def cpu_s() -> float:
    """This process's CPU time, every thread, user + sys."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def broker_cpu_s(pid: int | None) -> float:
    """The broker's CPU (shared with every other user of it: a rough figure)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def find_broker() -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if b"kafka.Kafka" in (entry / "cmdline").read_bytes():
                    return int(entry.name)
    return None


def make_items(n: int, seed: int) -> list[Item]:
    """Keyed records of about 300 bytes with one header, like a DM event."""
    rnd = random.Random(seed)
    out: list[Item] = []
    for _ in range(n):
        key = f"c:{rnd.randrange(500):04d}".encode()
        out.append((key, rnd.randbytes(280), [("r", b"u:0001,u:0002")]))
    return out


# ---- aiokafka, configured as bus/kafka.py and bus/kafka_consumer.py do ----

class Producer(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def append_many(self, topic: str, items: Sequence[Item]) -> None: ...


class Consumer(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def poll(self, max_records: int, timeout_ms: int) -> list[Rec]: ...
    async def commit(self) -> None: ...


@functools.lru_cache(maxsize=65_536)
def _key_hash(key: bytes) -> int:
    from aiokafka.partitioner import murmur2

    return int(murmur2(key)) & 0x7FFFFFFF


def _key_partitioner(key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
    if key is None:
        return random.choice(available or all_partitions)
    return all_partitions[_key_hash(key) % len(all_partitions)]


class AioProducer:
    def __init__(self, bootstrap: str, linger_ms: int) -> None:
        from aiokafka import AIOKafkaProducer

        self._p = AIOKafkaProducer(
            bootstrap_servers=bootstrap, client_id="bench-kc", acks="all",
            enable_idempotence=True, linger_ms=linger_ms, compression_type=None,
            request_timeout_ms=5000, retry_backoff_ms=100, partitioner=_key_partitioner)

    async def start(self) -> None:
        await self._p.start()

    async def stop(self) -> None:
        await self._p.stop()

    async def append_many(self, topic: str, items: Sequence[Item]) -> None:
        futures = [await self._p.send(topic, v, key=k, headers=list(h)) for k, v, h in items]
        await asyncio.wait(futures, timeout=10)
        for f in futures:
            f.result()


class AioConsumer:
    def __init__(self, bootstrap: str, topic: str, group: str) -> None:
        from aiokafka import AIOKafkaConsumer

        self._topic = topic
        self._c = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, client_id="bench-kc-consumer", group_id=group,
            enable_auto_commit=False, auto_offset_reset="earliest", request_timeout_ms=5000,
            fetch_max_wait_ms=500, fetch_min_bytes=1, session_timeout_ms=10_000,
            heartbeat_interval_ms=1_000, isolation_level="read_uncommitted")
        self._uncommitted: dict[int, int] = {}
        self._last_commit = 0.0

    async def start(self) -> None:
        self._c.subscribe([self._topic])
        await self._c.start()
        while not self._c.assignment():
            await self._c.getmany(timeout_ms=100)

    async def stop(self) -> None:
        await self._c.stop()

    async def poll(self, max_records: int, timeout_ms: int) -> list[Rec]:
        batches = await self._c.getmany(timeout_ms=timeout_ms, max_records=max_records)
        out: list[Rec] = []
        for tp in sorted(batches, key=lambda t: t.partition):
            msgs = batches[tp]
            out.extend((m.topic, m.partition, m.offset, m.key, m.value or b"",
                        tuple((k, bytes(v)) for k, v in (m.headers or ())), m.timestamp)
                       for m in msgs)
            if msgs:
                self._uncommitted[tp.partition] = msgs[-1].offset + 1
        return out

    async def commit(self) -> None:
        from aiokafka import TopicPartition

        if not self._uncommitted or time.monotonic() - self._last_commit < COMMIT_INTERVAL_S:
            return
        offsets = {TopicPartition(self._topic, p): o for p, o in self._uncommitted.items()}
        self._uncommitted.clear()
        await self._c.commit(offsets)
        self._last_commit = time.monotonic()


# ---- confluent-kafka, the same settings in librdkafka's names ----

def rdk_producer_conf(bootstrap: str, linger_ms: int) -> dict[str, Any]:
    return {"bootstrap.servers": bootstrap, "client.id": "bench-kc", "acks": "all",
            "enable.idempotence": True, "linger.ms": linger_ms, "compression.type": "none",
            "request.timeout.ms": 5000, "retry.backoff.ms": 100, "message.timeout.ms": 10_000,
            # Java's (and aiokafka's) partitioner: murmur2 of the key, random without one.
            "partitioner": "murmur2_random"}


def rdk_consumer_conf(bootstrap: str, group: str) -> dict[str, Any]:
    return {"bootstrap.servers": bootstrap, "client.id": "bench-kc-consumer", "group.id": group,
            "enable.auto.commit": False, "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 500, "fetch.min.bytes": 1, "session.timeout.ms": 10_000,
            "heartbeat.interval.ms": 1_000, "isolation.level": "read_uncommitted",
            "socket.timeout.ms": 5000}


def _rec(m: Any) -> Rec:
    return (m.topic(), m.partition(), m.offset(), m.key(), m.value() or b"",
            tuple(m.headers() or ()), m.timestamp()[1])


class RdkProducer:
    """Producer.produce with delivery reports served by one thread of ours (poll), which hands
    each poll's reports to the loop in one call_soon_threadsafe."""

    def __init__(self, bootstrap: str, linger_ms: int) -> None:
        from confluent_kafka import Producer

        self._p = Producer(rdk_producer_conf(bootstrap, linger_ms))
        self._loop = asyncio.get_running_loop()
        self._done: list[tuple[asyncio.Future[None], Any]] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="rdk-delivery", daemon=True)

    async def start(self) -> None:
        self._thread.start()
        # The first produce waits for the producer id otherwise.
        await self._loop.run_in_executor(None, self._p.list_topics, None, 10)

    async def stop(self) -> None:
        self._stopping = True
        await self._loop.run_in_executor(None, self._p.flush, 10)
        await self._loop.run_in_executor(None, self._thread.join)

    def _serve(self) -> None:
        while not self._stopping:
            self._p.poll(0.5)
            if self._done:
                done, self._done = self._done, []
                self._loop.call_soon_threadsafe(_settle, done)

    def _delivered(self, fut: asyncio.Future[None], err: Any, _msg: Any) -> None:
        self._done.append((fut, err))  # in the delivery thread; settled on the loop

    async def append_many(self, topic: str, items: Sequence[Item]) -> None:
        futures = []
        for k, v, h in items:
            fut = self._loop.create_future()
            self._p.produce(topic, v, k, headers=h,
                            on_delivery=functools.partial(self._delivered, fut))
            futures.append(fut)
        for fut in futures:
            await fut


def _settle(done: list[tuple[asyncio.Future[None], Any]]) -> None:
    for fut, err in done:
        if err is None:
            fut.set_result(None)
        else:
            fut.set_exception(RuntimeError(str(err)))


class RdkConsumer:
    """Consumer.consume in one worker thread of ours, so the loop never blocks."""

    def __init__(self, bootstrap: str, topic: str, group: str) -> None:
        from confluent_kafka import Consumer

        self._topic = topic
        self._c = Consumer(rdk_consumer_conf(bootstrap, group))
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rdk-consume")
        self._uncommitted: dict[int, int] = {}
        self._last_commit = 0.0

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def start(self) -> None:
        self._c.subscribe([self._topic])
        while not await self._call(self._c.assignment):
            await self._call(self._c.consume, 1, 0.1)  # nothing is produced before start returns

    async def stop(self) -> None:
        await self._call(self._c.close)
        self._pool.shutdown()

    def _consume(self, max_records: int, timeout_s: float) -> list[Rec]:
        # poll returns with the first record; consume(n, t) would wait out t unless n came.
        first = self._c.poll(timeout_s)
        if first is None:
            return []
        out = []
        for m in [first, *self._c.consume(max_records - 1, 0)]:
            if m.error() is None:
                out.append(_rec(m))
        return out

    async def poll(self, max_records: int, timeout_ms: int) -> list[Rec]:
        out: list[Rec] = await self._call(self._consume, max_records, timeout_ms / 1000)
        for r in out:
            self._uncommitted[r[1]] = r[2] + 1
        return out

    async def commit(self) -> None:
        from confluent_kafka import TopicPartition

        if not self._uncommitted or time.monotonic() - self._last_commit < COMMIT_INTERVAL_S:
            return
        offsets = [TopicPartition(self._topic, p, o) for p, o in self._uncommitted.items()]
        self._uncommitted.clear()
        await self._call(functools.partial(self._c.commit, offsets=offsets, asynchronous=False))
        self._last_commit = time.monotonic()


class RdkAioProducer:
    """confluent_kafka.aio.AIOProducer: it takes no headers (they are dropped here, which
    flatters it) and serves delivery reports only on a later produce, poll or flush, so an
    awaited send needs a flush of its own."""

    def __init__(self, bootstrap: str, linger_ms: int) -> None:
        self._conf = rdk_producer_conf(bootstrap, linger_ms)
        self._p: Any = None

    async def start(self) -> None:
        from confluent_kafka.aio import AIOProducer

        self._p = AIOProducer(self._conf, batch_size=HIGH_BATCH, buffer_timeout=0)
        await self._p.list_topics(None, 10)

    async def stop(self) -> None:
        await self._p.close()

    async def append_many(self, topic: str, items: Sequence[Item]) -> None:
        futures = [await self._p.produce(topic, v, k) for k, v, _h in items]
        await self._p.flush()
        for fut in futures:
            await fut


class RdkAioConsumer(RdkConsumer):
    """confluent_kafka.aio.AIOConsumer.consume (its executor, its reentrancy gate)."""

    def __init__(self, bootstrap: str, topic: str, group: str) -> None:
        self._topic = topic
        self._conf = rdk_consumer_conf(bootstrap, group)
        self._uncommitted = {}
        self._last_commit = 0.0
        self._a: Any = None

    async def start(self) -> None:
        from confluent_kafka.aio import AIOConsumer

        self._a = AIOConsumer(self._conf, max_workers=2)
        await self._a.subscribe([self._topic])
        while not await self._a.assignment():
            await self._a.consume(1, 0.1)

    async def stop(self) -> None:
        await self._a.close()

    async def poll(self, max_records: int, timeout_ms: int) -> list[Rec]:
        first = await self._a.poll(timeout_ms / 1000)
        if first is None:
            return []
        msgs = [first, *await self._a.consume(max_records - 1, 0)]
        out = [_rec(m) for m in msgs if m.error() is None]
        for r in out:
            self._uncommitted[r[1]] = r[2] + 1
        return out

    async def commit(self) -> None:
        from confluent_kafka import TopicPartition

        if not self._uncommitted or time.monotonic() - self._last_commit < COMMIT_INTERVAL_S:
            return
        offsets = [TopicPartition(self._topic, p, o) for p, o in self._uncommitted.items()]
        self._uncommitted.clear()
        await self._a.commit(offsets=offsets, asynchronous=False)
        self._last_commit = time.monotonic()


class NullProducer:
    def __init__(self, bootstrap: str, linger_ms: int) -> None:
        pass

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def append_many(self, topic: str, items: Sequence[Item]) -> None:
        pass


def new_producer(client: str, bootstrap: str, linger_ms: int) -> Producer:
    kinds: dict[str, Callable[[str, int], Producer]] = {
        "aiokafka": AioProducer, "rdk": RdkProducer, "rdk-aio": RdkAioProducer, NULL: NullProducer}
    kind = kinds[client]
    return kind(bootstrap, linger_ms)


def new_consumer(client: str, bootstrap: str, topic: str, group: str) -> Consumer:
    kinds: dict[str, Callable[[str, str, str], Consumer]] = {
        "aiokafka": AioConsumer, "rdk": RdkConsumer, "rdk-aio": RdkAioConsumer}
    kind = kinds[client]
    return kind(bootstrap, topic, group)


# ---- the cases ----

@dataclass(frozen=True)
class Result:
    case: str
    client: str
    round: int
    messages: int
    wall_s: float
    cpu_s: float
    broker_cpu_s: float

    @property
    def us_per_msg(self) -> float:
        return self.cpu_s / self.messages * 1e6


class Feeder:
    """A separate process that produces what a consuming case reads, started before the
    measurement and told when to go."""

    def __init__(self, bootstrap: str, topic: str, pattern: str, count: int, rate: float) -> None:
        self._args = [sys.executable, "-m", "bench.kafka_clients", "feed", "--bootstrap", bootstrap,
                      "--topic", topic, "--pattern", pattern, "--count", str(count),
                      "--rate", str(rate)]
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Feeder:
        self._proc = subprocess.Popen(self._args, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self._proc.stdout is not None
        if self._proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("feeder did not start")
        return self

    def go(self) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(b"go\n")
        self._proc.stdin.flush()

    def __exit__(self, *_: object) -> None:
        if self._proc is not None:
            try:
                self._proc.wait(60)
            except subprocess.TimeoutExpired:
                self._proc.kill()


def feed(bootstrap: str, topic: str, pattern: str, count: int, rate: float) -> None:
    from confluent_kafka import Producer

    p = Producer(rdk_producer_conf(bootstrap, 0))
    p.list_topics(topic, 10)
    items = make_items(count, 7)
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.monotonic()
    if pattern == "trickle":
        for i, (k, v, h) in enumerate(items):
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
            p.produce(topic, v, k, headers=h)
            p.poll(0)
    else:
        for b in range(0, count, BURST):
            time.sleep(max(0.0, start + b / BURST - time.monotonic()))
            for k, v, h in items[b:b + BURST]:
                p.produce(topic, v, k, headers=h)
            p.poll(0)
    p.flush(30)


async def measure(run: Callable[[], Awaitable[int]], broker: int | None,
                  case: str, client: str, rnd: int) -> Result:
    c0, b0, t0 = cpu_s(), broker_cpu_s(broker), time.monotonic()
    n = await run()
    return Result(case, client, rnd, n, time.monotonic() - t0, cpu_s() - c0,
                  broker_cpu_s(broker) - b0)


async def case_produce(client: str, bootstrap: str, topic: str, low: bool, rate: float,
                       seconds: float, broker: int | None, rnd: int) -> Result:
    producer = new_producer(client, bootstrap, GATEWAY_LINGER_MS)
    await producer.start()
    try:
        await producer.append_many(topic, make_items(20, 1))  # connections, producer id
        if low:
            items = make_items(int(rate * seconds), 2)

            async def run() -> int:
                start = time.monotonic()
                for i, item in enumerate(items):
                    await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
                    await producer.append_many(topic, [item])
                return len(items)
        else:
            items = make_items(HIGH_TOTAL, 3)

            async def run() -> int:
                for b in range(0, len(items), HIGH_BATCH):
                    await producer.append_many(topic, items[b:b + HIGH_BATCH])
                return len(items)

        return await measure(run, broker, "produce-low" if low else "produce-high", client, rnd)
    finally:
        await producer.stop()


async def case_consume(client: str, bootstrap: str, topic: str, group: str, burst: bool,
                       rate: float, seconds: float, broker: int | None, rnd: int,
                       cycle_out: str | None = None) -> Result:
    count = int(BURST * seconds) if burst else int(rate * seconds)
    consumer = new_consumer(client, bootstrap, topic, group)
    producer = new_producer(client, bootstrap, 0) if cycle_out else None
    await consumer.start()
    if producer is not None:
        await producer.start()
        await producer.append_many(cycle_out or "", make_items(20, 1))
    try:
        with Feeder(bootstrap, topic, "burst" if burst else "trickle", count, rate) as feeder:
            async def run() -> int:
                feeder.go()
                got = 0
                while got < count:
                    records = await consumer.poll(500, 1000)
                    got += len(records)
                    if producer is not None and records:
                        await producer.append_many(cycle_out or "",
                                                   [(r[3] or b"", r[4], list(r[5])) for r in records])
                    await consumer.commit()
                return got

            case = "cycle" if cycle_out else ("consume-burst" if burst else "consume-trickle")
            return await measure(run, broker, case, client, rnd)
    finally:
        await consumer.stop()
        if producer is not None:
            await producer.stop()


async def case_idle(client: str, bootstrap: str, topic: str, group: str, seconds: float,
                    broker: int | None, rnd: int) -> Result:
    producer = new_producer(client, bootstrap, 0)
    consumer = new_consumer(client, bootstrap, topic, group)
    await producer.start()
    await consumer.start()
    try:
        await asyncio.sleep(2)  # the group's first heartbeats and metadata are not idle

        async def run() -> int:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                await consumer.poll(500, 1000)
            return round(seconds)  # "messages": seconds, so the figure is CPU per second

        return await measure(run, broker, "idle", client, rnd)
    finally:
        await consumer.stop()
        await producer.stop()


class Topics:
    """This run's topics, created on demand and deleted at the end."""

    def __init__(self, bootstrap: str) -> None:
        from confluent_kafka.admin import AdminClient

        self._admin = AdminClient({"bootstrap.servers": bootstrap})
        self.prefix = f"bench.kc.{os.getpid()}"
        self.made: list[str] = []

    def new(self, name: str) -> str:
        from confluent_kafka.admin import NewTopic

        topic = f"{self.prefix}.{name}"
        for fut in self._admin.create_topics([NewTopic(topic, PARTITIONS, 1)]).values():
            fut.result(30)
        self.made.append(topic)
        for _ in range(100):  # until every partition has a leader
            md = self._admin.list_topics(topic, 10).topics[topic]
            if md.error is None and len(md.partitions) == PARTITIONS and all(
                    p.leader >= 0 for p in md.partitions.values()):
                break
            time.sleep(0.05)
        return topic

    def delete_all(self) -> None:
        if self.made:
            for fut in self._admin.delete_topics(self.made).values():
                with contextlib.suppress(Exception):
                    fut.result(30)


async def one(case: str, client: str, rnd: int, topics: Topics, args: argparse.Namespace,
              broker: int | None) -> Result:
    tag = f"{case}.{client}.{rnd}"
    if case.startswith("produce"):
        return await case_produce(client, args.bootstrap, topics.new(tag), case == "produce-low",
                                  args.rate, args.seconds, broker, rnd)
    group = f"{topics.prefix}.{tag}"
    if case == "idle":
        return await case_idle(client, args.bootstrap, topics.new(tag), group, args.seconds,
                               broker, rnd)
    out = topics.new(f"{tag}.out") if case == "cycle" else None
    return await case_consume(client, args.bootstrap, topics.new(tag), group,
                              case == "consume-burst", args.rate, args.seconds, broker, rnd,
                              cycle_out=out)


def render(results: list[Result], cases: Sequence[str], clients: Sequence[str]) -> str:
    lines = ["| case | " + " | ".join(f"{c}, us/msg (rounds)" for c in clients) + " |",
             "|---|" + "---:|" * len(clients)]
    for case in cases:
        cells = []
        for client in clients:
            got = [r.us_per_msg for r in results if r.case == case and r.client == client]
            if got:
                rounds = ", ".join(f"{u:.0f}" for u in got)
                cells.append(f"**{statistics.median(got):.0f}** ({rounds})")
            else:
                cells.append("-")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> list[Result]:
    cases = args.cases.split(",")
    clients = args.clients.split(",")
    broker = find_broker()
    topics = Topics(args.bootstrap)
    results: list[Result] = []
    try:
        for rnd in range(1, args.rounds + 1):
            for case in cases:
                # Alternate which client goes first, so a drift of the shared machine is spread.
                order = clients if rnd % 2 else list(reversed(clients))
                if case == "produce-low":
                    order = [NULL, *order]
                for client in order:
                    r = await one(case, client, rnd, topics, args, broker)
                    results.append(r)
                    print(f"round {rnd} {case:16} {client:9} {r.messages:6} msgs "
                          f"{r.wall_s:6.1f} s  {r.us_per_msg:7.0f} us/msg  "
                          f"(broker {r.broker_cpu_s / r.messages * 1e6:.0f} us/msg)", flush=True)
    finally:
        topics.delete_all()
        print(f"deleted the topics {topics.prefix}.*", flush=True)
    print()
    print(render(results, cases, [NULL, *clients]))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kafka_clients", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="bench", choices=("bench", "feed"))
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--clients", default=",".join(CLIENTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=100.0, help="records a second, low-rate cases")
    parser.add_argument("--seconds", type=float, default=6.0, help="length of a low-rate case")
    parser.add_argument("--json", type=Path, help="write every round's figures here")
    parser.add_argument("--topic", help="feed mode: the topic")
    parser.add_argument("--pattern", choices=("trickle", "burst"), default="trickle")
    parser.add_argument("--count", type=int, default=0)
    args = parser.parse_args(argv)
    if args.mode == "feed":
        feed(args.bootstrap, args.topic, args.pattern, args.count, args.rate)
        return 0
    if bad := set(args.cases.split(",")) - set(CASES):
        parser.error(f"unknown cases {sorted(bad)}")
    if bad := set(args.clients.split(",")) - set(CLIENTS):
        parser.error(f"unknown clients {sorted(bad)}")
    results = asyncio.run(main_async(args))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) | {"us_per_msg": r.us_per_msg}
                                         for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
