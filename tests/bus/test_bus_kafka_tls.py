"""Kafka over TLS (issue 8: "TLS where the URL says so"): with PEERNET_KAFKA_SECURITY_PROTOCOL=SSL
and PEERNET_KAFKA_SSL_CAFILE, PeerNet's event log (its producer, consumers and admin client) and
the stack's probe and topic creation speak TLS to a real broker, also with a client certificate
where the broker requires one; a client that speaks plaintext to the TLS port, does not trust the
broker's certificate, or has no certificate where one is required, gets PeerNetError(unavailable)
within its timeouts.

The broker is one KRaft node (broker and controller) on free ports of 127.0.0.1, run from the Kafka
jars the local stack installed (stack/kafka.py, as test_bus_kafka_replicated.py), with a TLS
listener, a TLS listener that requires client certificates, and plaintext ones for the controller
and between brokers; PEM files from a throwaway CA (bus_tls.py). The project's own broker is not
touched."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from bus_helpers import unique
from bus_tls import TlsFiles, make_tls_files
from kafka_nodes import require_kafka, start_node
from ports import free_ports

from bus.backends import event_log
from bus.eventlog import Record, TopicSpec
from bus.kafka import KafkaEventLog, KafkaSecurity
from peernet.config import PeerNetConfig, load_config
from peernet.errors import ErrorCode, PeerNetError
from stack import kafka as stack_kafka
from stack.process import tail

pytestmark = pytest.mark.stack

START_TIMEOUT_S = 120.0
# Short client timeouts: a refused client must fail the test in seconds, not hang.
REQUEST_TIMEOUT_MS = 2000
DELIVERY_TIMEOUT_MS = 4000


@dataclass
class TlsBroker:
    plaintext_port: int
    tls_port: int  # TLS, no client certificate asked for
    mtls_port: int  # TLS, a client certificate signed by the CA required
    tls: TlsFiles
    home: Path

    def bootstrap(self, port: int) -> str:
        return f"127.0.0.1:{port}"

    def env(self, port: int, **extra: str) -> dict[str, str]:
        """PEERNET_* for this broker's `port` over TLS, trusting the test CA."""
        return {"PEERNET_KAFKA_BOOTSTRAP": self.bootstrap(port),
                "PEERNET_KAFKA_SECURITY_PROTOCOL": "SSL",
                "PEERNET_KAFKA_SSL_CAFILE": str(self.tls.ca), **extra}

    def logs(self) -> str:
        return f"{tail(self.home / 'kafka.log', 20)}\n{tail(self.home / 'console.log', 10)}"


def _properties(broker: TlsBroker, controller_port: int) -> str:
    base = stack_kafka.kraft_node_properties(
        node_id=1, port=broker.plaintext_port, controller_port=controller_port,
        quorum=f"controller.quorum.bootstrap.servers=127.0.0.1:{controller_port}",
        log_dir=broker.home / "data", replicas=1)
    # The listener lines of the local stack's broker, replaced by ones with TLS listeners.
    replaced = ("listeners=", "advertised.listeners=", "listener.security.protocol.map=")
    tls = broker.tls
    return "\n".join([
        *(line for line in base if not line.startswith(replaced)),
        f"listeners=PLAINTEXT://127.0.0.1:{broker.plaintext_port},"
        f"SSL://127.0.0.1:{broker.tls_port},MTLS://127.0.0.1:{broker.mtls_port},"
        f"CONTROLLER://127.0.0.1:{controller_port}",
        f"advertised.listeners=PLAINTEXT://127.0.0.1:{broker.plaintext_port},"
        f"SSL://127.0.0.1:{broker.tls_port},MTLS://127.0.0.1:{broker.mtls_port}",
        "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SSL:SSL,MTLS:SSL",
        # Kafka's PEM keystore: the unencrypted PKCS#8 key and the certificate chain in one file.
        "ssl.keystore.type=PEM",
        f"ssl.keystore.location={tls.server_key_and_chain}",
        "ssl.client.auth=none",
        "listener.name.mtls.ssl.client.auth=required",
        "listener.name.mtls.ssl.truststore.type=PEM",
        f"listener.name.mtls.ssl.truststore.location={tls.ca}",
    ]) + "\n"


