"""Property-based fuzzing of the wire codec and of every handler, over a live in-process
connection (the real Starlette app on in-memory backends).

Frames are generated from the protocol: every frame type of the handler table, the fields the
protocol names with values of the right and of every wrong type (huge ints, floats, NaN, bytes,
MessagePack extension types, nested containers, unicode, over-long strings), plus arbitrary bytes
and text. Profiles: "ci" (the default, short) and "long", chosen by HYPOTHESIS_PROFILE.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import msgpack
import pytest
from gateway_harness import WS, Frame, Gateway, ServerClosed, gateway
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bus.feeds_memory import MemoryFeedStore
from peernet.codec import decode_frame
from peernet.config import GatewayConfig
from peernet.errors import CloseCode, ErrorCode, PeerNetError
from peernet.tokens import TokenError, valid_user_id, verify_token
from serve.handlers import build_handlers

settings.register_profile(
    "ci", max_examples=100, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "long", max_examples=3000, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The handler table itself (its closures are only built, never called, here): a frame type
# added to the table is fuzzed without touching this file.
FRAME_TYPES = sorted(build_handlers(cast(Any, None), cast(Any, None), cast(Any, None)))
ERROR_CODES = {code.value for code in ErrorCode}
# What a live connection may send besides errors: replies and pushes of the protocol.
SERVER_FRAMES = {"pong", "ok", "presence_state", "feed_page", "typing", "presence", "feed",
                 "note", "msg", "resumed", "welcome"}
REPLY_WAIT_S = 10.0  # bounded: a frame that gets no answer in this time is a hang

FUZZER, BYSTANDER = "mallory", "bystander"
ENV = {
    # Limits small enough that fuzzed values reach them without 1009-sized frames.
    "PEERNET_MAX_BODY_CHARS": "200",
    "PEERNET_MAX_WATCH": "5",
    "PEERNET_MAX_FRAME_BYTES": "8192",
    # The rate limiter and the heartbeat have their own tests; here they must not fire.
    "PEERNET_RATE_PER_S": "10000",
    "PEERNET_RATE_BURST": "10000",
    "PEERNET_FLOOD_CLOSE_AFTER": "10000",
    "PEERNET_OUTBOUND_QUEUE": "1000",
    "PEERNET_HEARTBEAT_MS": "600000",
}

# -- strategies built from the protocol ---------------------------------------------------------

MSGPACK_INT = st.integers(min_value=-(2**63), max_value=2**64 - 1)
EDGE_INTS = st.sampled_from([0, -1, 1, 2**31, 2**53, 2**53 + 1, 2**63 - 1, 2**64 - 1, -(2**63)])
# Over-long strings are built by repetition: cheap to generate however long.
LONG_TEXT = st.builds(lambda c, n: c * n, st.characters(codec="utf-8"), st.integers(60, 9000))


def scalars(*, json_safe: bool) -> st.SearchStrategy[Any]:
    base: list[st.SearchStrategy[Any]] = [
        st.none(), st.booleans(), MSGPACK_INT, EDGE_INTS, st.floats(allow_nan=True),
        st.text(max_size=40), st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_", max_size=40),
        LONG_TEXT,
    ]
    if json_safe:
        # JSON has no bounds on integers.
        base.append(st.integers(min_value=-(10**400), max_value=10**400))
    else:
        base += [st.binary(max_size=64),
                 st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=16)),
                 st.builds(msgpack.Timestamp, st.integers(0, 2**34 - 1), st.integers(0, 10**9 - 1))]
    return st.one_of(base)


def anything(*, json_safe: bool) -> st.SearchStrategy[Any]:
    key = st.text(max_size=12) if json_safe else st.one_of(st.text(max_size=12), MSGPACK_INT)

    def containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.one_of(st.lists(inner, max_size=6), st.dictionaries(key, inner, max_size=6))

    return st.recursive(scalars(json_safe=json_safe), containers, max_leaves=20)


USER_IDS = st.one_of(st.sampled_from([FUZZER, BYSTANDER, "bob", "a" * 32, "_"]),
                     st.from_regex(r"[a-z0-9_]{1,32}", fullmatch=True))


def right_values() -> dict[str, st.SearchStrategy[Any]]:
    """Well-typed values of every field the protocol names (some out of range on purpose)."""
    return {
        "rid": st.one_of(MSGPACK_INT, st.text(max_size=70)),
        "to": USER_IDS, "user": USER_IDS,
        "users": st.lists(USER_IDS, max_size=8),
        "body": st.one_of(st.text(min_size=1, max_size=40), st.text(max_size=250), LONG_TEXT),
        "cid": st.text(max_size=70),
        "seq": st.one_of(st.integers(-5, 2**53 + 5), EDGE_INTS),
        "limit": st.integers(-5, 105),
        "before": st.one_of(st.none(), st.just(""), st.text(max_size=30),
                            st.builds(lambda ts, i: f"{ts}:{i}", MSGPACK_INT, st.text(max_size=20))),
        "post": st.one_of(st.from_regex(r"[0-9a-z]{1,64}", fullmatch=True), st.text(max_size=70)),
        "resume": st.one_of(st.integers(-5, 2**64 - 1), st.none()),
        "from": USER_IDS, "token": st.text(max_size=60),
    }


def frames(*, json_safe: bool) -> st.SearchStrategy[Frame]:
    """A map with a `t` of the handler table (or an unknown one) and protocol fields of right or
    wrong types, plus stray fields."""
    fields = right_values()
    wrong = anything(json_safe=json_safe)
    # Twice as likely well-typed, so that whole valid requests (a dm's `to` and `body`) occur.
    value_of = {name: st.one_of(good, good, wrong) for name, good in fields.items()}

    @st.composite
    def build(draw: st.DrawFn) -> Frame:
        t = draw(st.one_of(st.sampled_from(FRAME_TYPES), st.sampled_from(FRAME_TYPES),
                           st.text(max_size=20)))
        frame: Frame = {"t": t}
        if draw(st.booleans()):
            # Near-valid: every field well-typed (handlers ignore the fields they do not read,
            # so most of these are whole valid requests), then a few dropped or made wrong.
            for name in sorted(fields):
                frame[name] = draw(fields[name])
            for name in draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=3)):
                if draw(st.booleans()):
                    del frame[name]
                else:
                    frame[name] = draw(wrong)
        else:
            for name in sorted(fields):
                if draw(st.booleans()):
                    frame[name] = draw(value_of[name])
        frame.update(draw(st.dictionaries(st.text(max_size=10), wrong, max_size=2)))
        if draw(st.booleans()):
            frame["t"] = t  # a stray field named "t" must not replace the type
        return frame

    return build()


def msgpack_data() -> st.SearchStrategy[bytes]:
    packed_frames = st.builds(lambda f: msgpack.packb(f, use_bin_type=True), frames(json_safe=False))
    return st.one_of(
        packed_frames, packed_frames, packed_frames,  # mostly frames the handlers get to see
        st.builds(lambda v: msgpack.packb(v, use_bin_type=True), anything(json_safe=False)),
        st.binary(max_size=200),
        # Truncated frames: a valid prefix that stops mid-value.
        st.builds(lambda f, cut: msgpack.packb(f, use_bin_type=True)[:cut],
                  frames(json_safe=False), st.integers(1, 50)),
    )


def json_data() -> st.SearchStrategy[str]:
    utf8_frames = st.builds(lambda f: json.dumps(f, ensure_ascii=False), frames(json_safe=True))
    return st.one_of(
        utf8_frames, utf8_frames, utf8_frames,
        st.builds(lambda f: json.dumps(f), frames(json_safe=True)),  # \u escapes
        st.builds(json.dumps, anything(json_safe=True)),
        st.text(max_size=200),
        st.sampled_from(['{"t":"ping","rid":"\\ud800"}', '{"t":"dm","to":"bob","body":"\\udfff"}',
                         '{"t":"\\ud800"}', '{"t":"ping","rid":1e999}', '{"t":"ping","rid":NaN}',
                         '{"t":"ping","t":"dm"}', "[" * 5000 + "]" * 5000,
                         '{"t":"ping","x":' + "[" * 5000 + "]" * 5000 + "}"]),
    )


# -- (a) the decoder -----------------------------------------------------------------------------


def _decodes_or_bad_frame(data: bytes | str) -> None:
    try:
        frame = decode_frame(data)
    except PeerNetError as exc:
        assert exc.code is ErrorCode.BAD_FRAME
        return
    assert isinstance(frame, dict) and isinstance(frame["t"], str)


@PROFILE
@given(st.one_of(msgpack_data(), st.binary(max_size=500)))
def test_decoding_bytes_gives_a_frame_or_bad_frame(data: bytes) -> None:
    _decodes_or_bad_frame(data)


@PROFILE
@given(json_data())
def test_decoding_text_gives_a_frame_or_bad_frame(data: str) -> None:
    _decodes_or_bad_frame(data)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@st.composite
def signed_tokens(draw: st.DrawFn) -> str:
    """JWTs signed with the server's own secret (so they get past the signature to the claims)
    whose header and claims are fuzzed JSON, or arbitrary text."""
    header = draw(st.one_of(
        st.fixed_dictionaries({"alg": st.sampled_from(["HS256", "none", "HS512", "RS256"])},
                              optional={"typ": anything(json_safe=True),
                                        "kid": anything(json_safe=True),
                                        "crit": anything(json_safe=True)}),
        anything(json_safe=True)))
    claims = draw(st.one_of(
        st.fixed_dictionaries({}, optional={name: st.one_of(USER_IDS, anything(json_safe=True))
                                            for name in ("sub", "exp", "iat", "nbf", "aud", "iss")}),
        anything(json_safe=True)))
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    mac = hmac.new(TOKEN_CFG.token_secret.encode(), signing_input.encode(), hashlib.sha256)
    return f"{signing_input}.{_b64(mac.digest())}"


TOKEN_CFG = GatewayConfig(token_secret="fuzz-secret-long-enough-for-hs256-keys")


@PROFILE
@given(st.one_of(signed_tokens(), st.text(max_size=200), anything(json_safe=False)))
def test_token_checks_give_a_user_or_token_error(token: Any) -> None:
    """The handshake catches TokenError only: anything else would escape the connection."""
    try:
        user = verify_token(token, TOKEN_CFG)
    except TokenError:
        return
    assert valid_user_id(user)


# -- (b) the handlers, over a live connection ----------------------------------------------------


class _Errors(logging.Handler):
    """Every ERROR record logged while fuzzing: the dispatcher logs an unexpected exception of a
    handler (and answers bad_request), so an answer alone does not prove the handler sound."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []
        self.guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self.guard:
            self.records.append(record)

    def take(self) -> list[str]:
        with self.guard:
            out = [f"{r.name}: {r.getMessage()}\n{r.exc_text or ''}" for r in self.records]
            self.records.clear()
        return out


