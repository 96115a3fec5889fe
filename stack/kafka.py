"""The local Kafka broker: one KRaft node in combined mode (broker and controller), run from the
Maven Central jars listed by stack/kafka/pom.xml, and `ensure_topics` to create PeerNet's topics."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import shutil
import threading
import uuid
from collections.abc import Awaitable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from bus.eventlog import TopicSpec
from peernet.config import PeerNetConfig
from stack.process import Identity, Launch, StackError, log_file, run_step, say

log = logging.getLogger("peernet.stack")

DATA_FILES = Path(__file__).resolve().parent / "kafka"
POM = DATA_FILES / "pom.xml"
LOG4J2 = DATA_FILES / "log4j2.xml"
# Written into the libs folder once every jar is there: the Kafka version and the pom it came from.
LIBS_STAMP = ".peernet-libs"
# Kafka's error codes that ensure_topics meets (see the Kafka protocol guide).
TOPIC_ALREADY_EXISTS = 36

if TYPE_CHECKING:  # aiokafka is imported where a client is made, not with this module
    from bus.kafka import KafkaSecurity

T = TypeVar("T")


def kafka_dir(cfg: PeerNetConfig) -> Path:
    return cfg.stack.home / "kafka"


def libs_dir(cfg: PeerNetConfig) -> Path:
    return kafka_dir(cfg) / "libs"


def data_dir(cfg: PeerNetConfig) -> Path:
    return kafka_dir(cfg) / "data"


def properties_file(cfg: PeerNetConfig) -> Path:
    return kafka_dir(cfg) / "server.properties"


def libs_stamp(cfg: PeerNetConfig) -> str:
    pom_digest = hashlib.sha256(POM.read_bytes()).hexdigest()[:16]
    return f"kafka {cfg.stack.kafka_version} pom {pom_digest}\n"


def server_properties(cfg: PeerNetConfig) -> str:
    s = cfg.stack
    return "\n".join([
        "# Written by `peernet stack up` on every start: edit stack/kafka.py, not this file.",
        *kraft_node_properties(
            node_id=1, port=s.kafka_port, controller_port=s.kafka_controller_port,
            quorum=f"controller.quorum.bootstrap.servers=127.0.0.1:{s.kafka_controller_port}",
            log_dir=data_dir(cfg), replicas=1),
    ]) + "\n"


def kraft_node_properties(*, node_id: int, port: int, controller_port: int, quorum: str,
                          log_dir: Path, replicas: int) -> list[str]:
    """The settings of one KRaft node in combined mode (broker and controller) on 127.0.0.1.
    `quorum` is its controller quorum line: `controller.quorum.bootstrap.servers=...` for a node
    formatted `--standalone` (the local stack), `controller.quorum.voters=...` for a fixed set of
    voters (a cluster of several nodes, tests/bus/test_bus_kafka_replicated.py). `replicas`: the
    replication factor of Kafka's internal topics, at most the number of brokers."""
    # Same rule as PeerNet's own topics (bus/topics.py): 2 of 3 replicas, 1 of fewer.
    min_isr = max(1, min(2, replicas - 1))
    return [
        "process.roles=broker,controller",
        f"node.id={node_id}",
        quorum,
        f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}",
        "controller.listener.names=CONTROLLER",
        "inter.broker.listener.name=PLAINTEXT",
        "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        f"log.dirs={log_dir}",
        "num.partitions=1",
        f"offsets.topic.replication.factor={replicas}",
        f"transaction.state.log.replication.factor={replicas}",
        f"transaction.state.log.min.isr={min_isr}",
        f"share.coordinator.state.topic.replication.factor={replicas}",
        f"share.coordinator.state.topic.min.isr={min_isr}",
        # A lone consumer gets its partitions at once rather than after 3 s.
        "group.initial.rebalance.delay.ms=0",
        # The log cleaner (compacted topics: the inbox, consumer offsets) allocates its dedupe
        # buffer on the heap up front: 128 MiB by default, the largest thing in an idle broker.
        # 16 MiB maps about 700,000 keys per cleaning pass, plenty for a development broker.
        "log.cleaner.dedupe.buffer.size=16777216",
        # PeerNet creates its topics with explicit settings (stack.kafka.ensure_topics); a typo in
        # a topic name must fail rather than create a one-partition topic.
        "auto.create.topics.enable=false",
    ]


def libs_installed(cfg: PeerNetConfig) -> bool:
    """True when `install` has put every jar of the configured Kafka version in `libs_dir`."""
    try:
        return (libs_dir(cfg) / LIBS_STAMP).read_text() == libs_stamp(cfg)
    except FileNotFoundError:
        return False


def java_argv(cfg: PeerNetConfig, log_path: Path) -> list[str]:
    """The JVM with Kafka's jars on its classpath, logging to `log_path` (log4j2.xml)."""
    return [
        "java",
        "-Djava.awt.headless=true",
        "-Djava.net.preferIPv4Stack=true",
        f"-Dlog4j2.configurationFile={LOG4J2}",
        f"-Dpeernet.kafka.log={log_path}",
        f"-Dkafka.logs.dir={log_path.parent}",
        "-cp", f"{libs_dir(cfg)}/*",
    ]


def format_argv(cfg: PeerNetConfig, props: Path, cluster_id: str, log_path: Path, *,
                standalone: bool) -> list[str]:
    """Format the log dir of `props` for `cluster_id` (once per node, before its first start).
    `standalone`: the node is the one voter of a dynamic quorum; else `props` names the voters."""
    return [*java_argv(cfg, log_path), "-Xmx256m", "kafka.tools.StorageTool", "format",
            *(["--standalone"] if standalone else []), "-t", cluster_id, "-c", str(props)]


def broker_argv(cfg: PeerNetConfig, props: Path, log_path: Path, heap_mb: int) -> list[str]:
    """Run the Kafka node of `props` with a heap of at most `heap_mb`."""
    return [
        *java_argv(cfg, log_path),
        "-Xms128m", f"-Xmx{heap_mb}m",
        # Kafka's own GC settings (kafka-run-class.sh): short pauses keep produce latency flat.
        "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-XX:InitiatingHeapOccupancyPercent=35",
        "-XX:+ExplicitGCInvokesConcurrent",
        "-XX:MaxMetaspaceSize=256m",
        "-XX:ReservedCodeCacheSize=96m",
        "-XX:+ExitOnOutOfMemoryError",
        "kafka.Kafka", str(props),
    ]


def new_cluster_id() -> str:
    # Kafka's Uuid.randomUuid(): url-safe base64 of 16 random bytes, never starting with "-".
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


class KafkaBroker:
    """Apache Kafka in KRaft combined mode, bound to 127.0.0.1."""

    name = "kafka"
    # A JVM on a starved machine (a CI box running everything at once) can take minutes.
    ready_timeout = 300.0

    def is_external(self, cfg: PeerNetConfig) -> bool:
        return cfg.services.kafka_external

    def address(self, cfg: PeerNetConfig) -> str:
        if self.is_external(cfg):
            return cfg.services.kafka_bootstrap
        return f"127.0.0.1:{cfg.stack.kafka_port}"

    def ports(self, cfg: PeerNetConfig) -> tuple[int, ...]:
        return (cfg.stack.kafka_port, cfg.stack.kafka_controller_port)

    def logs(self, cfg: PeerNetConfig) -> list[Path]:
        home = cfg.stack.home
        return [log_file(home, "kafka"), log_file(home, "kafka.console")]

    def install(self, cfg: PeerNetConfig) -> None:
        libs = libs_dir(cfg)
        stamp = libs_stamp(cfg)
        if libs_installed(cfg):
            return
        for tool in ("java", "mvn"):
            if shutil.which(tool) is None:
                raise StackError(f"kafka needs `{tool}` on PATH (a JDK 17+ and Maven): "
                                 "apt-get install -y openjdk-17-jdk-headless maven")
        version = cfg.stack.kafka_version
        say(f"kafka: fetching the jars of Kafka {version} from Maven Central into {libs} "
            "(first time only; about 55 MB)")
        staging = libs.with_name(f"{libs.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        run_step(["mvn", "-B", "-q", "-f", str(POM), "dependency:copy-dependencies",
                  f"-DoutputDirectory={staging}", f"-Dkafka.version={version}"],
                 log_path=log_file(cfg.stack.home, "kafka.install"),
                 what=f"fetching Kafka {version} with mvn")
        (staging / LIBS_STAMP).write_text(stamp)
        # Swap in the complete folder only: an interrupted fetch leaves no half-filled libs.
        if libs.is_symlink():
            libs.unlink()
        else:
            shutil.rmtree(libs, ignore_errors=True)
        staging.rename(libs)
        jars = len(list(libs.glob("*.jar")))
        say(f"kafka: {jars} jars in {libs}")

    def identity(self, cfg: PeerNetConfig) -> Identity:
        return Identity("java", ("kafka.Kafka", str(properties_file(cfg))))

    def launch(self, cfg: PeerNetConfig) -> Launch:
        home = cfg.stack.home
        props = properties_file(cfg)
        props.parent.mkdir(parents=True, exist_ok=True)
        props.write_text(server_properties(cfg))
        data = data_dir(cfg)
        if not (data / "meta.properties").exists():
            cluster_id = new_cluster_id()
            say(f"kafka: formatting {data} (cluster id {cluster_id})")
            data.mkdir(parents=True, exist_ok=True)
            run_step(format_argv(cfg, props, cluster_id, log_file(home, "kafka.format"),
                                 standalone=True),
                     log_path=log_file(home, "kafka.format"), what="formatting Kafka's storage",
                     timeout=120)
        argv = broker_argv(cfg, props, log_file(home, "kafka"), cfg.stack.kafka_heap_mb)
        return Launch(argv=argv, identity=self.identity(cfg), cwd=kafka_dir(cfg),
                      console=log_file(home, "kafka.console"))

    def probe(self, cfg: PeerNetConfig, timeout: float) -> str:
        return run_sync(describe(self.address(cfg), timeout, security=security(cfg)))


