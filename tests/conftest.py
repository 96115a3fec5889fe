"""Session fixtures shared by every suite: the configuration, the real local stack, and a real
PeerNet server (`peernet serve`: Ray, the shard actors and two Serve gateway replicas) started
as its own process on test topics, so that tests never touch a developer's data."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from peernet.config import PeerNetConfig, load_config

sys.path.insert(0, str(Path(__file__).resolve().parent))

from redis_cluster_fixture import redis_cluster  # noqa: F401  (a session fixture for every suite)
from wsclient import SERVER_TOPICS, Server, running_server, server_env

SERVER_START_TIMEOUT_S = 420.0  # a busy machine may need Ray started more than once
SERVICE_RESTART_TIMEOUT_S = 90.0  # a service restarted by a fault test, on a busy machine


# CI runs every service itself (.ci/run), so there a real-service test has no reason to skip: a
# skip would hide a test that never ran. Elsewhere a skip stays a skip (say, an external service
# that is not ours to stop).
REAL_SERVICE_MARKERS = ("stack", "ray")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if (report.skipped and not hasattr(report, "wasxfail") and os.environ.get("CI")
            and any(item.get_closest_marker(m) for m in REAL_SERVICE_MARKERS)):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where no real-service test may skip: {reason}"


@pytest.fixture(scope="session")
def cfg() -> PeerNetConfig:
    return load_config()


@pytest.fixture(scope="session")
def local_stack(cfg: PeerNetConfig) -> Iterator[PeerNetConfig]:
    """The real local services, started by the project's own code if they are not running."""
    import asyncio
    import concurrent.futures

    from stack import manager

    def run(coro: Any) -> Any:
        # In a thread of its own: an async test may be the first to ask for this fixture, and
        # its event loop is running then.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, coro).result()

    manager.up(cfg)
    bootstrap = cfg.services.kafka_bootstrap
    before = run(_topics(bootstrap))
    yield cfg
    # Delete the test topics this session created: a broker that keeps every run's topics loads
    # them all at each start (a SIGKILLed one took 56 s to answer again with ~1,000 partitions
    # of earlier runs), which the fault tests then wait for.
    try:
        ours = sorted(t for t in run(_topics(bootstrap)) - before
                      if t in SERVER_TOPICS or t.startswith(BUS_TEST_TOPIC_PREFIX))
        if ours:
            run(_delete_topics(bootstrap, ours))
    except Exception as exc:  # cleanup only: never fail the run for it
        print(f"conftest: test topics not deleted: {exc!r}")


# Topics the tests create, deleted when the session ends: the test servers' own (registered by
# name, so that another test session's server running meanwhile keeps its topics) and the bus
# tests' (each used only inside its own test).
BUS_TEST_TOPIC_PREFIX = "test."


async def _topics(bootstrap: str) -> set[str]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


async def _delete_topics(bootstrap: str, names: list[str]) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
    await admin.start()
    try:
        for i in range(0, len(names), 50):
            await admin.delete_topics(names[i:i + 50], timeout_ms=30_000)
    finally:
        await admin.close()


@pytest.fixture
def stack_control(cfg: PeerNetConfig) -> Iterator[Any]:
    """stack.manager, for tests that kill and restart a service. Leaves every service it found
    running, running (restarting one that a failed test left stopped), so that a fault test
    never takes the stack away from the tests after it."""
    from stack import manager

    running = {name: manager.pid_of(cfg, name) is not None for name in manager.SERVICES}
    yield manager
    for name, was_running in running.items():
        if was_running and manager.pid_of(cfg, name) is None:
            manager.start_service(cfg, name, wait=True, timeout=SERVICE_RESTART_TIMEOUT_S)


@pytest.fixture(scope="session")
def peernet_server(local_stack: PeerNetConfig, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[Server]:
    if os.environ.get("PEERNET_TEST_REUSE_SERVER"):
        # Development loop: run the tests against a `peernet serve` you started yourself.
        cfg = load_config()
        state = json.loads((cfg.stack.home / "run" / "serve.json").read_text())
        yield Server(url=state["url"], ws_url=state["url"].replace("http", "ws", 1) + "/v1/ws",
                     env=dict(os.environ), cfg=cfg, gcs_address=state["gcs_address"],
                     log_path=Path("/dev/null"))
        return
    env = server_env(local_stack, tmp_path_factory.mktemp("server-home"))
    log_path = tmp_path_factory.mktemp("server") / "peernet-serve.log"
    with running_server(env, log_path, SERVER_START_TIMEOUT_S) as server:
        yield server


@pytest.fixture(scope="session")
def peernet_url(peernet_server: Server) -> str:
    """The base URL of a running PeerNet with development tokens enabled."""
    return peernet_server.url


@pytest.fixture
def ray_cluster(peernet_server: Server) -> Iterator[None]:
    """A Ray client attached to the test server's cluster, for tests that kill its actors."""
    import ray

    from actors.wiring import NAMESPACE

    ray.init(address=peernet_server.gcs_address, namespace=NAMESPACE, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
