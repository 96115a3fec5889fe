"""The local stack against real services: a second, isolated stack (its own home and ports) is
brought up, checked, brought up again, taken down, and must leave no process behind."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from bus.topics import peernet_topics
from peernet.config import PeerNetConfig, load_config
from stack import kafka as stack_kafka
from stack import manager
from stack import mongo as stack_mongo
from stack.kafka import run_sync
from stack.process import Identity, StackError, is_alive, pid_file, processes_mentioning

SERVICE_NAMES = ("kafka", "redis", "mongo")


def _free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _isolated_env(home: Path, **extra: str) -> dict[str, str]:
    redis_port, kafka_port, controller_port, mongo_port = _free_ports(4)
    return {
        "PEERNET_HOME": str(home),
        "PEERNET_STACK_REDIS_PORT": str(redis_port),
        "PEERNET_STACK_KAFKA_PORT": str(kafka_port),
        "PEERNET_STACK_KAFKA_CONTROLLER_PORT": str(controller_port),
        "PEERNET_STACK_MONGO_PORT": str(mongo_port),
        # Small partition counts: quicker topic creation, same code path.
        "PEERNET_EVENTS_PARTITIONS": "3",
        "PEERNET_INBOX_PARTITIONS": "2",
        **extra,
    }


def _share_installs(home: Path) -> None:
    """Reuse the main home's Kafka jars and SecantusDB venv (installed there first if missing,
    exactly as `peernet stack up` would): the isolated home sees them as already installed."""
    main = load_config()
    stack_kafka.KAFKA.install(main)
    stack_mongo.MONGO.install(main)
    iso = load_config({"PEERNET_HOME": str(home)})
    for theirs, ours in ((stack_kafka.libs_dir(main), stack_kafka.libs_dir(iso)),
                         (stack_mongo.venv_dir(main), stack_mongo.venv_dir(iso))):
        ours.parent.mkdir(parents=True, exist_ok=True)
        if not ours.exists():
            ours.symlink_to(theirs, target_is_directory=True)


def _assert_nothing_left(cfg: PeerNetConfig) -> None:
    home = str(cfg.stack.home)
    deadline = time.monotonic() + 10
    while processes_mentioning(home) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_mentioning(home) == []
    for name in SERVICE_NAMES:
        assert manager.pid_of(cfg, name) is None
        assert not pid_file(cfg.stack.home, name).exists()


@pytest.fixture(scope="module")
def stack_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One isolated home and set of ports for the module: each test starts from what the previous
    one left on disk, as a developer's stack does."""
    home = tmp_path_factory.mktemp("stack-home")
    _share_installs(home)
    env = _isolated_env(home)
    yield env
    # Whatever a failed test left running goes now.
    manager.down(load_config(env))


@pytest.fixture
def stack_home(stack_env: dict[str, str]) -> Path:
    return Path(stack_env["PEERNET_HOME"])


@pytest.fixture
def cfg(stack_env: dict[str, str]) -> Iterator[PeerNetConfig]:
    cfg = load_config(stack_env)
    yield cfg
    manager.down(cfg)
    _assert_nothing_left(cfg)


async def _kafka_roundtrip(bootstrap: str, topic: str) -> bytes:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        value = uuid.uuid4().bytes
        meta = await producer.send_and_wait(topic, value, key=b"k")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, meta.partition)
        consumer.assign([tp])
        consumer.seek(tp, meta.offset)
        batch = await consumer.getmany(tp, timeout_ms=10_000)
        records = batch.get(tp, [])
        assert records, "the record just produced was not read back"
        assert records[0].value == value
        return value
    finally:
        await consumer.stop()


async def _kafka_topics(bootstrap: str) -> dict[str, int]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics()}
    finally:
        await admin.close()


def _check_services_answer(cfg: PeerNetConfig) -> None:
    from pymongo import MongoClient

    bootstrap = f"127.0.0.1:{cfg.stack.kafka_port}"
    topics = run_sync(_kafka_topics(bootstrap))
    for spec in peernet_topics(cfg):
        assert topics.get(spec.name) == spec.partitions
    run_sync(_kafka_roundtrip(bootstrap, cfg.topics.events))

    r = redis.Redis(host="127.0.0.1", port=cfg.stack.redis_port)
    try:
        r.set("peernet:test", b"1")
        assert r.get("peernet:test") == b"1"
    finally:
        r.close()

    client: MongoClient = MongoClient(stack_mongo.local_url(cfg), serverSelectionTimeoutMS=10_000)
    try:
        coll = client["peernet_test"]["things"]
        coll.replace_one({"_id": "a"}, {"_id": "a", "n": 1}, upsert=True)
        assert coll.find_one({"_id": "a"}) == {"_id": "a", "n": 1}
    finally:
        client.close()


