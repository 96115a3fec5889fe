"""The wire codec of the client protocol: one MessagePack map per binary frame, one JSON object
per text frame. Decoding failures become `bad_frame` errors; nothing here raises anything else."""

from __future__ import annotations

import json
import threading
from typing import Any

import msgpack

from peernet.errors import ErrorCode, PeerNetError

Frame = dict[str, Any]


def decode_frame(data: bytes | str) -> Frame:
    """Decode one frame: `bytes` as MessagePack, `str` as JSON.

    Raises PeerNetError(bad_frame) when the data does not decode, is not a map, or has no string `t`.
    """
    try:
        if isinstance(data, str):
            obj = json.loads(data)
        else:
            obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # any decoder failure is the client's bad frame
        raise PeerNetError(ErrorCode.BAD_FRAME, f"frame does not decode: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise PeerNetError(ErrorCode.BAD_FRAME, "frame is not a map")
    t = obj.get("t")
    if not isinstance(t, str):
        raise PeerNetError(ErrorCode.BAD_FRAME, "frame has no string field 't'")
    return obj


def encodable(frame: Frame, data: bytes | str) -> bool:
    """False when a JSON frame holds a lone surrogate ("\\ud800"): valid JSON that no UTF-8
    encoder accepts, so it could never be stored, forwarded or echoed."""
    if isinstance(data, bytes) or "\\u" not in data:
        return True
    try:
        json.dumps(frame, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# One Packer per thread, reused: `msgpack.packb` builds a Packer (and its buffer) on every call,
# 6.2 us for an inbox record where a kept Packer takes 1.1 (msgpack 1.2.4 on this machine); the
# session shard spent a tenth of its time there. Same bytes either way. A Packer resets itself
# after each `pack`, and after one that raised.
_packers = threading.local()


def _packer(bin_type: bool) -> msgpack.Packer:
    name = "bin" if bin_type else "raw"
    packer = getattr(_packers, name, None)
    if packer is None:
        packer = msgpack.Packer(use_bin_type=bin_type)
        setattr(_packers, name, packer)
    return packer


def encode_frame(frame: Frame, binary: bool) -> bytes | str:
    """Encode one frame for a connection speaking MessagePack (`binary`) or JSON."""
    if binary:
        return pack(frame)
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)


def pack(obj: Any) -> bytes:
    """MessagePack for internal payloads (pub/sub, cache); the one format between processes."""
    return _packer(True).pack(obj)


def pack_raw(obj: Any) -> bytes:
    """MessagePack without the `bin` type (bytes go as strings): what Redis's Lua cmsgpack reads."""
    return _packer(False).pack(obj)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)
