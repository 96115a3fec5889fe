"""How other processes find a running `peernet serve`: its command line and its state file.

The CLI, the operator's tools and the load harness's chaos mode all look for it the same way, so
the names live in the core rather than in serve/.
"""

from __future__ import annotations

from pathlib import Path

from peernet.config import PeerNetConfig

# The modules `python -m MODULE serve` runs the command from (tests start the server that way);
# `peernet.cli` is where it lived before, so a server an older install started is still found.
COMMAND_MODULES = ("cli", "cli.main", "peernet.cli")


def state_file(cfg: PeerNetConfig) -> Path:
    """Where `peernet serve` keeps its state (pid, URL, GCS address, the last upgrade)."""
    return cfg.stack.home / "run" / "serve.json"


def is_serve_command(cmdline: list[str]) -> bool:
    """Whether a process's command line is `peernet serve` (the console script) or
    `python -m cli serve`."""
    return any(part.endswith("/peernet") or part == "peernet" or part in COMMAND_MODULES
               for part in cmdline) and "serve" in cmdline
