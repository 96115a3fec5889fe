"""The strongest peer: Centrifugo, built once from the Go module proxy into the project's own
folder, run as two nodes on 127.0.0.1 that share the stack's Redis as their engine.

Each user has a personal channel `inbox:#<user>` (only that user may subscribe) and a followers
channel `feed:<user>`; both namespaces keep history (10,000 publications for 7 days, in Redis)
and force recovery on subscribe, the closest Centrifugo comes to PeerNet's inbox and `resume`.
Clients publish straight from their connections (`allow_publish_for_client`): no backend sits
in the path, which is the cheapest way Centrifugo can carry a DM. Connections authenticate with
HS256 JWTs signed with the configuration's secret.

`CentrifugoCluster` installs (first use only), starts and stops the nodes, and removes the keys
they wrote to Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from bench.baseline_socketio import redis_reachable
from bench.client import SetupError

VERSION = "6.9.1"
MODULE = "github.com/centrifugal/centrifugo/v6"
# The build stamps its version here; without it `centrifugo version` says 0.0.0.
VERSION_SYMBOL = f"{MODULE}/internal/build.Version"
ROOT = Path(__file__).resolve().parent.parent
# Channels: the personal inbox (user-limited) and the author's followers channel.
INBOX_NS = "inbox"
FEED_NS = "feed"
HISTORY_SIZE = 10_000
HISTORY_TTL = "168h"  # 7 days
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
# A first build compiles ~200 modules: minutes on a small machine, so say so while it runs.
BUILD_TIMEOUT_S = 1800.0
BUILD_NOTE_EVERY_S = 20.0


def inbox_channel(user: str) -> str:
    """The user's personal channel: `#` makes it user-limited (only `user` may subscribe)."""
    return f"{INBOX_NS}:#{user}"


def feed_channel(user: str) -> str:
    return f"{FEED_NS}:{user}"


def home_dir() -> Path:
    """Where the stack keeps what it installs (Kafka's jars): $PEERNET_HOME or ./.peernet."""
    env = os.environ.get("PEERNET_HOME")
    return Path(env) if env else ROOT / ".peernet"


def binary_path(home: Path | None = None) -> Path:
    return (home or home_dir()) / "centrifugo" / VERSION / "centrifugo"


