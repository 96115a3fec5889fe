"""Logging for every PeerNet process: one format, and repeats collapsed.

A client library retrying a dead service logs the same line many times a second in every
process (aiokafka logs "Unable connect to node" at ERROR on each attempt: 25,558 lines in the
38 s a SIGKILLed broker took to come back under `bench --chaos kafka`). `RepeatFilter` lets the
first of a kind through, then one per `window_s` that says how many it held back, so an outage
reads as a few lines that still say when it began and how long it lasted.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from peernet.config import LogsConfig

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers of libraries known to repeat themselves while a service is away.
# (A filter on a logger sees only the records logged on it, not its children's: each is named.)
NOISY = ("aiokafka", "aiokafka.conn", "aiokafka.cluster", "aiokafka.admin.client",
         "aiokafka.consumer.consumer", "aiokafka.consumer.fetcher",
         "aiokafka.consumer.group_coordinator", "aiokafka.producer.producer",
         "aiokafka.producer.sender",
         # PeerNet's own retry loops: one warning per failed attempt while a service is away.
         "peernet.session", "peernet.feed", "peernet.presence", "peernet.projector",
         "peernet.connection", "peernet.hub", "bus.kafka", "bus.redis")
REPEAT_WINDOW_S = 10.0


class RepeatFilter(logging.Filter):
    """Let a record through when its (logger, level, message template) was not seen in the last
    `window_s`; count the others and report the count on the next one let through."""

    def __init__(self, window_s: float = REPEAT_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 1000) -> None:
        super().__init__()
        self.window_s = window_s
        self._clock = clock
        self._max_keys = max_keys
        # key -> (when last let through, held back since)
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.window_s:
            self._seen[key] = (last[0], last[1] + 1)
            return False
        held = last[1] if last is not None else 0
        if len(self._seen) >= self._max_keys and key not in self._seen:
            self._seen.clear()  # bounded: forgetting only lets a repeat through early
        self._seen[key] = (now, 0)
        if held:
            record.msg = f"{record.msg} [{held} more like this in the last {self.window_s:g} s]"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line (PEERNET_LOG_FORMAT=json): `ts` (UTC, ISO 8601), `level`,
    `logger`, `msg`, `pid`, and `exc` with the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process or os.getpid(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def setup_logging(cfg: LogsConfig | None = None) -> None:
    """The root logger's format and level (once per process: PEERNET_LOG_FORMAT, _LEVEL), and
    repeats collapsed on the noisy libraries' loggers."""
    if cfg is None:
        from peernet.config import load_config

        cfg = load_config().logs
    level = logging.getLevelName(cfg.level.upper())
    if not isinstance(level, int):
        raise ValueError(f"PEERNET_LOG_LEVEL={cfg.level!r} is not a logging level")
    if cfg.format not in ("text", "json"):
        raise ValueError(f"PEERNET_LOG_FORMAT={cfg.format!r} is not one of text, json")
    formatter = JsonFormatter() if cfg.format == "json" else logging.Formatter(FORMAT)
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(formatter)
        root.addHandler(handler)
    elif cfg.format == "json":  # a host (Ray, uvicorn) set up its own: they speak JSON too
        for h in root.handlers:
            h.setFormatter(formatter)
    root.setLevel(level)
    for name in NOISY:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RepeatFilter) for f in logger.filters):
            logger.addFilter(RepeatFilter())
