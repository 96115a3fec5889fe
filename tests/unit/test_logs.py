"""Repeated log lines are collapsed (peernet.logs.RepeatFilter), on a fake clock: the first of a
kind goes through, repeats within the window are held back and counted on the next one let
through, and different messages, levels or loggers never hold each other back."""

from __future__ import annotations

import json
import logging

import pytest

from peernet.config import LogsConfig, load_config
from peernet.logs import NOISY, JsonFormatter, RepeatFilter, setup_logging


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def record(msg: str = "Unable connect to node with id %s: %s", name: str = "aiokafka",
           level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, (1, "refused"), None)


def test_repeats_in_the_window_are_held_back_and_counted_on_the_next() -> None:
    clock = Clock()
    f = RepeatFilter(10.0, clock)
    assert f.filter(record())
    assert [f.filter(record()) for _ in range(99)] == [False] * 99
    clock.now = 10.0
    nxt = record()
    assert f.filter(nxt)
    assert nxt.getMessage() == ("Unable connect to node with id 1: refused "
                                "[99 more like this in the last 10 s]")
    clock.now = 25.0
    quiet = record()
    assert f.filter(quiet) and "more like this" not in quiet.getMessage()


def test_other_messages_levels_and_loggers_are_not_held_back() -> None:
    f = RepeatFilter(10.0, Clock())
    assert f.filter(record())
    assert f.filter(record("Another thing %s %s"))
    assert f.filter(record(level=logging.WARNING))
    assert f.filter(record(name="aiokafka.conn"))
    assert not f.filter(record())


def test_the_table_of_kinds_is_bounded() -> None:
    f = RepeatFilter(10.0, Clock(), max_keys=3)
    for i in range(10):
        assert f.filter(record(f"message {i} %s %s"))
    assert len(f._seen) <= 3


def test_setup_logging_filters_the_noisy_loggers_once() -> None:
    setup_logging()
    setup_logging()
    for name in NOISY:
        assert sum(isinstance(x, RepeatFilter) for x in logging.getLogger(name).filters) == 1


def test_json_lines_carry_time_level_logger_message_and_traceback() -> None:
    rec = record()
    line = json.loads(JsonFormatter().format(rec))
    assert line["level"] == "ERROR" and line["logger"] == "aiokafka"
    assert line["msg"] == "Unable connect to node with id 1: refused"
    assert line["ts"].endswith("+00:00") and isinstance(line["pid"], int)
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "ValueError: boom" in json.loads(JsonFormatter().format(rec))["exc"]


def test_the_format_and_level_come_from_peernet_variables() -> None:
    cfg = load_config({"PEERNET_LOG_FORMAT": "json", "PEERNET_LOG_LEVEL": "warning"}).logs
    assert cfg == LogsConfig(format="json", level="warning")
    root = logging.getLogger()
    saved = [(h, h.formatter) for h in root.handlers], root.level
    try:
        setup_logging(cfg)
        assert root.level == logging.WARNING
        assert all(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
    finally:
        for h, f in saved[0]:
            h.setFormatter(f)
        root.setLevel(saved[1])
    for bad in (LogsConfig(format="xml"), LogsConfig(level="LOUD")):
        with pytest.raises(ValueError):
            setup_logging(bad)
