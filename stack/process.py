"""The processes of the local stack: starting one detached with a pid file, finding it again, and
stopping it, never touching a process that is not ours."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger("peernet.stack")


class StackError(RuntimeError):
    """The local stack could not do what was asked; the message says why and where to look."""


@dataclass(frozen=True)
class Identity:
    """How to tell this stack's process of a service from every other process: its command line
    (/proc/<pid>/cmdline) starts with `program` (the file name of its first word) and contains
    every one of `markers`, which include a path under the stack's home. So a stale pid file whose
    pid the OS gave to another process, or another stack's service, is never taken for ours."""

    program: str
    markers: tuple[str, ...]

    def matches(self, line: str) -> bool:
        words = line.split(maxsplit=1)
        return (bool(words) and Path(words[0]).name.startswith(self.program)
                and all(m in line for m in self.markers))


@dataclass(frozen=True)
class Launch:
    """How to run one service process."""

    argv: Sequence[str]
    identity: Identity
    cwd: Path
    # Where the process's stdout and stderr go.
    console: Path
    env: Mapping[str, str] | None = field(default=None)


def run_dir(home: Path) -> Path:
    return home / "run"


def logs_dir(home: Path) -> Path:
    return home / "logs"


def pid_file(home: Path, name: str) -> Path:
    return run_dir(home) / f"{name}.pid"


def log_file(home: Path, name: str) -> Path:
    return logs_dir(home) / f"{name}.log"


@contextlib.contextmanager
def home_lock(home: Path) -> Iterator[None]:
    """Serialize stack operations on one home (two `up`s at once must not start two brokers)."""
    run_dir(home).mkdir(parents=True, exist_ok=True)
    with open(run_dir(home) / "stack.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def cmdline(pid: int) -> str:
    """The command line of `pid` with NULs as spaces, or "" when there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def is_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie is dead (and is reaped here when it is our child)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state follows the command name, which is in parentheses and may itself hold spaces.
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X")


def is_ours(pid: int, identity: Identity) -> bool:
    return is_alive(pid) and identity.matches(cmdline(pid))


def find_ours(identity: Identity) -> list[int]:
    """Every live process that is ours by `identity`, pid file or not."""
    return sorted(pid for pid in _pids() if identity.matches(cmdline(pid)) and is_alive(pid))


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def write_pid(path: Path, pid: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pid.tmp")
    tmp.write_text(f"{pid}\n")
    tmp.replace(path)


# How long a process's command line may read as no one's while it rewrites its title.
TITLE_REWRITE_S = 0.2


def owned_pid(path: Path, identity: Identity) -> int | None:
    """The pid of our running process: the one in pid file `path` when it is ours, else one found
    by scanning /proc (then the pid file is rewritten). A stale pid file is removed."""
    pid = read_pid(path)
    if pid is not None and is_ours(pid, identity):
        return pid
    if pid is not None and is_alive(pid):
        # Redis rewrites its process title as it starts (proc-title-template); for that moment
        # its command line matches nothing, and a pid file taken for stale here lost the
        # server a chaos run had just restarted. A second look settles it.
        time.sleep(TITLE_REWRITE_S)
        if is_ours(pid, identity):
            return pid
    if path.exists():
        log.info("removing stale pid file %s (pid %s is not ours or not running)", path, pid)
        path.unlink(missing_ok=True)
    found = find_ours(identity)
    if not found:
        return None
    write_pid(path, found[0])
    return found[0]


def spawn(launch: Launch, pidfile: Path) -> int:
    """Start `launch` detached from us (own session, no terminal) and record its pid."""
    launch.console.parent.mkdir(parents=True, exist_ok=True)
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    launch.cwd.mkdir(parents=True, exist_ok=True)
    with open(launch.console, "ab") as out:
        try:
            proc = subprocess.Popen(
                list(launch.argv), cwd=launch.cwd, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                env=dict(launch.env) if launch.env is not None else None,
            )
        except FileNotFoundError as exc:
            raise StackError(f"cannot start {launch.argv[0]}: {exc}") from None
    write_pid(pidfile, proc.pid)
    log.info("started pid %d: %s", proc.pid, " ".join(launch.argv))
    return proc.pid


def terminate(pid: int, identity: Identity, *, kill: bool = False, timeout: float = 30.0) -> bool:
    """Stop our process `pid` and its process group: SIGTERM, then SIGKILL after `timeout`
    (at once with `kill`). Returns False, touching nothing, when `pid` is not ours."""
    if not is_ours(pid, identity):
        return False
    _signal_group(pid, signal.SIGKILL if kill else signal.SIGTERM)
    deadline = time.monotonic() + (5.0 if kill else timeout)
    while is_alive(pid):
        if time.monotonic() > deadline:
            if kill:
                raise StackError(f"pid {pid} survived SIGKILL")
            log.warning("pid %d still running %.0f s after SIGTERM: sending SIGKILL", pid, timeout)
            _signal_group(pid, signal.SIGKILL)
            kill = True
            deadline = time.monotonic() + 5.0
        time.sleep(0.05)
    return True


def _signal_group(pid: int, sig: signal.Signals) -> None:
    # spawn() made each service the leader of its own session and group, so the group holds the
    # service and whatever it started itself, and nothing else.
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def processes_mentioning(text: str) -> list[int]:
    """Live pids (other than ours) whose command line contains `text`."""
    return sorted(pid for pid in _pids() if text in cmdline(pid) and is_alive(pid))


def _pids() -> Iterator[int]:
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != me:
            yield int(entry.name)


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def tail(path: Path, lines: int = 20) -> str:
    """The last `lines` lines of `path` ("" when it does not exist)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read()
    except FileNotFoundError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def run_step(argv: Sequence[str], *, log_path: Path, what: str, cwd: Path | None = None,
             env: Mapping[str, str] | None = None, timeout: float = 900.0,
             progress_every: float = 20.0) -> None:
    """Run an install or setup command to completion, its output appended to `log_path`, saying
    every `progress_every` seconds that it still runs; on failure raise StackError with the end
    of that output."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(log_path, "ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        try:
            proc = subprocess.Popen(list(argv), cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT,
                                    env=dict(env) if env is not None else None)
        except FileNotFoundError as exc:
            raise StackError(f"{what}: {argv[0]} not found ({exc})") from None
        next_note = started + progress_every
        while True:
            try:
                code = proc.wait(timeout=max(0.05, min(1.0, next_note - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if now - started > timeout:
                proc.kill()
                proc.wait()
                raise StackError(f"{what}: timed out after {timeout:.0f} s; see {log_path}")
            if now >= next_note:
                say(f"{what}: still running ({now - started:.0f} s; output in {log_path})")
                next_note = now + progress_every
    if code != 0:
        raise StackError(f"{what} failed (exit {code}); last lines of {log_path}:\n"
                         f"{tail(log_path)}")


def say(message: str) -> None:
    """A progress line for the person running `peernet stack`."""
    print(f"stack: {message}", flush=True)
    log.debug(message)


def redact_url(url: str) -> str:
    """`url` without its password, for printing."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
