"""The local development stack: `peernet stack up|down|status`, and the start/stop/wait calls
that tests and the fault harness use on single services ("kafka", "redis", "mongo").

Everything lives under cfg.stack.home: downloads, data, logs (logs/<service>.log) and pid files
(run/<service>.pid). A service given by its PEERNET_* address is the user's own (external): it is
checked, never installed, started or stopped."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from bus.topics import peernet_topics
from peernet.config import PeerNetConfig
from stack.kafka import KAFKA, ensure_topics, run_sync
from stack.kafka import security as kafka_security
from stack.mongo import MONGO
from stack.process import (
    StackError,
    find_ours,
    home_lock,
    owned_pid,
    pid_file,
    port_in_use,
    say,
    spawn,
    tail,
    terminate,
)
from stack.redis import REDIS
from stack.service import Service

log = logging.getLogger("peernet.stack")

S = TypeVar("S")
R = TypeVar("R")

SERVICES: dict[str, Service] = {s.name: s for s in (KAFKA, REDIS, MONGO)}
# How long `up` and `status` give an external service to answer.
EXTERNAL_TIMEOUT = 10.0
STOP_TIMEOUT = 30.0

__all__ = [
    "SERVICES",
    "ServiceStatus",
    "StackError",
    "down",
    "pid_of",
    "print_status",
    "start_service",
    "status",
    "stop_service",
    "up",
    "wait_ready",
]


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    # "running" (answers), "unhealthy" (our process runs but does not answer; an external one
    # that does not answer), "stopped" (no process of ours).
    state: str
    external: bool
    address: str
    pid: int | None
    detail: str

    @property
    def healthy(self) -> bool:
        return self.state == "running"


def service(name: str) -> Service:
    try:
        return SERVICES[name]
    except KeyError:
        raise StackError(f"no service {name!r}; the stack has {', '.join(SERVICES)}") from None


# --- single services -------------------------------------------------------------------------


def pid_of(cfg: PeerNetConfig, name: str) -> int | None:
    """The pid of this stack's running process of `name` (None when it is not running or is
    external)."""
    svc = service(name)
    if svc.is_external(cfg):
        return None
    return owned_pid(pid_file(cfg.stack.home, name), svc.identity(cfg))


def start_service(cfg: PeerNetConfig, name: str, *, wait: bool = True,
                  timeout: float | None = None) -> int:
    """Start this stack's `name` unless it runs already (installing it first if needed); with
    `wait`, return only once it answers a real request. Returns its pid."""
    svc = service(name)
    if svc.is_external(cfg):
        raise StackError(f"{name} is external ({svc.address(cfg)}): the stack does not start it")
    with home_lock(cfg.stack.home):
        pid = pid_of(cfg, name)
        if pid is None:
            svc.install(cfg)
            pid = _spawn(cfg, svc)
    if wait:
        wait_ready(cfg, name, timeout)
    return pid


def stop_service(cfg: PeerNetConfig, name: str, *, kill: bool = False,
                 timeout: float = STOP_TIMEOUT) -> bool:
    """Stop this stack's `name`: SIGTERM, then SIGKILL after `timeout` seconds (`kill`: SIGKILL at
    once, as a crash would). Only a process that is ours by its command line is signalled.
    Returns True when a process was stopped; harmless when none runs. An external service is
    never touched."""
    svc = service(name)
    if svc.is_external(cfg):
        return False
    identity = svc.identity(cfg)
    path = pid_file(cfg.stack.home, name)
    stopped = False
    # The pid file's process, and any other of ours (say, its pid file was deleted by hand).
    pids = {p for p in (owned_pid(path, identity),) if p is not None} | set(find_ours(identity))
    for pid in sorted(pids):
        log.info("stopping %s pid %d (%s)", name, pid, "SIGKILL" if kill else "SIGTERM")
        stopped |= terminate(pid, identity, kill=kill, timeout=timeout)
    path.unlink(missing_ok=True)
    return stopped


def wait_ready(cfg: PeerNetConfig, name: str, timeout: float | None = None) -> str:
    """Wait until `name` answers a real request (Kafka: metadata with a controller; Redis: PING;
    MongoDB: ping). Returns what answered. Raises StackError after `timeout` seconds (default: the
    service's own), or as soon as our process of it has exited, with the end of its log."""
    svc = service(name)
    external = svc.is_external(cfg)
    if timeout is None:
        timeout = EXTERNAL_TIMEOUT if external else svc.ready_timeout
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        if not external and pid_of(cfg, name) is None:
            raise StackError(f"{name} is not running (it exited, or was never started)"
                             f"{_log_excerpt(cfg, svc)}")
        remaining = deadline - time.monotonic()
        try:
            return svc.probe(cfg, max(0.5, min(5.0, remaining)))
        except Exception as exc:  # any failure of the request means "not ready yet"
            last = exc
        if time.monotonic() >= deadline:
            raise StackError(f"{name} at {svc.address(cfg)} did not answer within {timeout:.0f} s "
                             f"({last!r}){'' if external else _log_excerpt(cfg, svc)}")
        time.sleep(0.2)


# A process just killed (SIGKILL) can hold its ports a moment after it reads as dead: the JVM's
# other threads are still exiting. A port is called taken only once it stays taken this long.
PORT_RELEASE_GRACE_S = 5.0


def _spawn(cfg: PeerNetConfig, svc: Service) -> int:
    for port in svc.ports(cfg):
        deadline = time.monotonic() + PORT_RELEASE_GRACE_S
        while port_in_use("127.0.0.1", port) and time.monotonic() < deadline:
            time.sleep(0.1)
        if port_in_use("127.0.0.1", port):
            raise StackError(
                f"{svc.name}: port 127.0.0.1:{port} is taken by a process that is not this "
                f"stack's (home {cfg.stack.home}). Stop it, or choose other ports "
                "(PEERNET_STACK_*_PORT), or point PeerNet at it as an external service.")
    return spawn(svc.launch(cfg), pid_file(cfg.stack.home, svc.name))


def _log_excerpt(cfg: PeerNetConfig, svc: Service) -> str:
    parts = []
    for path in svc.logs(cfg):
        text = tail(path, 25)
        if text:
            parts.append(f"\n--- last lines of {path} ---\n{text}")
    main_log = svc.logs(cfg)[0]
    return "".join(parts) or f"\n(nothing in its log {main_log})"


# --- the whole stack -------------------------------------------------------------------------


def up(cfg: PeerNetConfig) -> list[ServiceStatus]:
    """Install what is missing, start every managed service that is not running, wait until each
    service (managed or external) answers, and create PeerNet's Kafka topics. Harmless to repeat:
    running services are found by pid file and a real request, and left as they are."""
    t0 = time.monotonic()
    home = cfg.stack.home
    managed = [s for s in SERVICES.values() if not s.is_external(cfg)]
    started: dict[str, int] = {}
    found: dict[str, int] = {}
    with home_lock(home):
        for svc in managed:
            pid = pid_of(cfg, svc.name)
            if pid is not None:
                found[svc.name] = pid
        to_start = [s for s in managed if s.name not in found]

        def install_and_spawn(svc: Service) -> int:
            svc.install(cfg)
            return _spawn(cfg, svc)

        # mvn, apt-get and pip are independent: each service is fetched and started in its own
        # thread, so Kafka boots while pip still installs SecantusDB.
        started = dict(zip([s.name for s in to_start], _each(to_start, install_and_spawn),
                           strict=True))
    results: list[ServiceStatus] = []
    errors: list[str] = []
    for svc in SERVICES.values():
        external = svc.is_external(cfg)
        try:
            detail = wait_ready(cfg, svc.name)
        except StackError as exc:
            if svc.name in started:
                # A half-started service would make the next `up` wait on it again: stop it.
                stop_service(cfg, svc.name)
            errors.append(str(exc))
            continue
        pid = started.get(svc.name) or found.get(svc.name)
        state = "external" if external else "started" if svc.name in started else "running"
        results.append(ServiceStatus(svc.name, "running", external, svc.address(cfg), pid, detail))
        where = svc.address(cfg)
        if external:
            say(f"{svc.name:<6} external          {where}  ({detail})")
        else:
            say(f"{svc.name:<6} {state:<8} pid {pid:<7} {where}  log {svc.logs(cfg)[0]}  ({detail})")
    if errors:
        raise StackError("stack up failed:\n" + "\n\n".join(errors))
    created = run_sync(ensure_topics(KAFKA.address(cfg), peernet_topics(cfg),
                                     security=kafka_security(cfg)))
    names = ", ".join(s.name for s in peernet_topics(cfg))
    say(f"topics {names}: " + (f"created {', '.join(created)}" if created else "present"))
    say(f"up in {time.monotonic() - t0:.1f} s (home {home})")
    return results


def down(cfg: PeerNetConfig) -> None:
    """Stop every service this stack started (external ones are left alone) and remove their pid
    files. Harmless when nothing runs."""
    with home_lock(cfg.stack.home):
        def stop(svc: Service) -> str:
            if svc.is_external(cfg):
                return f"{svc.name:<6} external, left running ({svc.address(cfg)})"
            pid = pid_of(cfg, svc.name)
            if stop_service(cfg, svc.name):
                return f"{svc.name:<6} stopped (pid {pid})"
            return f"{svc.name:<6} was not running"

        for line in _each(list(SERVICES.values()), stop):
            say(line)


def status(cfg: PeerNetConfig) -> list[ServiceStatus]:
    """The state of each service, from its pid file and one real request."""
    out = []
    for svc in SERVICES.values():
        external = svc.is_external(cfg)
        pid = None if external else pid_of(cfg, svc.name)
        if not external and pid is None:
            out.append(ServiceStatus(svc.name, "stopped", False, svc.address(cfg), None, ""))
            continue
        try:
            detail = svc.probe(cfg, 3.0)
            state = "running"
        except Exception as exc:  # the service does not answer: report, never raise
            detail, state = f"{type(exc).__name__}: {exc}".splitlines()[0][:200], "unhealthy"
        out.append(ServiceStatus(svc.name, state, external, svc.address(cfg), pid, detail))
    return out


def print_status(cfg: PeerNetConfig) -> bool:
    """Print one line per service; True when every service answers."""
    rows = status(cfg)
    for row in rows:
        owner = "external" if row.external else f"pid {row.pid}" if row.pid else "-"
        print(f"{row.name:<6} {row.state:<9} {owner:<12} {row.address:<22} {row.detail}".rstrip())
    return all(r.healthy for r in rows)


def _each(items: list[S], fn: Callable[[S], R]) -> list[R]:
    """fn over items in parallel threads, results in order; the first failure is raised."""
    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        return list(pool.map(fn, items))