@pytest.mark.stack
def test_up_is_idempotent_and_down_leaves_nothing(cfg: PeerNetConfig,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    first = manager.up(cfg)
    assert [s.name for s in first] == list(SERVICE_NAMES)
    assert all(s.healthy and not s.external for s in first)
    pids = {name: manager.pid_of(cfg, name) for name in SERVICE_NAMES}
    assert all(pids.values())
    for name, pid in pids.items():
        assert pid_file(cfg.stack.home, name).read_text().strip() == str(pid)
    _check_services_answer(cfg)

    # Up again: nothing restarted, everything found by pid file and a real request.
    second = manager.up(cfg)
    assert {s.name: s.pid for s in second} == pids
    out = capsys.readouterr().out
    assert "running  pid" in out and "topics" in out
    assert manager.print_status(cfg) is True
    assert {s.name: s.state for s in manager.status(cfg)} == dict.fromkeys(SERVICE_NAMES, "running")

    manager.down(cfg)
    _assert_nothing_left(cfg)
    assert not any(is_alive(pid) for pid in pids.values() if pid is not None)
    manager.down(cfg)  # harmless
    assert manager.print_status(cfg) is False
    assert {s.name: s.state for s in manager.status(cfg)} == dict.fromkeys(SERVICE_NAMES, "stopped")

    # Data survives a restart.
    manager.up(cfg)
    _check_services_answer(cfg)
    r = redis.Redis(host="127.0.0.1", port=cfg.stack.redis_port)
    try:
        assert r.get("peernet:test") == b"1"
    finally:
        r.close()


@pytest.mark.stack
def test_kill_and_restart_single_services(cfg: PeerNetConfig) -> None:
    manager.up(cfg)
    for name in SERVICE_NAMES:
        before = manager.pid_of(cfg, name)
        assert before is not None
        assert manager.stop_service(cfg, name, kill=True) is True
        assert manager.pid_of(cfg, name) is None
        assert manager.stop_service(cfg, name) is False  # nothing left to stop
        with pytest.raises(StackError, match="not running"):
            manager.wait_ready(cfg, name, timeout=2)
        after = manager.start_service(cfg, name)
        assert after != before and manager.pid_of(cfg, name) == after
        manager.wait_ready(cfg, name, timeout=30)
        assert manager.start_service(cfg, name) == after  # already running: left alone
    # The topics made before the crash are still there.
    topics = run_sync(_kafka_topics(f"127.0.0.1:{cfg.stack.kafka_port}"))
    assert cfg.topics.events in topics and cfg.topics.inbox in topics


@pytest.mark.stack
def test_stale_pid_file_never_signals_a_stranger(cfg: PeerNetConfig) -> None:
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path = pid_file(cfg.stack.home, "redis")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{stranger.pid}\n")
        assert manager.pid_of(cfg, "redis") is None
        assert not path.exists()  # the stale file is gone
        path.write_text(f"{stranger.pid}\n")
        assert manager.stop_service(cfg, "redis", kill=True) is False
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


@pytest.mark.stack
def test_external_services_are_checked_but_never_started_or_stopped(cfg: PeerNetConfig,
                                                                    stack_home: Path) -> None:
    manager.start_service(cfg, "redis")
    redis_pid = manager.pid_of(cfg, "redis")
    ext = load_config({**_isolated_env(stack_home / "external-user"),
                       "PEERNET_REDIS_URL": f"redis://127.0.0.1:{cfg.stack.redis_port}/0"})
    assert ext.services.redis_external
    assert manager.pid_of(ext, "redis") is None
    assert manager.stop_service(ext, "redis") is False
    with pytest.raises(StackError, match="external"):
        manager.start_service(ext, "redis")
    rows = {s.name: s for s in manager.status(ext)}
    assert rows["redis"].external and rows["redis"].healthy
    assert rows["kafka"].state == "stopped"
    assert "redis" in manager.wait_ready(ext, "redis", timeout=5)
    manager.down(ext)
    assert manager.pid_of(cfg, "redis") == redis_pid  # still running: it was not ext's to stop


@pytest.mark.stack
def test_a_taken_port_is_reported(cfg: PeerNetConfig) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", cfg.stack.redis_port))
        squatter.listen()
        with pytest.raises(StackError, match=f"port 127.0.0.1:{cfg.stack.redis_port} is taken"):
            manager.start_service(cfg, "redis")
    assert manager.pid_of(cfg, "redis") is None


@pytest.mark.stack
def test_a_service_that_dies_at_start_is_reported_with_its_log(cfg: PeerNetConfig,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from stack import redis as stack_redis

    good = stack_redis.redis_conf
    monkeypatch.setattr(stack_redis, "redis_conf", lambda c: good(c) + "no-such-directive yes\n")
    with pytest.raises(StackError) as failure:
        manager.start_service(cfg, "redis", timeout=15)
    message = str(failure.value)
    assert "redis is not running" in message
    assert str(stack_redis.REDIS.logs(cfg)[0]) in message and "no-such-directive" in message
    assert manager.pid_of(cfg, "redis") is None


def test_identity_needs_program_and_every_marker() -> None:
    ident = Identity("redis-server", ("redis-server", "/h/redis/redis.conf"))
    assert ident.matches("/usr/bin/redis-server 127.0.0.1:6379  /h/redis/redis.conf")
    assert not ident.matches("/usr/bin/redis-server 127.0.0.1:6379  /other/redis/redis.conf")
    assert not ident.matches("grep redis-server /h/redis/redis.conf")
    assert not ident.matches("")


def test_generated_configs_bind_to_localhost_only(tmp_path: Path) -> None:
    cfg = load_config(_isolated_env(tmp_path))
    props = stack_kafka.server_properties(cfg)
    assert f"listeners=PLAINTEXT://127.0.0.1:{cfg.stack.kafka_port}," in props
    assert f"CONTROLLER://127.0.0.1:{cfg.stack.kafka_controller_port}" in props
    assert "auto.create.topics.enable=false" in props
    from stack.redis import redis_conf

    conf = redis_conf(cfg)
    assert "bind 127.0.0.1\n" in conf and f"port {cfg.stack.redis_port}\n" in conf
    assert "appendonly yes" in conf