def installed_version(binary: Path) -> str | None:
    """What `centrifugo version` reports, or None when the file is missing or does not run."""
    if not binary.is_file():
        return None
    try:
        out = subprocess.run([str(binary), "version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


async def ensure_installed(say: Callable[[str], None], home: Path | None = None) -> Path:
    """The Centrifugo binary, built with `go install` on first use and reused afterwards."""
    return await asyncio.to_thread(install, say, home)


def install(say: Callable[[str], None], home: Path | None = None) -> Path:
    """Build Centrifugo into the project's folder unless it is there already; return its path.

    The build goes to a staging folder and is renamed into place, so an interrupted build never
    leaves a binary that looks installed; a file lock keeps two harnesses from building at once.
    """
    binary = binary_path(home)
    if installed_version(binary) is not None:
        return binary
    go = shutil.which("go")
    if go is None:
        raise SetupError(f"Centrifugo {VERSION} is built from source with the Go toolchain, and `go` is not "
                         "on PATH: install Go (1.26 or newer, as its go.mod asks) and run again")
    binary.parent.mkdir(parents=True, exist_ok=True)
    with open(binary.parent / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if installed_version(binary) is None:  # else another harness built it meanwhile
                _build(go, binary, say)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    version = installed_version(binary)
    if version is None:
        raise SetupError(f"the Centrifugo built into {binary} does not run `centrifugo version`")
    say(f"[centrifugo] installed {version} at {binary}")
    return binary


def _build(go: str, binary: Path, say: Callable[[str], None]) -> None:
    staging = binary.parent / "staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    log_path = binary.parent / "install.log"
    env = dict(os.environ, GOBIN=str(staging))
    # -trimpath: no build machine paths inside the binary (and a stable build cache key).
    argv = [go, "install", "-trimpath", f"-ldflags=-X {VERSION_SYMBOL}={VERSION}", f"{MODULE}@v{VERSION}"]
    say(f"[centrifugo] building Centrifugo {VERSION} with `go install` from the Go module proxy into "
        f"{binary.parent} (first use only; a few CPU-minutes; output in {log_path})")
    started = time.monotonic()
    with open(log_path, "ab") as log:
        log.write(f"\n$ GOBIN={staging} {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                try:
                    proc.wait(BUILD_NOTE_EVERY_S)
                    break
                except subprocess.TimeoutExpired:
                    elapsed = time.monotonic() - started
                    if elapsed > BUILD_TIMEOUT_S:
                        raise SetupError(f"building Centrifugo took over {BUILD_TIMEOUT_S:.0f} s; "
                                         f"see {log_path}") from None
                    say(f"[centrifugo] still building ({elapsed:.0f} s)")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    built = staging / "centrifugo"
    if proc.returncode != 0 or not built.is_file():
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        raise SetupError(f"`go install {MODULE}@v{VERSION}` failed with {proc.returncode}:\n"
                         + "\n".join(tail))
    built.replace(binary)
    shutil.rmtree(staging, ignore_errors=True)


@dataclass(frozen=True)
class NodeSettings:
    """What differs between the nodes of one cluster and what they share."""

    port: int
    redis_url: str
    prefix: str
    secret: str


def node_config(s: NodeSettings) -> dict[str, Any]:
    """One node's configuration (Centrifugo v6's layout)."""
    u = urlparse(s.redis_url)
    db = int(u.path.strip("/") or 0)
    channel_options = {
        "history_size": HISTORY_SIZE,
        "history_ttl": HISTORY_TTL,
        "force_recovery": True,
        # The sender publishes into the recipient's channel without being subscribed to it.
        "allow_publish_for_client": True,
    }
    return {
        "http_server": {"address": "127.0.0.1", "port": s.port},
        "log": {"level": "warn"},
        "usage_stats": {"disabled": True},
        "engine": {
            "type": "redis",
            "redis": {
                "address": [f"redis://{u.hostname or '127.0.0.1'}:{u.port or 6379}"],
                "db": db,
                # PUB/SUB is shared by every database of a Redis, so the prefix (which Centrifugo
                # puts on every key and PUB/SUB channel) is what keeps this run apart from PeerNet
                # and from other runs.
                "prefix": s.prefix,
            },
        },
        "client": {
            "token": {"hmac_secret_key": s.secret},
            # Recovery may return the whole history, not the default 300, so a long disconnect
            # is still recovered (or reported as not recovered) the way PeerNet's resume is.
            "recovery_max_publication_limit": HISTORY_SIZE,
        },
        "channel": {
            "namespaces": [
                {"name": INBOX_NS, "allow_user_limited_channels": True, **channel_options},
                {"name": FEED_NS, "allow_subscribe_for_client": True, **channel_options},
            ],
        },
    }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class CentrifugoCluster:
    """Two Centrifugo nodes (or `nodes`) on free ports of 127.0.0.1, one Redis engine. Use as
    `async with`, or `start()` then `stop()`; `stop()` also removes the keys of this run."""

    def __init__(self, *, nodes: int = 2, redis_url: str = DEFAULT_REDIS, log_dir: Path | None = None,
                 home: Path | None = None, say: Callable[[str], None] = print) -> None:
        self.nodes = nodes
        self.redis_url = redis_url
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.home = home
        self.say = say
        self.prefix = f"peernet-bench-centrifugo-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.secret = secrets.token_urlsafe(32)
        self.ports: list[int] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.binary: Path | None = None
        self.version = ""
        self._run_dir: Path | None = None

    @property
    def urls(self) -> list[str]:
        return [f"ws://127.0.0.1:{p}/connection/websocket" for p in self.ports]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def describe(self) -> str:
        return (f"{self.version or 'Centrifugo ' + VERSION} at {self.binary}, {self.nodes} nodes on ports "
                f"{', '.join(map(str, self.ports))}, Redis engine at {self.redis_url} with key prefix "
                f"{self.prefix!r}; channels {INBOX_NS}:#<user> and {FEED_NS}:<user> keep "
                f"{HISTORY_SIZE:,} publications for {HISTORY_TTL} with recovery forced on subscribe; "
                "publications are acknowledged once Redis holds them in memory (no disk write awaited)")

    async def start(self, within_s: float = 30.0) -> None:
        if not redis_reachable(self.redis_url):
            raise SetupError(f"Centrifugo's engine needs Redis at {self.redis_url}, "
                             "which does not answer PING")
        self.binary = await ensure_installed(self.say, self.home)
        self.version = installed_version(self.binary) or ""
        # Configurations and logs go with the run's results, or to a folder removed at stop().
        self._run_dir = self.log_dir or Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self._run_dir.mkdir(parents=True, exist_ok=True)
        self.ports = []
        for _ in range(self.nodes):
            port = free_port()
            while port in self.ports:
                port = free_port()
            self.ports.append(port)
        try:
            for port in self.ports:
                self._spawn(port)
            await self._until_up(within_s)
        except BaseException:
            await self.stop()
            raise

    def _spawn(self, port: int) -> None:
        assert self.binary is not None and self._run_dir is not None
        config = node_config(NodeSettings(port, self.redis_url, self.prefix, self.secret))
        path = self._run_dir / f"centrifugo-{port}.json"
        path.write_text(json.dumps(config, indent=2) + "\n")
        path.chmod(0o600)  # it holds the token secret
        with open(self._run_dir / f"centrifugo-{port}.log", "wb") as log:
            self.procs.append(subprocess.Popen([str(self.binary), "--config", str(path)],
                                               cwd=self._run_dir, stdin=subprocess.DEVNULL,
                                               stdout=log, stderr=subprocess.STDOUT))

    async def _until_up(self, within_s: float) -> None:
        deadline = time.monotonic() + within_s
        for port, proc in zip(self.ports, self.procs, strict=True):
            while not _port_open(port):
                if proc.poll() is not None:
                    raise SetupError(f"Centrifugo on port {port} exited with {proc.returncode}: "
                                     f"{self._log_tail(port)}")
                if time.monotonic() > deadline:
                    raise SetupError(f"Centrifugo on port {port} not up within {within_s:.0f} s")
                await asyncio.sleep(0.1)

    def _log_tail(self, port: int) -> str:
        if self._run_dir is None:
            return ""
        with contextlib.suppress(OSError):
            lines = (self._run_dir / f"centrifugo-{port}.log").read_text(errors="replace").splitlines()
            return " | ".join(lines[-5:])[:600]
        return ""

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait, 5)
        self.procs = []
        if self.log_dir is None and self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
        with contextlib.suppress(Exception):
            await self.remove_keys()

    async def remove_keys(self) -> int:
        """Delete every Redis key of this run (history streams and their metadata): the stack's
        Redis keeps no benchmark data after the run."""
        import redis.asyncio as aioredis

        client = aioredis.from_url(self.redis_url)
        removed = 0
        try:
            batch: list[bytes] = []
            async for key in client.scan_iter(match=f"{self.prefix}*", count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    removed += int(await client.unlink(*batch))
                    batch = []
            if batch:
                removed += int(await client.unlink(*batch))
        finally:
            await client.aclose()
        return removed

    async def __aenter__(self) -> CentrifugoCluster:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
