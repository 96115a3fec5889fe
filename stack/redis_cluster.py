"""A throwaway Redis Cluster on one machine, for tests and developers: N masters of Debian's
redis-server on 127.0.0.1, reached as `redis+cluster://127.0.0.1:P1,...`. Production points
PEERNET_REDIS_URL at a real cluster; nothing of PeerNet's own stack starts this one."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from stack.process import StackError, log, run_step, tail

if TYPE_CHECKING:
    import redis

HOST = "127.0.0.1"
SLOTS = 16384
# redis-cli --cluster create refuses fewer masters than this.
MIN_MASTERS = 3


def cluster_info(client: redis.Redis) -> dict[str, str]:
    """CLUSTER INFO of the node `client` talks to, as strings (redis-py parses it into a dict)."""
    return {str(k): str(v) for k, v in dict(client.cluster("INFO")).items()}


class LocalRedisCluster:
    """Nodes of redis-server at `ports` (`replicas` replicas per master: redis-cli makes the
    first len(ports) / (1 + replicas) nodes the masters), each in its own subdirectory of
    `directory`, run by us (not daemonized) so that stop() can end them. Each start() makes a new
    cluster: the nodes' nodes.conf of an earlier run is removed. A node's cluster bus listens on
    its `bus_ports` entry, by default its port + 10000 (which must then be free and at most 65535:
    give free bus ports when the ports are the OS's ephemeral ones)."""

    def __init__(self, directory: Path, ports: Sequence[int], *,
                 bus_ports: Sequence[int] | None = None, replicas: int = 0,
                 ready_timeout: float = 30.0, stop_timeout: float = 10.0) -> None:
        if replicas < 0 or len(ports) % (1 + replicas):
            raise ValueError(f"{len(ports)} nodes do not make masters with {replicas} replicas each")
        if len(ports) // (1 + replicas) < MIN_MASTERS:
            raise ValueError(f"a Redis Cluster needs at least {MIN_MASTERS} masters, got {ports}")
        self.replicas = replicas
        if bus_ports is not None and len(bus_ports) != len(ports):
            raise ValueError("one bus port per node")
        self.directory = directory
        self.ports = tuple(ports)
        self.bus_ports = tuple(bus_ports) if bus_ports is not None else tuple(p + 10000 for p in ports)
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self._procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{HOST}:{p}" for p in self.ports)

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(p.pid for p in self._procs)

    def node_dir(self, i: int) -> Path:
        return self.directory / f"node-{self.ports[i]}"

    def node_log(self, i: int) -> Path:
        return self.node_dir(i) / "redis.log"

    def start(self) -> None:
        if self._procs:
            raise StackError(f"the Redis Cluster on {self.url} is already started")
        server = shutil.which("redis-server")
        if server is None:
            raise StackError("redis-server is not on PATH (`peernet stack up` installs it)")
        started = time.monotonic()
        try:
            for i in range(len(self.ports)):
                self._procs.append(self._spawn(server, i))
            deadline = started + self.ready_timeout
            for i in range(len(self.ports)):
                self._wait(i, deadline, "answer PING", lambda c: bool(c.ping()))
            create_log = self.directory / "cluster-create.log"
            run_step(["redis-cli", "--cluster", "create", *(f"{HOST}:{p}" for p in self.ports),
                     "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                     log_path=create_log, what="redis-cli --cluster create",
                     timeout=self.ready_timeout)
            for i in range(len(self.ports)):
                self._wait(i, deadline, "report the whole cluster ok", self._cluster_ok)
        except BaseException:
            self.stop()
            raise
        log.info("Redis Cluster up on %s in %.1f s", self.url, time.monotonic() - started)

    def stop(self) -> None:
        """SIGTERM to every node, SIGKILL to those still running after `stop_timeout`."""
        for proc in self._procs:
            self._signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for proc in self._procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("redis-server pid %d ignored SIGTERM: sending SIGKILL", proc.pid)
                self._signal(proc, signal.SIGKILL)
                proc.wait()
        self._procs.clear()

    def kill(self, port: int) -> None:
        """SIGKILL the node on `port`, as a crash would (its replica, if any, takes over after
        the node timeout of 2 s)."""
        proc = self._procs[self.ports.index(port)]
        self._signal(proc, signal.SIGKILL)
        proc.wait()

    def __enter__(self) -> LocalRedisCluster:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _spawn(self, server: str, i: int) -> subprocess.Popen[bytes]:
        node_dir = self.node_dir(i)
        node_dir.mkdir(parents=True, exist_ok=True)
        # A node that finds an earlier cluster's nodes.conf rejoins it, and create then fails.
        (node_dir / "nodes.conf").unlink(missing_ok=True)
        argv = [server, "--port", str(self.ports[i]), "--cluster-port", str(self.bus_ports[i]),
                "--bind", HOST, "--protected-mode", "yes", "--daemonize", "no",
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "2000", "--save", "", "--appendonly", "no",
                "--dir", str(node_dir), "--logfile", str(self.node_log(i))]
        # What the server says before its log file is open (a bad option) goes to the same file.
        with open(self.node_log(i), "ab") as out:
            return subprocess.Popen(argv, cwd=node_dir, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def _wait(self, i: int, deadline: float, what: str, check: Callable[[redis.Redis], bool]) -> None:
        import redis

        port, proc = self.ports[i], self._procs[i]
        client = redis.Redis(host=HOST, port=port, socket_timeout=1.0, socket_connect_timeout=1.0,
                             decode_responses=True)
        try:
            while True:
                if proc.poll() is not None:
                    raise StackError(f"redis-server on port {port} exited ({proc.returncode}); "
                                     f"last lines of {self.node_log(i)}:\n{tail(self.node_log(i))}")
                try:
                    if check(client):
                        return
                    last = "not yet"
                except redis.RedisError as exc:
                    last = repr(exc)
                if time.monotonic() > deadline:
                    raise StackError(f"redis-server on port {port} did not {what} within "
                                     f"{self.ready_timeout:.0f} s ({last}); last lines of "
                                     f"{self.node_log(i)}:\n{tail(self.node_log(i))}")
                time.sleep(0.05)
        finally:
            client.close()

    def _cluster_ok(self, client: redis.Redis) -> bool:
        info = cluster_info(client)
        return (info.get("cluster_state") == "ok"
                and info.get("cluster_slots_assigned") == str(SLOTS)
                and info.get("cluster_known_nodes") == str(len(self.ports)))

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        # Each node leads its own process group (start_new_session), holding it alone.
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass

