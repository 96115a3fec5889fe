"""The gateway's routes, a module each: every one a function from the injected GatewayDeps (and
the replica's parts it needs) to Starlette routes, which `serve.app.build_app` assembles."""

from __future__ import annotations

from starlette.responses import JSONResponse

from peernet.errors import ErrorCode


def error_reply(status: int, code: ErrorCode, message: str) -> JSONResponse:
    """The HTTP API's error body: {"error": {"code", "message"}} with `status`."""
    return JSONResponse({"error": {"code": code.value, "message": message}}, status_code=status)
