"""Hostile input the other unit suites do not cover, in-process: an unsigned (`alg: none`) token
and an HMAC algorithm other than the pinned HS256 at hello (4401, a bystander unharmed), and
fuzzed queries of the HTTP routes (history, feed, presence, following, followers: never a 500)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import jwt
import pytest
from gateway_harness import Gateway, gateway
from hypothesis import given
from hypothesis import strategies as st
from test_fuzz_protocol import PROFILE
from unit_helpers import unique_user

from bus.feeds_memory import MemoryFeedStore
from peernet.errors import CloseCode


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_unsigned_and_other_algorithm_tokens_close_4401_and_harm_no_one() -> None:
    with gateway() as gw, gw.connect(unique_user("bystander")) as (bystander, _):
        victim = unique_user("victim")
        claims: dict[str, Any] = {"sub": victim, "exp": int(time.time()) + 60}
        unsigned = jwt.encode(claims, None, algorithm="none")  # type: ignore[arg-type]
        hs512 = jwt.encode(claims, gw.cfg.gateway.token_secret, algorithm="HS512")
        # alg none with the right secret's HS256 signature kept: the header alone must not count.
        signed = gw.token(victim)
        swapped = ".".join([unsigned.split(".")[0], *signed.split(".")[1:]])
        for token in (unsigned, unsigned.rstrip("."), hs512, swapped):
            with gw.open() as ws:
                ws.send({"t": "hello", "token": token})
                code, frames = ws.closed()
            assert code == CloseCode.BAD_TOKEN, token
            assert frames == []
        assert bystander.request({"t": "ping", "rid": 1}) == {"t": "pong", "rid": 1}


# -- conversation history over HTTP -------------------------------------------------------------


@pytest.mark.parametrize("before", [str(2**63), str(10**30), "-1", "-" + str(2**63 + 1)])
def test_a_history_cursor_outside_the_log_positions_is_400(before: str) -> None:
    """Found by fuzzing: `before=99999999999999999999` reached MongoDB as an integer BSON cannot
    encode, and the OverflowError came back as a 500. (The in-memory store sends its arguments
    through BSON too, so it would raise as MongoDB's driver does.)"""
    with gateway() as gw:
        reply = gw.client.get("/v1/conversations/dm:alice:bob/messages", params={"before": before},
                              headers={"Authorization": f"Bearer {gw.token('alice')}"})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["code"] == "bad_request"


@PROFILE
@given(params=st.dictionaries(st.sampled_from(["limit", "before"]),
                              st.one_of(st.text(max_size=30), st.integers().map(str),
                                        st.integers(min_value=2**62, max_value=2**70).map(str)),
                              max_size=2),
       conv=st.one_of(st.just("dm:alice:bob"), st.text(max_size=30)))
def test_fuzzed_history_queries_get_200_400_or_404_never_500(
        http_gw: Gateway, params: dict[str, str], conv: str) -> None:
    reply = http_gw.client.get(f"/v1/conversations/{quote(conv, safe=':')}/messages",
                               params=params,
                               headers={"Authorization": f"Bearer {http_gw.token('alice')}"})
    assert reply.status_code in (200, 400, 403, 404), (reply.status_code, reply.text)


@pytest.mark.parametrize("limit", ["\u00b2", "1\u00b9"])
def test_a_feed_limit_of_superscript_digits_is_400(limit: str) -> None:
    """Found by fuzzing: `limit=²` passed str.isdigit() and int() raised, a 500."""
    with gateway() as gw:
        gw.deps.feeds = MemoryFeedStore(cap=gw.cfg.feeds.cap)
        reply = gw.client.get("/v1/feed", params={"limit": limit},
                              headers={"Authorization": f"Bearer {gw.token('alice')}"})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["code"] == "bad_request"


# Digits that str.isdigit() accepts and int() does not (superscripts), other scripts' digits,
# and the spellings int() is lenient about.
EDGE_VALUES = st.sampled_from(["\u00b2", "1\u00b9", "\u0661\u0660", "0", "100", "101", " 5", "5 ",
                               "1_0", "+5", "-1", "1e2", "99999999999999999999:a"])
QUERY_VALUES = st.one_of(EDGE_VALUES, EDGE_VALUES, st.text(max_size=30), st.integers().map(str))


@PROFILE
@given(path=st.sampled_from(["/v1/feed", "/v1/presence", "/v1/following", "/v1/followers",
                             "/v1/conversations"]),
       params=st.dictionaries(st.sampled_from(["limit", "before", "users", "user"]),
                              st.one_of(QUERY_VALUES, st.lists(st.sampled_from(["alice", "bob", "X", ""]),
                                                               max_size=4).map(",".join)),
                              max_size=3),
       auth=st.one_of(st.none(), st.none(), st.text(max_size=40),
                      st.sampled_from(["Bearer ", "bearer x"])))
def test_fuzzed_feed_and_presence_queries_never_500(http_gw: Gateway, path: str,
                                                   params: dict[str, str], auth: str | None) -> None:
    headers = {"Authorization": f"Bearer {http_gw.token('alice')}" if auth is None else auth}
    try:
        headers["Authorization"].encode("ascii")
    except UnicodeEncodeError:
        headers = {}  # not sendable as an HTTP header
    reply = http_gw.client.get(path, params=params, headers=headers)
    assert reply.status_code in (200, 400, 401), (reply.status_code, reply.text)


@pytest.fixture(scope="module")
def http_gw() -> Iterator[Gateway]:
    with gateway() as gw:
        gw.deps.feeds = MemoryFeedStore(cap=gw.cfg.feeds.cap)
        yield gw


@PROFILE
@given(body=st.one_of(st.binary(max_size=100),
                      st.builds(lambda v: json.dumps({"user": v}).encode(),
                                st.one_of(st.none(), st.integers(), st.text(max_size=40),
                                          st.lists(st.text(max_size=5), max_size=3))),
                      st.sampled_from([b"null", b"[]", b'"alice"', b'{"user":"\\ud800"}', b"\xff"])))
def test_fuzzed_dev_token_bodies_get_a_token_or_400(http_gw: Gateway, body: bytes) -> None:
    reply = http_gw.client.post("/v1/dev/token", content=body)
    assert reply.status_code in (200, 400), (reply.status_code, reply.text)
