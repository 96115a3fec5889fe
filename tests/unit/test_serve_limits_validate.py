"""Per-connection limits (serve/limits.py) and request field checks (serve/validate.py)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from peernet.errors import ErrorCode, PeerNetError
from serve.limits import FloodDetector, TokenBucket
from serve.validate import (
    conv_participants,
    dm_conv,
    int_field,
    optional_text,
    text_field,
    user_field,
    user_list,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def takes(bucket: TokenBucket, n: int) -> int:
    return sum(bucket.take() for _ in range(n))


# -- TokenBucket -------------------------------------------------------------------------------


def test_a_full_bucket_allows_a_burst_then_refuses() -> None:
    clock = FakeClock()
    bucket = TokenBucket(200, 400, clock=clock)
    assert takes(bucket, 400) == 400
    assert bucket.take() is False


def test_the_bucket_refills_at_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(200, 400, clock=clock)
    takes(bucket, 400)
    clock.now += 0.5
    assert takes(bucket, 1000) == 100
    clock.now += 0.004  # 0.8 of a token: not yet one
    assert bucket.take() is False
    clock.now += 0.0011
    assert bucket.take() is True


def test_sustained_traffic_at_the_rate_is_never_refused() -> None:
    clock = FakeClock()
    bucket = TokenBucket(200, 400, clock=clock)
    for _ in range(10_000):  # 50 s at exactly 200/s
        clock.now += 1 / 200
        assert bucket.take()


def test_sustained_traffic_over_the_rate_gets_the_rate_after_the_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(200, 400, clock=clock)
    allowed = 0
    for _ in range(4000):  # 400/s for 10 s
        clock.now += 1 / 400
        allowed += bucket.take()
    assert 400 + 2000 - 2 <= allowed <= 400 + 2000


def test_an_idle_bucket_saves_no_more_than_the_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(200, 400, clock=clock)
    takes(bucket, 400)
    clock.now += 3600
    assert takes(bucket, 1000) == 400


# -- FloodDetector -----------------------------------------------------------------------------


def test_flooding_is_the_limit_of_refusals_without_a_quiet_gap() -> None:
    flood = FloodDetector(5)
    assert [flood.refuse() for _ in range(5)] == [False, False, False, False, True]
    assert flood.refuse() is True  # and stays closed-worthy


def test_a_quiet_gap_forgives_earlier_refusals() -> None:
    flood = FloodDetector(3)
    flood.QUIET_S = 0.05
    assert [flood.refuse() for _ in range(2)] == [False, False]
    time.sleep(0.08)
    assert [flood.refuse() for _ in range(2)] == [False, False]
    assert flood.refuse() is True


def test_the_default_quiet_gap_is_ten_seconds() -> None:
    assert FloodDetector.QUIET_S == 10.0


# -- validate ----------------------------------------------------------------------------------


def bad(call: Any, *args: Any, **kw: Any) -> PeerNetError:
    with pytest.raises(PeerNetError) as caught:
        call(*args, **kw)
    assert caught.value.code is ErrorCode.BAD_REQUEST
    return caught.value


@pytest.mark.parametrize("value", ["alice", "a", "x" * 32, "user_01"])
def test_user_field_accepts_user_ids(value: str) -> None:
    assert user_field({"to": value}, "to") == value


@pytest.mark.parametrize("value", [None, "", "Alice", "x" * 33, "a b", "a\n", 5, ["a"], "ä"])
def test_user_field_refuses_anything_else_naming_the_field(value: Any) -> None:
    assert "'to'" in bad(user_field, {"to": value}, "to").message


def test_text_field_bounds_are_in_characters() -> None:
    assert text_field({"body": "é" * 10}, "body", 10) == "é" * 10
    assert "'body'" in bad(text_field, {"body": "é" * 11}, "body", 10).message
    bad(text_field, {"body": ""}, "body", 10)
    bad(text_field, {}, "body", 10)
    bad(text_field, {"body": b"bytes"}, "body", 10)
    assert text_field({"body": ""}, "body", 10, min_chars=0) == ""


def test_optional_text_is_none_when_absent_or_null() -> None:
    assert optional_text({}, "cid", 64) is None
    assert optional_text({"cid": None}, "cid", 64) is None
    assert optional_text({"cid": "c"}, "cid", 64) == "c"
    bad(optional_text, {"cid": "c" * 65}, "cid", 64)
    bad(optional_text, {"cid": 7}, "cid", 64)


def test_int_field_range_default_and_types() -> None:
    assert int_field({"n": 5}, "n", lo=1, hi=5) == 5
    assert int_field({}, "n", lo=1, hi=100, default=20) == 20
    for value in (0, 6, True, False, 2.0, "3", None):
        bad(int_field, {"n": value}, "n", lo=1, hi=5)
    bad(int_field, {}, "n", lo=1, hi=5)


def test_user_list_dedupes_in_order_and_checks_every_id() -> None:
    assert user_list({"users": ["b", "a", "b"]}, "users", 10) == ["b", "a"]
    assert user_list({"users": []}, "users", 10) == []
    bad(user_list, {"users": ["a", "Bad"]}, "users", 10)
    bad(user_list, {"users": "a,b"}, "users", 10)
    bad(user_list, {"users": ["a"] * 11}, "users", 10)


def test_dm_conv_is_the_same_for_both_participants() -> None:
    assert dm_conv("alice", "bob") == dm_conv("bob", "alice") == "dm:alice:bob"
    assert dm_conv("b_2", "b_10") == "dm:b_10:b_2"  # string order, not numeric


@pytest.mark.parametrize(("conv", "parts"), [
    ("dm:alice:bob", ("alice", "bob")),
    ("dm:b_10:b_2", ("b_10", "b_2")),
    ("dm:bob:alice", None),  # not in order: no such conversation
    ("dm:alice:alice", None),
    ("dm:alice", None),
    ("dm:alice:bob:carol", None),
    ("group:alice:bob", None),
    ("dm:Alice:bob", None),
    ("dm::bob", None),
    ("", None),
])
def test_conv_participants(conv: str, parts: tuple[str, str] | None) -> None:
    assert conv_participants(conv) == parts


def test_conv_participants_inverts_dm_conv() -> None:
    for a, b in [("alice", "bob"), ("zed", "amy"), ("u_1", "u_10")]:
        assert conv_participants(dm_conv(a, b)) == tuple(sorted((a, b)))
