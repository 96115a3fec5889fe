"""The event log on a Kafka cluster of three brokers (issue 8: several bootstrap brokers, topics
with the configured replication): PeerNet creates its topics with 3 replicas and
min.insync.replicas 2, nothing it acknowledged is lost when a partition's leader is SIGKILLed,
and with one broker of three left an append is refused in bounded time.

The cluster is three KRaft nodes (each broker and controller) on free ports of 127.0.0.1, run
from the Kafka jars the local stack installed (stack/kafka.py), each with its own log dir under
pytest's tmp_path; the project's own broker (9092/9093) is not touched."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from bus_helpers import unique
from kafka_nodes import require_kafka, start_node
from ports import free_ports

from bus.eventlog import Appended, TopicSpec
from bus.kafka import KafkaEventLog
from bus.topics import peernet_topics
from peernet.config import PeerNetConfig, load_config
from peernet.errors import ErrorCode, PeerNetError
from stack import kafka as stack_kafka
from stack.process import tail

pytestmark = pytest.mark.stack

BROKERS = 3
# A JVM on a busy 2-core machine: three of them starting at once may take this long.
START_TIMEOUT_S = 150.0
PARTITIONS = 3
KEYS = [f"user-{i}".encode() for i in range(4)]


@dataclass
class Node:
    node_id: int
    port: int
    controller_port: int
    home: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def props(self) -> Path:
        return self.home / "server.properties"

    @property
    def log(self) -> Path:
        return self.home / "kafka.log"

    @property
    def console(self) -> Path:
        return self.home / "console.log"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the node's whole process group (the JVM and anything it started)."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@dataclass
class Cluster:
    nodes: dict[int, Node] = field(default_factory=dict)

    @property
    def bootstrap(self) -> str:
        """Every broker, comma-separated: what PEERNET_KAFKA_BOOTSTRAP holds on a cluster."""
        return ",".join(f"127.0.0.1:{n.port}" for n in self.nodes.values())

    def alive(self) -> list[int]:
        return [i for i, n in self.nodes.items() if n.alive()]

    def logs(self) -> str:
        return "\n".join(f"--- node {i} ({n.log}):\n{tail(n.log, 15)}\n{tail(n.console, 5)}"
                         for i, n in self.nodes.items())


def _start(cfg: PeerNetConfig, node: Node) -> None:
    node.proc = start_node(cfg, node.props, node.home, node.log, node.console)


def _format_all(cfg: PeerNetConfig, cluster: Cluster, cluster_id: str) -> None:
    procs = []
    for node in cluster.nodes.values():
        with open(node.console, "ab") as console:
            procs.append((node, subprocess.Popen(
                stack_kafka.format_argv(cfg, node.props, cluster_id, node.home / "format.log",
                                        standalone=False),
                cwd=node.home, stdin=subprocess.DEVNULL, stdout=console,
                stderr=subprocess.STDOUT, start_new_session=True)))
    for node, proc in procs:
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = -1
        if code != 0:
            pytest.fail(f"formatting node {node.node_id} failed ({code}):\n{tail(node.console, 20)}")


async def _admin(bootstrap: str, timeout_ms: int = 5000) -> AIOKafkaAdminClient:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=timeout_ms)
    try:
        await asyncio.wait_for(admin.start(), timeout_ms / 1000)
    except BaseException:
        await admin.close()
        raise
    return admin


async def _wait_for_brokers(cluster: Cluster, count: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    last: object = None
    while time.monotonic() < deadline:
        dead = [i for i, n in cluster.nodes.items() if n.proc is not None and not n.alive()]
        if dead:
            pytest.fail(f"kafka node(s) {dead} exited while starting:\n{cluster.logs()}")
        try:
            admin = await _admin(cluster.bootstrap)
            try:
                info = await admin.describe_cluster()
            finally:
                await admin.close()
            last = info
            if len(info["brokers"]) == count and info["controller_id"] >= 0:
                return
        except Exception as exc:  # not up yet
            last = exc
        await asyncio.sleep(1.0)
    pytest.fail(f"{count} brokers not up within {START_TIMEOUT_S:.0f}s (last: {last!r}):\n"
                f"{cluster.logs()}")


@pytest.fixture(scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    """Three KRaft nodes from the jars `peernet stack up` installed; all SIGKILLed at the end."""
    cfg = load_config()
    require_kafka(cfg)
    root = tmp_path_factory.mktemp("kafka-cluster")
    ports = free_ports(2 * BROKERS)
    cluster = Cluster()
    for i in range(1, BROKERS + 1):
        home = root / f"node-{i}"
        home.mkdir()
        cluster.nodes[i] = Node(i, ports[2 * i - 2], ports[2 * i - 1], home)
    voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in cluster.nodes.values())
    for node in cluster.nodes.values():
        node.props.write_text("\n".join(stack_kafka.kraft_node_properties(
            node_id=node.node_id, port=node.port, controller_port=node.controller_port,
            quorum=f"controller.quorum.voters={voters}", log_dir=node.home / "data",
            replicas=BROKERS)) + "\n")
    aiokafka_log = logging.getLogger("aiokafka")
    level = aiokafka_log.level
    # Every refused connection to a dead broker is logged at ERROR: noise here, by design.
    aiokafka_log.setLevel(logging.CRITICAL)
    try:
        await asyncio.to_thread(_format_all, cfg, cluster, stack_kafka.new_cluster_id())
        for node in cluster.nodes.values():
            _start(cfg, node)
        t0 = time.monotonic()
        await _wait_for_brokers(cluster, BROKERS)
        print(f"\n{BROKERS} brokers up in {time.monotonic() - t0:.1f}s: {cluster.bootstrap}")
        yield cluster
    finally:
        for node in cluster.nodes.values():
            node.kill()
        aiokafka_log.setLevel(level)


@dataclass(frozen=True)
class Topics:
    cfg: PeerNetConfig
    specs: list[TopicSpec]

    @property
    def events(self) -> str:
        return self.cfg.topics.events


def _event_log(cfg: PeerNetConfig, *, request_timeout_ms: int = 5000,
               delivery_timeout_ms: int = 10_000) -> KafkaEventLog:
    # As bus/backends.py opens it from the configuration (timeouts: the code's defaults).
    s = cfg.services
    return KafkaEventLog(s.kafka_bootstrap, client_id=unique("test-replicated"),
                         fail_fast_ms=s.kafka_fail_fast_ms,
                         commit_interval_ms=s.kafka_commit_interval_ms,
                         request_timeout_ms=request_timeout_ms,
                         delivery_timeout_ms=delivery_timeout_ms)


@pytest.fixture(scope="module")
async def topics(cluster: Cluster) -> Topics:
    """PeerNet's topics, created by its own code from the settings a cluster deployment uses."""
    cfg = load_config({
        "PEERNET_KAFKA_BOOTSTRAP": cluster.bootstrap,
        "PEERNET_KAFKA_REPLICATION": str(BROKERS),
        "PEERNET_EVENTS_TOPIC": unique("test.replicated.events"),
        "PEERNET_EVENTS_PARTITIONS": str(PARTITIONS),
        "PEERNET_MESSAGES_TOPIC": unique("test.replicated.messages"),
        "PEERNET_MESSAGES_PARTITIONS": str(PARTITIONS),
        "PEERNET_INBOX_TOPIC": unique("test.replicated.inbox"),
        "PEERNET_INBOX_PARTITIONS": str(PARTITIONS),
    })
    assert cfg.services.kafka_external and cfg.services.kafka_bootstrap == cluster.bootstrap
    specs = peernet_topics(cfg)
    log = _event_log(cfg)
    await log.start()
    try:
        await log.ensure_topics(specs)
    finally:
        await log.stop()
    return Topics(cfg, specs)


