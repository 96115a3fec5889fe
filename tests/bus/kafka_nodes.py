"""Private Kafka nodes for bus tests that need a broker of their own (several brokers, TLS
listeners), run from the jars `peernet stack up` installed with the stack's own command line."""

from __future__ import annotations

import ctypes
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from peernet.config import PeerNetConfig
from stack import kafka as stack_kafka

# A test's node is small: several run beside the stack's broker on a 2-core machine.
HEAP_MB = 256


def require_kafka(cfg: PeerNetConfig) -> None:
    """Fail (never skip) when the Kafka jars or java are missing: CI installs both."""
    if not stack_kafka.libs_installed(cfg):
        pytest.fail(f"the Kafka jars are not in {stack_kafka.libs_dir(cfg)}: run `./dev test` or "
                    "`peernet stack up`, which install them")
    if shutil.which("java") is None:
        pytest.fail("`java` is not on PATH (a JDK 17+; `./dev test` installs it)")


def die_with_parent() -> None:
    """preexec_fn: if pytest itself is killed (a timeout that ends the process), the node goes
    with it."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def start_node(cfg: PeerNetConfig, props: Path, home: Path, log: Path,
               console: Path) -> subprocess.Popen[bytes]:
    """One Kafka node with `props`, in its own process group, its output in `console`."""
    with open(console, "ab") as out:
        return subprocess.Popen(
            stack_kafka.broker_argv(cfg, props, log, HEAP_MB),
            cwd=home, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=die_with_parent)
