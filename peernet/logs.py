"""Logging for every PeerNet process: one format, and repeats collapsed.

A client library retrying a dead service logs the same line many times a second in every
process (aiokafka logs "Unable connect to node" at ERROR on each attempt: 25,558 lines in the
38 s a SIGKILLed broker took to come back under `bench --chaos kafka`). `RepeatFilter` lets the
first of a kind through, then one per `window_s` that says how many it held back, so an outage
reads as a few lines that still say when it began and how long it lasted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers of libraries known to repeat themselves while a service is away.
# (A filter on a logger sees only the records logged on it, not its children's: each is named.)
NOISY = ("aiokafka", "aiokafka.conn", "aiokafka.cluster", "aiokafka.admin.client",
         "aiokafka.consumer.consumer", "aiokafka.consumer.fetcher",
         "aiokafka.consumer.group_coordinator", "aiokafka.producer.producer",
         "aiokafka.producer.sender",
         # PeerNet's own retry loops: one warning per failed attempt while a service is away.
         "actors.session", "actors.feed", "actors.presence", "actors.projector", "actors.replay",
         "serve.connection", "serve.presence", "serve.hub", "bus.kafka", "bus.redis")
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


def setup_logging(level: int = logging.INFO) -> None:
    """The root logger's format and level (once per process), and repeats collapsed on the
    noisy libraries' loggers."""
    logging.basicConfig(level=level, format=FORMAT)
    for name in NOISY:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RepeatFilter) for f in logger.filters):
            logger.addFilter(RepeatFilter())
