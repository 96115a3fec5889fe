"""The gateway's routes, a module each: every one a function from the injected GatewayDeps (and
the replica's parts it needs) to Starlette routes, which `serve.app.build_app` assembles."""

from __future__ import annotations

from starlette.responses import JSONResponse

from peernet.errors import ErrorCode, PeerNetError


def error_reply(status: int, code: ErrorCode, message: str) -> JSONResponse:
    """The HTTP API's error body: {"error": {"code", "message"}} with `status`."""
    return JSONResponse({"error": {"code": code.value, "message": message}}, status_code=status)


def request_error_reply(exc: PeerNetError) -> JSONResponse:
    """A paged read's error: 400 for a bad request, 503 for a backend that did not answer."""
    return error_reply(400 if exc.code is ErrorCode.BAD_REQUEST else 503, exc.code, exc.message)
