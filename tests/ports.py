"""Free TCP ports for the services a test starts of its own (importable from every suite)."""

from __future__ import annotations

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