@pytest.fixture(scope="module")
def arena() -> Iterator[tuple[Gateway, WS, _Errors]]:
    """The app with feeds, a bystander connection open throughout, and an error-log trap."""
    errors = _Errors()
    root = logging.getLogger()
    root.addHandler(errors)
    with gateway(ENV) as gw:
        gw.deps.feeds = MemoryFeedStore(cap=gw.cfg.feeds.cap)
        with gw.connect(BYSTANDER) as (bystander, _):
            yield gw, bystander, errors
    root.removeHandler(errors)
    print(f"\nfuzzed answers ({PROFILE.max_examples} examples per test): {dict(ANSWERS)}")


def _answers_ping(ws: WS) -> tuple[list[Frame], int | None]:
    """Send a ping with a fresh rid; read up to its pong. The frames before it, and the close
    code if the server closed instead."""
    rid = f"sentinel-{uuid.uuid4().hex}"
    try:
        ws.send({"t": "ping", "rid": rid})
    except Exception:  # the socket is already closed: the close is in the stream
        pass
    seen: list[Frame] = []
    deadline = time.monotonic() + REPLY_WAIT_S
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no pong within {REPLY_WAIT_S}s; got {seen}"
        try:
            frame = ws.recv(timeout=left)
        except ServerClosed as closed:
            return seen, closed.code
        if frame == {"t": "pong", "rid": rid}:
            return seen, None
        seen.append(frame)