def security(cfg: PeerNetConfig) -> KafkaSecurity:
    """How to reach the configured Kafka: TLS settings apply to an external one only."""
    from bus.kafka import KafkaSecurity

    return KafkaSecurity.of(cfg.services)


def _client_options(security: KafkaSecurity | None) -> dict[str, Any]:
    from bus.kafka import PLAINTEXT

    return (security or PLAINTEXT).client_options()


async def describe(bootstrap: str, request_timeout_s: float, *,
                   security: KafkaSecurity | None = None) -> str:
    """One metadata request: raises unless a broker answers and the cluster has a controller."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **_client_options(security),
                                request_timeout_ms=max(1000, int(request_timeout_s * 1000)))
    with _quiet_aiokafka():
        try:
            await asyncio.wait_for(admin.start(), request_timeout_s)
            info = await asyncio.wait_for(admin.describe_cluster(), request_timeout_s)
        finally:
            await admin.close()
    brokers = info.get("brokers") or []
    controller = info.get("controller_id", -1)
    if not brokers or controller is None or controller < 0:
        raise StackError(f"kafka at {bootstrap} has no controller yet ({info})")
    return f"{len(brokers)} broker(s), controller {controller}"


async def ensure_topics(bootstrap: str, specs: Sequence[TopicSpec], *,
                        retry_for_s: float = 60.0,
                        security: KafkaSecurity | None = None) -> list[str]:
    """Create the topics of `specs` that do not exist yet; existing ones are left as they are
    (a partition count that differs from the spec is logged). Returns the names created.

    Retries for up to `retry_for_s` seconds while the broker is still settling (e.g. its
    controller is just elected)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    loop = asyncio.get_running_loop()
    deadline = loop.time() + retry_for_s
    options = _client_options(security)
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **options,
                                    request_timeout_ms=15_000)
        try:
            with _quiet_aiokafka():
                await admin.start()
                existing = {t["topic"]: t for t in await admin.describe_topics()}
                missing = [s for s in specs if s.name not in existing]
                for spec in specs:
                    have = existing.get(spec.name)
                    if have is not None and len(have["partitions"]) != spec.partitions:
                        log.warning("topic %s has %d partitions, the spec says %d: left as it is",
                                    spec.name, len(have["partitions"]), spec.partitions)
                if not missing:
                    return []
                response = await admin.create_topics(
                    [NewTopic(s.name, s.partitions, s.replication_factor,
                              topic_configs=dict(s.config)) for s in missing],
                    timeout_ms=15_000)
            # Each entry is (topic, error_code[, error_message]); 0 is success.
            failed = [tuple(entry) for entry in response.topic_errors
                      if entry[1] not in (0, TOPIC_ALREADY_EXISTS)]
            if not failed:
                return [s.name for s in missing]
            error: Exception = StackError(f"creating topics at {bootstrap} failed: {failed}")
        except StackError:
            raise
        except Exception as exc:  # the broker is not ready yet: retried until the deadline
            error = exc
        finally:
            await admin.close()
        if loop.time() > deadline:
            raise StackError(f"could not create topics at {bootstrap}: {error!r}") from error
        log.info("ensure_topics at %s: %r; retrying", bootstrap, error)
        await asyncio.sleep(0.5)


@contextlib.contextmanager
def _quiet_aiokafka() -> Iterator[None]:
    # While a broker starts, aiokafka logs every refused connection at ERROR; without a logging
    # setup those land on the terminal. The probe's own exception says what failed.
    logger = logging.getLogger("aiokafka")
    before = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(before)


def run_sync(coro: Coroutine[Any, Any, T] | Awaitable[T]) -> T:
    """Run `coro` to completion from synchronous code, even when this thread already runs an event
    loop (then on a private loop in a helper thread, blocking the caller meanwhile)."""

    async def main() -> T:
        return await coro

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    result: list[T] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            result.append(asyncio.run(main()))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=worker, name="peernet-stack-sync", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


KAFKA = KafkaBroker()
