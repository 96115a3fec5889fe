"""The one error type of PeerNet, its protocol codes, and the WebSocket close codes."""

from __future__ import annotations

from enum import IntEnum, StrEnum


class ErrorCode(StrEnum):
    """Error codes of the client protocol (`{"t":"error","code":...}`)."""

    BAD_FRAME = "bad_frame"
    UNKNOWN_TYPE = "unknown_type"
    BAD_REQUEST = "bad_request"
    NOT_FOUND = "not_found"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"


class CloseCode(IntEnum):
    """WebSocket close codes of the client protocol."""

    GOING_AWAY = 1001
    MESSAGE_TOO_BIG = 1009
    BAD_TOKEN = 4401
    TIMEOUT = 4408
    SLOW_OR_FLOODING = 4429


class PeerNetError(Exception):
    """An error a client can be told about.

    `code` is the protocol code; `retriable` says whether the same request may succeed later
    (a backend was down and nothing was stored).
    """

    def __init__(self, code: ErrorCode, message: str, *, retriable: bool | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retriable = code is ErrorCode.UNAVAILABLE if retriable is None else retriable

    def __repr__(self) -> str:
        return f"PeerNetError({self.code.value!r}, {self.message!r})"


def bad_request(message: str) -> PeerNetError:
    return PeerNetError(ErrorCode.BAD_REQUEST, message)


def unavailable(message: str) -> PeerNetError:
    return PeerNetError(ErrorCode.UNAVAILABLE, message, retriable=True)