# What the fuzzed connections were answered, by frame type and error code: printed at the end
# of the module (run with -s) to show what a run reached.
ANSWERS: Counter[str] = Counter()


def _check_answers(frames_: list[Frame]) -> None:
    for frame in frames_:
        t = frame.get("t")
        ANSWERS[f"error:{frame.get('code')}" if t == "error" else str(t)] += 1
        if t == "error":
            assert frame.get("code") in ERROR_CODES, frame
            assert isinstance(frame.get("message"), str), frame
        else:
            assert t in SERVER_FRAMES, frame


@contextmanager
def _fuzz_connection(gw: Gateway, *, binary: bool) -> Iterator[WS]:
    with gw.connect(FUZZER, binary=binary) as (ws, _):
        yield ws


def _run_live(arena: tuple[Gateway, WS, _Errors], datas: list[bytes | str], *, binary: bool) -> None:
    gw, bystander, errors = arena
    limit = gw.cfg.gateway.max_frame_bytes
    too_big = any(len(d if isinstance(d, bytes) else d.encode("utf-8", "surrogatepass")) > limit
                  for d in datas)
    with _fuzz_connection(gw, binary=binary) as ws:
        for data in datas:
            ws.send_raw(data)
        answers, code = _answers_ping(ws)
    _check_answers(answers)
    if code is not None:
        # After the welcome, the only close a lone client's frames can cause here is 1009.
        assert code == CloseCode.MESSAGE_TOO_BIG and too_big, (code, answers)
    else:
        assert not too_big
    others, closed = _answers_ping(bystander)
    assert closed is None, f"the bystander was closed with {closed}"
    _check_answers(others)
    assert errors.take() == []