# How long a broker may take to learn a topic's metadata from the controller.
METADATA_WAIT_S = 30.0


async def _describe(bootstrap: str, topic: str) -> dict[int, dict[str, Any]]:
    """partition -> its metadata (leader, replicas, isr) as the cluster reports it.

    Brokers learn new topics from the controller asynchronously: PeerNet's `ensure_topics`
    returns when the broker its admin client asked knows every leader, and a fresh admin client
    may ask another broker that does not know the topic yet (UNKNOWN_TOPIC_OR_PARTITION, seen in
    CI). So this asks again until the topic is known with all its partitions, within
    METADATA_WAIT_S."""
    deadline = time.monotonic() + METADATA_WAIT_S
    while True:
        admin = await _admin(bootstrap)
        try:
            (described,) = await admin.describe_topics([topic])
        finally:
            await admin.close()
        if (described["error_code"] == 0 and len(described["partitions"]) == PARTITIONS) or (
                time.monotonic() > deadline):
            break
        await asyncio.sleep(0.2)
    assert described["error_code"] == 0, described
    return {p["partition"]: p for p in described["partitions"]}


async def test_topics_have_three_replicas_and_min_insync_two(cluster: Cluster,
                                                             topics: Topics) -> None:
    names = [s.name for s in topics.specs]
    for name in names:
        partitions = await _describe(cluster.bootstrap, name)
        assert len(partitions) == PARTITIONS
        for p in partitions.values():
            assert sorted(p["replicas"]) == [1, 2, 3], p
            assert sorted(p["isr"]) == [1, 2, 3], p
    admin = await _admin(cluster.bootstrap)
    try:
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, n, configs={"min.insync.replicas": None})
             for n in names])
    finally:
        await admin.close()
    found: dict[str, str] = {}
    for response in responses:
        for resource in response.to_object()["resources"]:
            assert resource["error_code"] == 0, resource
            for entry in resource["config_entries"]:
                if entry["config_names"] == "min.insync.replicas":
                    found[resource["resource_name"]] = entry["config_value"]
    assert found == dict.fromkeys(names, "2")


