"""What the in-memory backends share to behave like a wire: they take bytes only, and copy them
in, as a socket would, so that a caller reusing its buffer changes nothing sent."""

from __future__ import annotations


def as_bytes(value: object, what: str) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be bytes, not {type(value).__name__}")
    return bytes(value)  # a copy of a mutable buffer: the caller may reuse it
