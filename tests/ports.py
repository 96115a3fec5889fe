"""Free TCP ports for the services a test starts of its own (importable from every suite)."""

from __future__ import annotations

import random
import socket

# Ports the local stack and the test server use: never a test's own.
RESERVED_PORTS = {8000, 18080, 9092, 9093, 6379, 27017}


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports of 127.0.0.1 (all bound at once, then released)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        ports = [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()
    assert not RESERVED_PORTS & set(ports)
    return ports


# Below the kernel's ephemeral ports (32768 and up), which an outgoing connection may take
# between the draw and the bind, and above Ray's worker ports (10002-19999).
LISTEN_PORTS = range(23000, 32000)


def listen_port() -> int:
    """A free TCP port for a server a test starts that binds it only later (a test server's
    HAProxy, once Ray is up): drawn below the ephemeral range, never a reserved one."""
    for _ in range(100):
        port = random.choice(LISTEN_PORTS)
        if port in RESERVED_PORTS:
            continue
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        return port
    raise AssertionError(f"no free port in {LISTEN_PORTS}")