@dataclass
class Writer:
    """Appends `key`-0, `key`-1, ... one at a time; an append that fails is retried with the
    same value (a client resends what was not acknowledged), so each value is acknowledged once."""

    key: bytes
    # (value, where, when acknowledged)
    acked: list[tuple[bytes, Appended, float]] = field(default_factory=list)
    # How long each acknowledged append took, with when it was started.
    waits: list[tuple[float, float]] = field(default_factory=list)
    # (when, message) of every append that raised `unavailable`
    failed: list[tuple[float, str]] = field(default_factory=list)

    def acked_after(self, t: float) -> int:
        return sum(1 for *_, at in self.acked if at > t)

    async def run(self, log: KafkaEventLog, topic: str, stop: asyncio.Event) -> None:
        n = 0
        retrying = False
        # Stops between values only: a value that failed is retried until acknowledged, so
        # that anything of this key in the log is a copy of an acknowledged value.
        while retrying or not stop.is_set():
            value = self.key + f"-{n}".encode()
            started = time.monotonic()
            try:
                where = await log.append(topic, value, key=self.key)
            except PeerNetError as exc:
                assert exc.code is ErrorCode.UNAVAILABLE and exc.retriable, exc
                self.failed.append((time.monotonic(), str(exc)))
                retrying = True
                await asyncio.sleep(0.1)
                continue
            retrying = False
            done = time.monotonic()
            self.acked.append((value, where, done))
            self.waits.append((started, done - started))
            n += 1
            # About 30 appends/s per writer: enough to see the gap, little CPU.
            await asyncio.sleep(0.03)


async def _until(check: Any, within_s: float, what: str, cluster: Cluster,
                 tasks: list[asyncio.Task[None]]) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        for task in tasks:
            if task.done():
                task.result()  # a writer that failed: its error, not a timeout
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not within {within_s:.0f}s\n{cluster.logs()}")
        await asyncio.sleep(0.05)


