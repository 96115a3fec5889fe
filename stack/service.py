"""Service: what the stack manager needs to know of each local service (Kafka, Redis, MongoDB)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from peernet.config import PeerNetConfig
from stack.process import Identity, Launch


class Service(Protocol):
    """One service of the local stack. Every method is idempotent and safe to call again."""

    name: str
    # Seconds `up` waits for a freshly started process to answer.
    ready_timeout: float

    def is_external(self, cfg: PeerNetConfig) -> bool:
        """True when the user gave this service's address: we never install, start or stop it."""

    def address(self, cfg: PeerNetConfig) -> str:
        """Where clients reach the service (for a managed one, 127.0.0.1 and the stack's port)."""

    def install(self, cfg: PeerNetConfig) -> None:
        """Fetch or install what the service runs, unless it is there already."""

    def identity(self, cfg: PeerNetConfig) -> Identity:
        """How to recognize this stack's process of the service."""

    def launch(self, cfg: PeerNetConfig) -> Launch:
        """Write the service's configuration and prepare its data directory; how to run it."""

    def ports(self, cfg: PeerNetConfig) -> tuple[int, ...]:
        """The 127.0.0.1 ports a managed instance listens on."""

    def logs(self, cfg: PeerNetConfig) -> list[Path]:
        """The service's log files, the main one first."""

    def probe(self, cfg: PeerNetConfig, timeout: float) -> str:
        """Make one real request to the service; raise when it does not answer. Returns a short
        description of what answered (e.g. its version)."""
