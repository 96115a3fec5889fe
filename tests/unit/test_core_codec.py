"""The wire codec and the event envelope (peernet/codec.py, peernet/envelope.py)."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest

from peernet.codec import decode_frame, encode_frame, pack, pack_raw, unpack
from peernet.envelope import SCHEMA_VERSION, EnvelopeError, Event
from peernet.errors import ErrorCode, PeerNetError


def test_msgpack_bytes_decode_to_a_map() -> None:
    frame = {"t": "dm", "rid": 7, "to": "bob", "body": "hé 🙂"}
    assert decode_frame(msgpack.packb(frame)) == frame


def test_json_text_decodes_to_a_map() -> None:
    assert decode_frame('{"t":"ping","rid":"r-1"}') == {"t": "ping", "rid": "r-1"}


@pytest.mark.parametrize("data", [
    b"\xc1",  # a byte msgpack never uses
    b"\x92\x01",  # a truncated array
    msgpack.packb({"t": "ping"}) + b"\x00",  # trailing data
    b"\xa2\xff\xfe",  # a str that is not UTF-8
    "{not json",
    "",
    "[" * 100_000,  # nesting deeper than the decoder goes
], ids=["reserved-byte", "truncated", "trailing", "bad-utf8", "bad-json", "empty", "deep"])
def test_undecodable_data_is_bad_frame(data: bytes | str) -> None:
    with pytest.raises(PeerNetError) as caught:
        decode_frame(data)
    assert caught.value.code is ErrorCode.BAD_FRAME
    assert not caught.value.retriable


@pytest.mark.parametrize("obj", [[1, 2], "ping", 3, None], ids=["list", "str", "int", "nil"])
@pytest.mark.parametrize("binary", [True, False], ids=["msgpack", "json"])
def test_a_frame_that_is_not_a_map_is_bad_frame(obj: Any, binary: bool) -> None:
    data = msgpack.packb(obj) if binary else json.dumps(obj)
    with pytest.raises(PeerNetError) as caught:
        decode_frame(data)
    assert caught.value.code is ErrorCode.BAD_FRAME
    assert "not a map" in caught.value.message


@pytest.mark.parametrize("frame", [{}, {"rid": 1}, {"t": 5}, {"t": None}, {"t": ["dm"]}])
@pytest.mark.parametrize("binary", [True, False], ids=["msgpack", "json"])
def test_a_map_without_a_string_t_is_bad_frame(frame: dict[str, Any], binary: bool) -> None:
    data = msgpack.packb(frame) if binary else json.dumps(frame)
    with pytest.raises(PeerNetError) as caught:
        decode_frame(data)
    assert caught.value.code is ErrorCode.BAD_FRAME


def test_encode_frame_speaks_the_connection_encoding() -> None:
    frame = {"t": "welcome", "user": "alice", "seq": 0, "note": "é"}
    binary = encode_frame(frame, True)
    text = encode_frame(frame, False)
    assert isinstance(binary, bytes) and msgpack.unpackb(binary) == frame
    assert isinstance(text, str) and json.loads(text) == frame
    assert "é" in text and " " not in text  # compact, not ASCII-escaped


def test_internal_pack_round_trips_bytes_and_unicode() -> None:
    obj = {"b": b"\x00\xff", "s": "✓", "n": [1, None, 2.5], 1: "int key"}
    assert unpack(pack(obj)) == obj


def test_event_envelope_round_trips() -> None:
    event = Event("dm", "alice", {"to": "bob", "body": "hi", "conv": "dm:alice:bob"})
    decoded = Event.decode(event.encode())
    assert decoded == event
    assert decoded.v == SCHEMA_VERSION
    assert len(decoded.id) == 26 and decoded.ts > 0


def test_event_ids_and_times_are_fresh_per_event() -> None:
    a, b = Event("dm", "alice"), Event("dm", "alice")
    assert a.id != b.id
    assert a.data == {} and a.data is not b.data


@pytest.mark.parametrize("version", [0, 2, None, "1"])
def test_an_event_of_another_schema_version_is_refused(version: Any) -> None:
    raw = pack({"v": version, "id": "x", "type": "dm", "actor": "a", "ts": 1, "data": {}})
    with pytest.raises(EnvelopeError, match="unsupported event schema"):
        Event.decode(raw)


@pytest.mark.parametrize("raw", [b"\xc1", pack([1, 2]), pack("event")])
def test_an_undecodable_or_non_map_record_is_refused(raw: bytes) -> None:
    with pytest.raises(EnvelopeError):
        Event.decode(raw)


def test_an_event_lacking_a_field_is_refused() -> None:
    raw = pack({"v": SCHEMA_VERSION, "id": "x", "type": "dm", "ts": 1, "data": {}})
    with pytest.raises(EnvelopeError, match="actor"):
        Event.decode(raw)


def test_a_pushed_payload_is_already_the_binary_frame() -> None:
    """The hub sends a pub/sub payload (packed by `pack`) to MessagePack connections as it came:
    that holds only while `pack` and encode_frame's binary form are the same bytes."""
    from peernet.codec import encode_frame, pack

    frame = {"t": "msg", "seq": 3, "id": "x", "body": "héllo", "raw": b"\x00\x01", "n": [1, 2.5]}
    assert pack(frame) == encode_frame(frame, True)


@pytest.mark.parametrize("obj", [
    {"t": "msg", "seq": 3, "body": "héllo", "raw": b"\x00\xff", "n": None, "f": 1.5, "l": [1, "a"]},
    [], "", 0, 2**63 - 1, -(2**63), {"deep": {"er": [{"x": b"y"}]}},
])
def test_the_kept_packers_write_what_packb_writes(obj: Any) -> None:
    assert pack(obj) == msgpack.packb(obj, use_bin_type=True)
    assert pack_raw(obj) == msgpack.packb(obj, use_bin_type=False)


def test_a_pack_that_raised_leaves_nothing_behind_for_the_next() -> None:
    with pytest.raises(TypeError):
        pack({"a": object()})
    assert pack({"b": 1}) == msgpack.packb({"b": 1}, use_bin_type=True)


def test_threads_pack_with_packers_of_their_own() -> None:
    from concurrent.futures import ThreadPoolExecutor

    objs = [{"i": i, "s": "x" * (i % 50), "b": bytes(i % 7)} for i in range(2000)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(pack, objs))
    assert got == [msgpack.packb(o, use_bin_type=True) for o in objs]
