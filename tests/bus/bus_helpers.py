"""Helpers of the bus contract suites (importable from test modules, unlike conftest)."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from waiting import eventually as eventually  # re-exported: the bus suites' waits

from bus.cache import Cache
from bus.eventlog import EventLog
from bus.pubsub import PubSub
from bus.store import DocumentStore
from peernet.config import PeerNetConfig

# How long a stack test waits for a service that is (re)starting before it fails.
SERVICE_WAIT_S = 90.0


def unique(prefix: str) -> str:
    """A name no other test (or earlier run) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def closed_port() -> int:
    """A local TCP port nothing listens on (for "service unreachable" tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def eventually_equal(probe: Callable[[], Awaitable[object]], expected: object,
                           within_s: float = 5.0) -> None:
    """Wait until `await probe()` equals `expected`."""
    deadline = time.monotonic() + within_s
    while (value := await probe()) != expected:
        assert time.monotonic() < deadline, f"{value!r} != {expected!r} after {within_s}s"
        await asyncio.sleep(0.02)


@dataclass(frozen=True)
class Services:
    kafka_bootstrap: str
    redis_url: str
    mongo_url: str


def service_addresses(cfg: PeerNetConfig) -> Services:
    """cfg.services, except that a service the local stack runs (not external) is reached on
    the stack's port: with PEERNET_STACK_*_PORT set (a second stack beside the default one),
    cfg.services still holds the default addresses."""
    s, st = cfg.services, cfg.stack
    return Services(
        s.kafka_bootstrap if s.kafka_external else f"127.0.0.1:{st.kafka_port}",
        s.redis_url if s.redis_external else f"redis://127.0.0.1:{st.redis_port}/0",
        s.mongo_url if s.mongo_external
        else f"mongodb://127.0.0.1:{st.mongo_port}/?directConnection=true",
    )


@dataclass
class LogKit:
    kind: str
    make: Callable[[], Awaitable[EventLog]]
    # A started-or-not log whose backend cannot be reached; `start` is the caller's.
    unreachable: Callable[[], EventLog]
    created: list[EventLog] = field(default_factory=list)


@dataclass
class PubSubKit:
    kind: str
    # A new process-like instance connected to the same broker, started.
    make: Callable[[], Awaitable[PubSub]]
    # How many processes the broker has subscribed to a channel (PUBSUB NUMSUB).
    numsub: Callable[[str], Awaitable[int]]
    # Drop this instance's connection to the broker, as a broker restart would.
    drop: Callable[[PubSub], Awaitable[None]]
    # Whether `publish` counts every receiving process (not so on a Redis Cluster: see PubSub).
    exact_counts: bool = True
    created: list[PubSub] = field(default_factory=list)


@dataclass
class CacheKit:
    kind: str
    make: Callable[[], Awaitable[Cache]]
    unreachable: Callable[[], Cache]
    prefix: str
    created: list[Cache] = field(default_factory=list)


@dataclass
class StoreKit:
    kind: str
    make: Callable[[], Awaitable[DocumentStore]]
    unreachable: Callable[[], DocumentStore]
    created: list[DocumentStore] = field(default_factory=list)