def _run(argv: list[str], home: Path, timeout: float) -> int:
    with open(home / "console.log", "ab") as console:
        proc = subprocess.Popen(argv, cwd=home, stdin=subprocess.DEVNULL, stdout=console,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return -1


@pytest.fixture(scope="module")
async def broker(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TlsBroker]:
    """One KRaft node from the jars `peernet stack up` installed; SIGKILLed at the end."""
    cfg = load_config()
    require_kafka(cfg)
    home = tmp_path_factory.mktemp("kafka-tls")
    plaintext, tls_port, mtls_port, controller = free_ports(4)
    broker = TlsBroker(plaintext, tls_port, mtls_port, make_tls_files(home / "certs"), home)
    props = home / "server.properties"
    props.write_text(_properties(broker, controller))
    code = await asyncio.to_thread(
        _run, stack_kafka.format_argv(cfg, props, stack_kafka.new_cluster_id(),
                                      home / "format.log", standalone=True), home, 120)
    if code != 0:
        pytest.fail(f"formatting the broker's storage failed ({code}):\n{broker.logs()}")
    proc = start_node(cfg, props, home, home / "kafka.log", home / "console.log")
    aiokafka_log = logging.getLogger("aiokafka")
    level = aiokafka_log.level
    # Refused connections (the tests' point) are logged by aiokafka at ERROR: noise here.
    aiokafka_log.setLevel(logging.CRITICAL)
    try:
        # Up when the stack's probe, through the TLS listener, finds a controller.
        security = stack_kafka.security(load_config(broker.env(tls_port)))
        t0 = time.monotonic()
        last: object = None
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the broker exited ({proc.returncode}):\n{broker.logs()}")
            try:
                detail = await stack_kafka.describe(broker.bootstrap(tls_port), 2.0,
                                                    security=security)
                break
            except Exception as exc:
                last = exc
            if time.monotonic() - t0 > START_TIMEOUT_S:
                pytest.fail(f"no answer over TLS within {START_TIMEOUT_S:.0f}s ({last!r}):\n"
                            f"{broker.logs()}")
            await asyncio.sleep(0.5)
        print(f"\nbroker up over TLS in {time.monotonic() - t0:.1f}s: {detail}")
        yield broker
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        aiokafka_log.setLevel(level)


async def _round_trip(cfg: PeerNetConfig) -> None:
    """Through PeerNet's event log opened from `cfg` as every process opens it: create a topic,
    append (acks=all) and read every record back, in a group (committed) and by partition."""
    topic = unique("test.tls")
    log = event_log(cfg, client_id=unique("test-tls"))
    await log.ensure_topics([TopicSpec(topic, 2)])
    await log.start()
    try:
        await log.ping()
        items = [(f"k{i}".encode(), f"record {i}".encode(), ()) for i in range(20)]
        appended = await log.append_many(topic, items)
        assert len(appended) == 20 and {a.partition for a in appended} == {0, 1}
        by_offset = {(a.partition, a.offset): v for a, (_, v, _) in zip(appended, items, strict=True)}

        async with log.consumer(topic, group=unique("test-tls-group")) as group:
            read: list[Record] = []
            deadline = time.monotonic() + 20
            while len(read) < 20 and time.monotonic() < deadline:
                read += await group.poll(timeout_ms=500)
            await group.commit()
        assert {(r.partition, r.offset): r.value for r in read} == by_offset

        async with log.consumer(topic, partitions=[1]) as one:
            ends = await one.end_offsets()
            assert ends == {1: sum(1 for a in appended if a.partition == 1)}
    finally:
        await log.stop()


async def test_event_log_round_trip_over_tls(broker: TlsBroker) -> None:
    cfg = load_config(broker.env(broker.tls_port))
    assert cfg.services.kafka_security_protocol == "SSL"
    await _round_trip(cfg)


async def test_event_log_round_trip_with_a_client_certificate(broker: TlsBroker) -> None:
    tls = broker.tls
    cfg = load_config(broker.env(broker.mtls_port,
                                 PEERNET_KAFKA_SSL_CERTFILE=str(tls.client_cert),
                                 PEERNET_KAFKA_SSL_KEYFILE=str(tls.client_key)))
    await _round_trip(cfg)


async def test_the_stack_creates_topics_over_tls(broker: TlsBroker) -> None:
    """`peernet stack up` with an external Kafka: its probe and ensure_topics take the TLS
    settings from the configuration."""
    cfg = load_config(broker.env(broker.tls_port))
    assert stack_kafka.KAFKA.is_external(cfg)
    assert "controller 1" in await asyncio.to_thread(stack_kafka.KAFKA.probe, cfg, 5.0)
    topic = unique("test.tls-stack")
    created = await stack_kafka.ensure_topics(cfg.services.kafka_bootstrap, [TopicSpec(topic, 1)],
                                              retry_for_s=5, security=stack_kafka.security(cfg))
    assert created == [topic]


def _refused_log(broker: TlsBroker, port: int, security: KafkaSecurity) -> KafkaEventLog:
    return KafkaEventLog(broker.bootstrap(port), client_id=unique("test-tls-refused"),
                         request_timeout_ms=REQUEST_TIMEOUT_MS,
                         delivery_timeout_ms=DELIVERY_TIMEOUT_MS,
                         ping_timeout_ms=REQUEST_TIMEOUT_MS, security=security)


@pytest.mark.parametrize("case", ["plaintext-to-tls-port", "untrusted-ca", "no-client-cert"])
async def test_a_client_the_broker_or_it_refuses_fails_in_bounded_time(
        broker: TlsBroker, case: str) -> None:
    tls = broker.tls
    port, security = {
        "plaintext-to-tls-port": (broker.tls_port, KafkaSecurity()),
        "untrusted-ca": (broker.tls_port, KafkaSecurity("SSL", cafile=str(tls.other_ca))),
        "no-client-cert": (broker.mtls_port, KafkaSecurity("SSL", cafile=str(tls.ca))),
    }[case]
    log = _refused_log(broker, port, security)
    t0 = time.monotonic()
    try:
        with pytest.raises(PeerNetError) as refused:
            await log.start()
        start_s = time.monotonic() - t0
        t1 = time.monotonic()
        with pytest.raises(PeerNetError) as ping_refused:
            await log.ping()
        ping_s = time.monotonic() - t1
    finally:
        await log.stop()
    for error in (refused.value, ping_refused.value):
        assert error.code is ErrorCode.UNAVAILABLE and error.retriable
    assert start_s < DELIVERY_TIMEOUT_MS / 1000 + 2, f"start refused only after {start_s:.1f}s"
    assert ping_s < REQUEST_TIMEOUT_MS / 1000 + 2, f"ping refused only after {ping_s:.1f}s"
    print(f"\n{case}: start refused after {start_s:.2f}s ({refused.value}); "
          f"ping after {ping_s:.2f}s")

