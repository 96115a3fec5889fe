"""Stable-hash routing (peernet/routing.py) and ids (peernet/ids.py)."""

from __future__ import annotations

import collections

import pytest

from peernet import ids
from peernet.routing import shard_for, stable_hash


def test_stable_hash_is_crc32_of_utf8() -> None:
    assert stable_hash("123456789") == 0xCBF43926  # the CRC-32 check value
    assert stable_hash("") == 0
    assert stable_hash("alice") == 663665735
    assert stable_hash("dm:alice:bob") == 751600813
    assert stable_hash("é") == stable_hash("\u00e9")


def test_shard_for_is_the_hash_modulo_the_count() -> None:
    assert shard_for("123456789", 8) == 0xCBF43926 % 8
    assert shard_for("alice", 2) == 663665735 % 2
    assert shard_for("bob", 3) == 4123767104 % 3
    assert all(shard_for(f"user{i}", 1) == 0 for i in range(100))


@pytest.mark.parametrize("shards", [0, -1])
def test_shard_for_needs_a_positive_count(shards: int) -> None:
    with pytest.raises(ValueError):
        shard_for("alice", shards)


@pytest.mark.parametrize("shards", [2, 8, 16])
def test_users_spread_evenly_over_shards(shards: int) -> None:
    counts = collections.Counter(shard_for(f"user_{i}", shards) for i in range(20_000))
    mean = 20_000 / shards
    assert set(counts) == set(range(shards))
    assert all(abs(c - mean) < 0.1 * mean for c in counts.values()), counts


def test_ids_are_26_url_safe_characters() -> None:
    for _ in range(100):
        value = ids.new_id()
        assert len(value) == 26
        assert set(value) <= set("0123456789abcdefghjkmnpqrstvwxyz")


def test_ids_are_unique() -> None:
    made = [ids.new_id() for _ in range(5_000)]
    assert len(set(made)) == len(made)


def test_ids_sort_by_creation_time(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(1_700_000_000_000, 1_700_000_000_000 + 10_000, 7))
    monkeypatch.setattr(ids, "now_ms", lambda: next(clock))
    made = [ids.new_id() for _ in range(1_000)]
    assert made == sorted(made)


def test_ids_of_the_same_millisecond_share_the_time_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ids, "now_ms", lambda: 1_700_000_000_000)
    a, b = ids.new_id(), ids.new_id()
    assert a[:10] == b[:10] and a != b


def test_now_ms_is_epoch_milliseconds() -> None:
    import time

    assert abs(ids.now_ms() - time.time() * 1000) < 1000
