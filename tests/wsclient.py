"""A small protocol client for tests: connect, hello, send requests, collect frames."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
import websockets
from ports import listen_port
from websockets.asyncio.client import ClientConnection

from peernet.config import PROJECT_ROOT, PeerNetConfig, load_config

Frame = dict[str, Any]

# How long a test waits for a frame by default: generous, since CI shares 2 cores with Kafka,
# Redis, MongoDB and a Ray cluster. Assertions never depend on it being short.
WAIT_S = 30.0


@dataclass(frozen=True)
class Server:
    """A running `peernet serve` started by the tests."""

    url: str
    ws_url: str
    env: dict[str, str]
    cfg: PeerNetConfig
    gcs_address: str
    log_path: Path

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@contextlib.contextmanager
def running_server(env: dict[str, str], log_path: Path, timeout_s: float) -> Iterator[Server]:
    """`peernet serve` started with `env` as its own process group, yielded once its state file
    exists and /healthz answers 200; stopped (SIGINT, then SIGKILL) on exit. `env` names a home
    of the test's own (server_env): a state file there already is another server's."""
    cfg = load_config(env)
    state_path = cfg.stack.home / "run" / "serve.json"
    if state_path.exists():
        pytest.fail(f"{state_path} exists: the test server needs a home of its own, not the one "
                    "of a running `peernet serve` (./dev up)")
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "cli", "serve"], env=env,
                                cwd=PROJECT_ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
    port = cfg.gateway.port
    url = f"http://127.0.0.1:{port}"
    server = Server(url=url, ws_url=f"ws://127.0.0.1:{port}/v1/ws", env=env, cfg=cfg,
                    gcs_address="", log_path=log_path)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"peernet serve exited with {proc.returncode}:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"peernet serve not healthy in {timeout_s:.0f}s:\n{server.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if state_path.exists() and httpx.get(url + "/healthz", timeout=3).status_code == 200:
                    break
            time.sleep(1)
        state = json.loads(state_path.read_text())
        yield Server(url=url, ws_url=server.ws_url, env=env, cfg=cfg,
                     gcs_address=state["gcs_address"], log_path=log_path)
    finally:
        with contextlib.suppress(ProcessLookupError):  # it may have exited already
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


# Kafka topics of the test servers this session started (tests/conftest.py deletes them at the end).
SERVER_TOPICS: list[str] = []


def unique_user(prefix: str = "u") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


async def dev_token(url: str, user: str) -> str:
    async with httpx.AsyncClient() as http:
        reply = await http.post(f"{url}/v1/dev/token", json={"user": user}, timeout=10)
        reply.raise_for_status()
        return str(reply.json()["token"])


class Client:
    """One connection. Frames not yet consumed wait in arrival order; `next` takes the first
    that matches and leaves the others for later calls."""

    def __init__(self, ws: ClientConnection, user: str, binary: bool) -> None:
        self.ws = ws
        self.user = user
        self.binary = binary
        self.pending: list[Frame] = []
        self._arrived = asyncio.Condition()
        self.welcome: Frame = {}
        self.closed: asyncio.Future[tuple[int | None, str]] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read())
        self._rid = 0

    @classmethod
    async def connect(cls, ws_url: str, http_url: str, user: str, *, resume: int | None = None,
                      binary: bool = True, token: str | None = None) -> Client:
        # The token first: the hello deadline starts when the socket opens.
        token = token or await dev_token(http_url, user)
        ws = await websockets.connect(ws_url, max_size=None)
        client = cls(ws, user, binary)
        hello: Frame = {"t": "hello", "token": token}
        if resume is not None:
            hello["resume"] = resume
        await client.send(hello)
        client.welcome = await client.expect("welcome")
        return client

    async def _read(self) -> None:
        try:
            async for data in self.ws:
                frame = msgpack.unpackb(data) if isinstance(data, bytes) else json.loads(data)
                async with self._arrived:
                    self.pending.append(frame)
                    self._arrived.notify_all()
        except websockets.ConnectionClosed:
            pass
        finally:
            if not self.closed.done():
                self.closed.set_result((self.ws.close_code, self.ws.close_reason or ""))

    async def send(self, frame: Frame) -> None:
        await self.ws.send(msgpack.packb(frame) if self.binary else json.dumps(frame))

    async def send_raw(self, data: bytes | str) -> None:
        await self.ws.send(data)

    async def request(self, frame: Frame, timeout: float = WAIT_S) -> Frame:
        """Send with a fresh rid; the reply (ok, error, or any frame) that carries it."""
        self._rid += 1
        rid = self._rid
        await self.send({**frame, "rid": rid})
        return await self.next(lambda f: f.get("rid") == rid, timeout)

    async def next(self, match: Any = None, timeout: float = WAIT_S) -> Frame:
        """The first waiting frame that `match` accepts, removed from the waiting ones."""
        async with asyncio.timeout(timeout), self._arrived:
            while True:
                for i, frame in enumerate(self.pending):
                    if match is None or match(frame):
                        return self.pending.pop(i)
                await self._arrived.wait()

    async def expect(self, t: str, timeout: float = WAIT_S) -> Frame:
        return await self.next(lambda f: f.get("t") == t, timeout)

    async def items(self, count: int, timeout: float = 2 * WAIT_S) -> list[Frame]:
        """The next `count` inbox items (msg/note), in arrival order."""
        out: list[Frame] = []
        async with asyncio.timeout(timeout):
            while len(out) < count:
                out.append(await self.next(lambda f: f.get("t") in ("msg", "note"), timeout))
        return out

    def cut(self) -> None:
        """Drop the TCP connection without a close handshake (a network cut)."""
        self.ws.transport.abort()

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()

    async def wait_closed(self, timeout: float = 10) -> tuple[int | None, str]:
        return await asyncio.wait_for(asyncio.shield(self.closed), timeout)


async def keep_alive(clients: list[Client], every_s: float = 5) -> None:
    """Ping now and then, so that the idle clients of a long test are not closed with 4408
    (2 x heartbeat without a frame) before it is over. Run it as a task; cancel it at the end."""
    while True:
        await asyncio.sleep(every_s)
        for client in list(clients):
            with contextlib.suppress(websockets.ConnectionClosed):
                await client.send({"t": "ping"})


def server_port(variable: str) -> str:
    """The port `variable` names, or a free one: a fixed default would meet a server already
    running on this machine (another checkout's tests, or `./dev up`)."""
    return os.environ.get(variable) or str(listen_port())


def server_env(cfg: PeerNetConfig, home: Path) -> dict[str, str]:
    """The environment of a test server: its own home (its state file and nothing else there;
    a `./dev up` server's is never touched), port, topics, database, keyspaces and Ray; the
    services of `cfg`'s stack, given by URL; limits made small so the tests that reach them
    stay short."""
    run = uuid.uuid4().hex[:8]
    s = cfg.services
    SERVER_TOPICS.extend([f"peernet.test-{run}.events", f"peernet.test-{run}.messages",
                          f"peernet.test-{run}.inbox"])
    return {
        **os.environ,
        "PEERNET_HOME": str(home),
        "PEERNET_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
        "PEERNET_KAFKA_SECURITY_PROTOCOL": s.kafka_security_protocol,
        "PEERNET_REDIS_URL": s.redis_url,
        "PEERNET_MONGO_URL": s.mongo_url,
        "PEERNET_PORT": server_port("PEERNET_TEST_PORT"),
        "PEERNET_DEV_TOKENS": "1",
        "PEERNET_EVENTS_TOPIC": f"peernet.test-{run}.events",
        "PEERNET_MESSAGES_TOPIC": f"peernet.test-{run}.messages",
        "PEERNET_INBOX_TOPIC": f"peernet.test-{run}.inbox",
        "PEERNET_MONGO_DB": f"peernet_test_{run}",
        "PEERNET_RAY_TMPDIR": f"/tmp/peernet-test-ray-{run}",
        "PEERNET_HELLO_TIMEOUT_S": "2",
        "PEERNET_HEARTBEAT_MS": "15000",
        # A flood is recognised sooner than the default so the test stays short.
        "PEERNET_FLOOD_CLOSE_AFTER": "300",
        # Low, so that the connection flood test opens few sockets; the other tests send no
        # X-Forwarded-For, so HAProxy's connections are not limited (serve/limits.py).
        "PEERNET_MAX_CONNECTIONS_PER_ADDRESS": "20",
        "PEERNET_RAY_NUM_CPUS": "2",
        # Low, so that the celebrity test needs only a few followers; feeds in their own keys.
        "PEERNET_CELEBRITY_THRESHOLD": "5",
        "PEERNET_FEED_KEYSPACE": f"social-test-{run}",
        # A replica's users go offline within this bound when it dies (default 3 x heartbeat,
        # 45 s here): short, so that the replica-kill test takes seconds.
        "PEERNET_PRESENCE_LEASE_MS": "6000",
        "PEERNET_PRESENCE_KEYSPACE": f"presence-test-{run}",
        # Only this server's replicas in its /metrics/cluster.
        "PEERNET_METRICS_KEYSPACE": f"metrics-test-{run}",
    }
