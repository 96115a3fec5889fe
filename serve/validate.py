"""Field checks for request frames: each failure is a `bad_request` naming the field."""

from __future__ import annotations

from typing import Any

from peernet.codec import Frame
from peernet.errors import bad_request
from peernet.tokens import valid_user_id


def user_field(frame: Frame, name: str) -> str:
    value = frame.get(name)
    if not valid_user_id(value):
        raise bad_request(f"'{name}' must be a user id matching ^[a-z0-9_]{{1,32}}$")
    return str(value)


def text_field(frame: Frame, name: str, max_chars: int, *, min_chars: int = 1) -> str:
    value = frame.get(name)
    if not isinstance(value, str) or not min_chars <= len(value) <= max_chars:
        raise bad_request(f"'{name}' must be a string of {min_chars} to {max_chars} characters")
    return value


def optional_text(frame: Frame, name: str, max_chars: int) -> str | None:
    if frame.get(name) is None:
        return None
    return text_field(frame, name, max_chars)


def int_field(frame: Frame, name: str, *, lo: int, hi: int, default: int | None = None) -> int:
    value: Any = frame.get(name, default)
    if value is None or isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise bad_request(f"'{name}' must be an integer from {lo} to {hi}")
    return value


def user_list(frame: Frame, name: str, max_items: int) -> list[str]:
    value = frame.get(name)
    if not isinstance(value, list) or len(value) > max_items:
        raise bad_request(f"'{name}' must be a list of at most {max_items} user ids")
    for user in value:
        if not valid_user_id(user):
            raise bad_request(f"'{name}' holds an invalid user id")
    return list(dict.fromkeys(value))


def dm_conv(a: str, b: str) -> str:
    lo, hi = sorted((a, b))
    return f"dm:{lo}:{hi}"


def conv_participants(conv: str) -> tuple[str, str] | None:
    parts = conv.split(":")
    if len(parts) != 3 or parts[0] != "dm" or not all(valid_user_id(p) for p in parts[1:]):
        return None
    if parts[1] >= parts[2]:
        return None
    return parts[1], parts[2]
