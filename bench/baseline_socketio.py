"""The baseline peer: how Python users scale Socket.IO today. A python-socketio AsyncServer with
an AsyncRedisManager, under uvicorn, several server processes sharing one Redis.

It implements the equivalent of PeerNet's `dm`: a client connects with auth `{"user": ID}` and
joins the room named by its id; a `dm` event `{"to", "body", "cid"}` is emitted as `msg` to the
recipient's and the sender's rooms (through Redis pub/sub, so it reaches every server process),
and acknowledged to the sender with `{"id", "conv", "ts"}`. Nothing is stored: a message sent
while its recipient is disconnected is gone.

`python -m bench.baseline_socketio --port 8101` runs one server process; `BaselineCluster` starts
and stops the set the harness measures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench.client import SetupError

USER_RE = re.compile(r"^[a-z0-9_]{1,32}$")
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


def build_app(redis_url: str = DEFAULT_REDIS, channel: str = "peernet-bench-baseline") -> Any:
    import socketio

    mgr = socketio.AsyncRedisManager(redis_url, channel=channel)
    sio = socketio.AsyncServer(async_mode="asgi", client_manager=mgr, transports=["websocket"],
                               cors_allowed_origins=[])
    users: dict[str, str] = {}

    @sio.event
    async def connect(sid: str, environ: dict[str, Any], auth: Any) -> bool:
        user = auth.get("user") if isinstance(auth, dict) else None
        if not isinstance(user, str) or not USER_RE.match(user):
            return False
        users[sid] = user
        await sio.enter_room(sid, user)
        return True

    @sio.event
    async def disconnect(sid: str, *args: Any) -> None:
        users.pop(sid, None)

    @sio.on("dm")
    async def dm(sid: str, data: Any) -> dict[str, Any]:
        user = users.get(sid)
        if user is None or not isinstance(data, dict):
            return {"error": "bad_request"}
        to, body = data.get("to"), data.get("body")
        if not isinstance(to, str) or not USER_RE.match(to) or to == user:
            return {"error": "bad_request"}
        if not isinstance(body, str) or not 1 <= len(body) <= 4000:
            return {"error": "bad_request"}
        lo, hi = sorted((user, to))
        msg = {"id": uuid.uuid4().hex, "conv": f"dm:{lo}:{hi}", "from": user, "to": to, "body": body,
               "ts": int(time.time() * 1000)}
        await sio.emit("msg", msg, to=[to, user])
        return {"id": msg["id"], "conv": msg["conv"], "ts": msg["ts"]}

    return socketio.ASGIApp(sio)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline_socketio", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8101)
    parser.add_argument("--redis-url", default=DEFAULT_REDIS)
    parser.add_argument("--channel", default="peernet-bench-baseline")
    args = parser.parse_args(argv)
    import uvicorn

    uvicorn.run(build_app(args.redis_url, args.channel), host=args.host, port=args.port,
                log_level="warning", access_log=False)
    return 0


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def redis_reachable(url: str) -> bool:
    """Whether the Redis at `url` answers PING (a raw socket: no client library needed)."""
    from urllib.parse import urlparse

    u = urlparse(url)
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or 6379), timeout=2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class BaselineCluster:
    """Starts the baseline's server processes (one per port) and stops them. Each run gets its
    own Redis pub/sub channel, so nothing else on that Redis hears it."""

    def __init__(self, ports: tuple[int, ...] = (8101, 8102), *, redis_url: str = DEFAULT_REDIS,
                 log_dir: Path | None = None) -> None:
        self.ports = ports
        self.redis_url = redis_url
        self.log_dir = log_dir
        self.channel = f"peernet-bench-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _spawn(self) -> None:
        root = Path(__file__).resolve().parent.parent
        env = dict(os.environ)
        env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
        if self.log_dir is not None:
            Path(self.log_dir).mkdir(parents=True, exist_ok=True)
        for port in self.ports:
            cmd = [sys.executable, "-m", "bench.baseline_socketio", "--port", str(port),
                   "--redis-url", self.redis_url, "--channel", self.channel]
            if self.log_dir is None:
                proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT)
            else:
                with open(Path(self.log_dir) / f"baseline-{port}.log", "wb") as log:
                    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
            self.procs.append(proc)

    async def start(self, within_s: float = 20.0) -> None:
        if not redis_reachable(self.redis_url):
            raise SetupError(f"the baseline needs Redis at {self.redis_url}, which does not answer PING")
        busy = [p for p in self.ports if not _port_free(p)]
        if busy:
            raise SetupError(f"port(s) {busy} already in use: pass other --baseline-ports")
        self._spawn()
        deadline = time.monotonic() + within_s
        for port, proc in zip(self.ports, self.procs, strict=True):
            while _port_free(port):
                if proc.poll() is not None:
                    await self.stop()
                    raise SetupError(f"baseline server on port {port} exited with {proc.returncode}")
                if time.monotonic() > deadline:
                    await self.stop()
                    raise SetupError(f"baseline server on port {port} not up within {within_s:.0f} s")
                await asyncio.sleep(0.2)

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

    async def __aenter__(self) -> BaselineCluster:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


if __name__ == "__main__":
    sys.exit(main())
