"""The machine's limits that decide how many sockets a node holds: open files (HAProxy needs
about 2.5 per connection, a replica one) and the listen backlog. `peernet serve` raises the
open-files limit for itself and every process it starts (Ray, HAProxy and the replicas inherit
it) and says in one line what the node can hold when the machine refuses more.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

# Files HAProxy needs per connection (client socket, replica socket, splice pipes), and the ones
# every process keeps besides: the same arithmetic as `_haproxy_maxconn`.
FILES_PER_CONNECTION = 2.5
FILES_SPARE = 256


def files_for(connections: int) -> int:
    return int(connections * FILES_PER_CONNECTION) + FILES_SPARE


def connections_for(files: int) -> int:
    return max(0, int((files - FILES_SPARE) / FILES_PER_CONNECTION))


@dataclass(frozen=True)
class OpenFiles:
    """The open-files limit before and after `raise_open_files`, and what was wanted."""

    before: int
    after: int
    wanted: int
    refused: str = ""  # why the limit could not be raised that far ("" when it was)

    @property
    def ok(self) -> bool:
        return self.after >= self.wanted

    def line(self, connections: int) -> str:
        if self.ok:
            return (f"peernet: open files limit {self.after:,} (was {self.before:,}): room for "
                    f"{connections:,} connections per node")
        return (f"peernet: WARNING: open files limit {self.after:,}, not the {self.wanted:,} that "
                f"{connections:,} connections per node need ({self.refused or 'refused'}): this "
                f"node holds about {connections_for(self.after):,}; raise it (`ulimit -n`, "
                "limits.conf, or LimitNOFILE= in a systemd unit; docs/deploy.md, \"Connections "
                "per node\")")


def raise_open_files(wanted: int) -> OpenFiles:
    """Raise this process's open-files limit (soft and hard) to at least `wanted` where the
    machine allows it (root may raise the hard limit up to the kernel's nr_open; others only
    the soft limit up to the hard one). Never lowers it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    infinite = resource.RLIM_INFINITY
    if soft == infinite or soft >= wanted:
        return OpenFiles(soft, soft, wanted)
    refused = ""
    target_hard = hard if hard == infinite or hard >= wanted else wanted
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, target_hard))
    except (ValueError, OSError) as exc:
        refused = f"raising it to {wanted:,} was refused: {exc}"
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # as far as allowed
        except (ValueError, OSError):
            pass
    after = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return OpenFiles(soft, after, wanted, refused if after < wanted else "")


def listen_backlog(path: Path = Path("/proc/sys/net/core/somaxconn")) -> int | None:
    """The kernel's cap on a listening socket's backlog (None where it cannot be read)."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
