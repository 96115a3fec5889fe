"""The open-files limit `peernet serve` raises for the sockets a node should hold."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest

from serve import os_limits
from serve.os_limits import connections_for, files_for, listen_backlog, raise_open_files


class FakeLimits:
    def __init__(self, soft: int, hard: int, *, may_raise_hard: bool) -> None:
        self.soft, self.hard, self.may_raise_hard = soft, hard, may_raise_hard

    def get(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.soft, self.hard

    def set(self, which: int, limits: tuple[int, int]) -> None:
        soft, hard = limits
        if hard > self.hard and not self.may_raise_hard:
            raise ValueError("not allowed to raise maximum limit")
        self.soft, self.hard = soft, hard


@pytest.fixture
def limits(monkeypatch: pytest.MonkeyPatch) -> FakeLimits:
    fake = FakeLimits(1024, 20_000, may_raise_hard=True)
    monkeypatch.setattr(os_limits.resource, "getrlimit", fake.get)
    monkeypatch.setattr(os_limits.resource, "setrlimit", fake.set)
    return fake


def test_fifty_thousand_connections_need_about_125_thousand_files() -> None:
    assert files_for(50_000) == 125_256
    assert connections_for(files_for(50_000)) == 50_000
    assert connections_for(20_000) == 7_897  # the wall issue 19 met near 8,000 sockets
    assert connections_for(100) == 0


def test_root_raises_soft_and_hard_limits(limits: FakeLimits) -> None:
    got = raise_open_files(files_for(50_000))
    assert got.ok and (got.before, got.after) == (1024, 125_256)
    assert (limits.soft, limits.hard) == (125_256, 125_256)
    assert "room for 50,000 connections" in got.line(50_000)


def test_a_refused_raise_goes_as_far_as_allowed_and_says_what_the_node_holds(
        limits: FakeLimits) -> None:
    limits.may_raise_hard = False
    got = raise_open_files(files_for(50_000))
    assert not got.ok and got.after == 20_000 and limits.soft == 20_000
    line = got.line(50_000)
    assert line.startswith("peernet: WARNING: open files limit 20,000")
    assert "holds about 7,897" in line and "refused" in line


def test_a_limit_already_high_enough_is_left_as_it_is(limits: FakeLimits) -> None:
    limits.soft = limits.hard = 200_000
    got = raise_open_files(files_for(50_000))
    assert got.ok and got.after == 200_000 and limits.soft == 200_000


def test_the_listen_backlog_is_read_from_proc(tmp_path: Path) -> None:
    f = tmp_path / "somaxconn"
    f.write_text("4096\n")
    assert listen_backlog(f) == 4096
    assert listen_backlog(tmp_path / "missing") is None