async def test_nothing_acknowledged_is_lost_when_a_partition_leader_dies(
        cluster: Cluster, topics: Topics) -> None:
    """(done when) appends through PeerNet's producer go on while the leader of a partition is
    SIGKILLed, and every acknowledged one is read back by PeerNet's consumer at the offset it
    was given, in the order it was acknowledged."""
    topic = topics.events
    log = _event_log(topics.cfg)
    await log.start()
    writers = [Writer(k) for k in KEYS]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(w.run(log, topic, stop)) for w in writers]
    try:
        await _until(lambda: all(len(w.acked) >= 10 for w in writers), 30,
                     "10 appends per key before the kill", cluster, tasks)
        victim_partition = writers[0].acked[0][1].partition
        before = await _describe(cluster.bootstrap, topic)
        victim = before[victim_partition]["leader"]
        admin = await _admin(cluster.bootstrap)
        try:
            controller = (await admin.describe_cluster())["controller_id"]
        finally:
            await admin.close()

        t_kill = time.monotonic()
        cluster.nodes[victim].kill()

        await _until(lambda: all(w.acked_after(t_kill) >= 10 for w in writers), 60,
                     "10 appends per key after the kill", cluster, tasks)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        t_end = time.monotonic()
        after = await _describe(cluster.bootstrap, topic)
        consumer = log.consumer(topic, partitions=list(range(PARTITIONS)))
        await consumer.start()
        try:
            wanted = {(a.partition, a.offset) for w in writers for _, a, _ in w.acked}
            read: dict[tuple[int, int], tuple[bytes | None, bytes]] = {}
            deadline = time.monotonic() + 30
            while not wanted <= read.keys() and time.monotonic() < deadline:
                for r in await consumer.poll(timeout_ms=500):
                    read[(r.partition, r.offset)] = (r.key, r.value)
        finally:
            await consumer.stop()
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await log.stop()

    # The leadership moved off the dead broker, which left every in-sync replica set.
    assert all(p["leader"] not in (victim, -1) for p in after.values()), after
    assert all(victim not in p["isr"] and len(p["isr"]) == 2 for p in after.values()), after
    duplicates = 0
    for w in writers:
        offsets = [a.offset for _, a, _ in w.acked]
        assert len({a.partition for _, a, _ in w.acked}) == 1, "a key changed partition"
        assert offsets == sorted(set(offsets)), f"{w.key!r}: offsets not increasing"
        # Every acknowledged record is there, at the offset it was given.
        for value, a, _ in w.acked:
            assert read.get((a.partition, a.offset)) == (w.key, value), (
                f"acknowledged {value!r} at {a} is not in the log: {read.get((a.partition, a.offset))}")
        # And the key's whole history reads in acknowledgement order: a failed append may have
        # been stored too (at-least-once), then it is a copy of the value acknowledged next.
        partition = w.acked[0][1].partition
        history = [v for (p, _), (k, v) in sorted(read.items()) if p == partition and k == w.key]
        firsts = list(dict.fromkeys(history))
        assert firsts == [v for v, _, _ in w.acked], f"{w.key!r}: order differs"
        duplicates += len(history) - len(firsts)

    # What the run measured (docs/deploy.md reports these numbers).
    first = writers[0]
    # The longest an acknowledged append of each key waited, among those in flight at the kill
    # or started after it.
    stalls = {w.key.decode(): round(max(took for started, took in w.waits
                                        if started + took > t_kill), 2) for w in writers}
    refused = sum(1 for w in writers for _, m in w.failed if "not tried again yet" in m)
    timed_out = sum(len(w.failed) for w in writers) - refused
    print(f"\nkilled node {victim} (leader of partition {victim_partition} of {first.key!r}; "
          f"controller was node {controller}; leaders before "
          f"{ {p: m['leader'] for p, m in sorted(before.items())} }, partitions of the keys "
          f"{ {w.key.decode(): w.acked[0][1].partition for w in writers} }); "
          f"longest acknowledged append per key (s): {stalls}; "
          f"failed appends: {timed_out} unavailable + {refused} refused at once (fail fast); "
          f"{sum(len(w.acked) for w in writers)} acknowledged "
          f"({sum(w.acked_after(t_kill) for w in writers)} in the {t_end - t_kill:.1f}s after "
          f"the kill), all read back; {duplicates} extra copies; producer restarts "
          f"{log.producer_restarts}; leaders after: "
          f"{ {p: m['leader'] for p, m in sorted(after.items())} }; "
          f"first failure messages: {sorted({m for w in writers for _, m in w.failed})[:3]}")


async def test_one_broker_of_three_does_not_acknowledge(cluster: Cluster,
                                                        topics: Topics) -> None:
    """(done when) with one broker left of three, an append to a partition that broker leads is
    not acknowledged (acks=all waits for the in-sync replicas the broker no longer has) and
    PeerNet surfaces it as PeerNetError(unavailable) within its delivery timeout."""
    topic = topics.events
    # Shorter than the defaults, as in test_bus_faults: the refusal costs one delivery timeout
    # and the stop that follows one more.
    delivery_s = 4.0
    log = _event_log(topics.cfg, request_timeout_ms=2000, delivery_timeout_ms=int(delivery_s * 1000))
    await log.start()
    try:
        partitions = await _describe(cluster.bootstrap, topic)
        alive = set(cluster.alive())
        led = {p: m["leader"] for p, m in partitions.items() if m["leader"] in alive}
        assert led, f"no partition has a live leader: {partitions}"
        target, survivor = min(led.items())
        # A key of that partition, found the way a caller finds one: by appending (acknowledged
        # while two brokers or more are up).
        key = None
        for i in range(200):
            probe = f"probe-{i}".encode()
            if (await log.append(topic, b"probe", key=probe)).partition == target:
                key = probe
                break
        assert key is not None
        isr_before = sorted(partitions[target]["isr"])
        for node_id in alive - {survivor}:
            cluster.nodes[node_id].kill()
        assert cluster.alive() == [survivor]

        t0 = time.monotonic()
        with pytest.raises(PeerNetError) as refused:
            await log.append(topic, b"one-of-three", key=key)
        waited = time.monotonic() - t0
        assert refused.value.code is ErrorCode.UNAVAILABLE and refused.value.retriable
        assert waited < delivery_s + 3, f"refused only after {waited:.1f}s"
        print(f"\none broker left (node {survivor}, leader of partition {target}, isr before "
              f"{isr_before}): append refused after {waited:.2f}s: {refused.value}")
    finally:
        t0 = time.monotonic()
        await log.stop()
        stopped = time.monotonic() - t0
    assert stopped < delivery_s + 5, f"stop took {stopped:.1f}s"