@PROFILE
@given(st.lists(msgpack_data(), min_size=1, max_size=4))
def test_fuzzed_msgpack_frames_get_protocol_answers_and_harm_no_one(
        arena: tuple[Gateway, WS, _Errors], datas: list[bytes]) -> None:
    _run_live(arena, list(datas), binary=True)


@PROFILE
@given(st.lists(json_data(), min_size=1, max_size=4))
def test_fuzzed_json_frames_get_protocol_answers_and_harm_no_one(
        arena: tuple[Gateway, WS, _Errors], datas: list[str]) -> None:
    _run_live(arena, list(datas), binary=False)


@PROFILE
@given(st.one_of(msgpack_data(), json_data(),
                 st.builds(lambda extra: {"t": "hello", **extra},
                           st.dictionaries(st.sampled_from(["resume", "token", "rid", "t"]),
                                           anything(json_safe=True), max_size=3))))
def test_a_fuzzed_first_frame_gets_a_welcome_or_4401(
        arena: tuple[Gateway, WS, _Errors], first: bytes | str | Frame) -> None:
    """Anything but a hello with a valid token closes 4401 (or 1009 when too big); a valid
    token with fuzzed extra fields gets the welcome and a working connection."""
    gw, bystander, errors = arena
    # A fuzzed hello goes as JSON: its values may be integers MessagePack cannot hold.
    with gw.open(binary=isinstance(first, bytes)) as ws:
        if isinstance(first, dict):
            first = {**first, "t": "hello", "token": gw.token(FUZZER)}
            ws.send(first)
        else:
            ws.send_raw(first)
        answers, code = _answers_ping(ws)
    if code is None:
        assert answers and answers[0]["t"] == "welcome", answers
        _check_answers(answers)
    else:
        assert code in (CloseCode.BAD_TOKEN, CloseCode.MESSAGE_TOO_BIG), code
        assert answers == []
    others, closed = _answers_ping(bystander)
    assert closed is None
    _check_answers(others)
    assert errors.take() == []
