"""Bearer tokens at the HTTP API: who a request is, and `POST /v1/dev/token`, which issues a
token to anyone while development tokens are enabled."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from peernet.config import GatewayConfig
from peernet.errors import ErrorCode, PeerNetError
from peernet.tokens import TokenError, issue_token, verify_token
from serve.deps import GatewayDeps
from serve.routes import error_reply


def bearer_user(request: Request, gateway: GatewayConfig) -> str:
    """The user of the request's bearer token; TokenError when it has none or a bad one."""
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("bearer "):
        raise TokenError("missing bearer token")
    return verify_token(header[7:].strip(), gateway)


def caller_or_reply(request: Request, gateway: GatewayConfig) -> str | Response:
    """The request's user, or the 401 the HTTP API answers a missing or bad token with."""
    try:
        return bearer_user(request, gateway)
    except TokenError as exc:
        return error_reply(401, ErrorCode.FORBIDDEN, str(exc))


def token_routes(deps: GatewayDeps) -> list[Route]:
    """`POST /v1/dev/token` {"user"}: {"token"}; 404 while development tokens are disabled."""

    async def dev_token(request: Request) -> Response:
        if not deps.cfg.gateway.dev_tokens:
            return error_reply(404, ErrorCode.NOT_FOUND, "development tokens are disabled")
        try:
            body = await request.json()
        except ValueError:
            return error_reply(400, ErrorCode.BAD_REQUEST, "body must be JSON")
        user = body.get("user") if isinstance(body, dict) else None
        try:
            return JSONResponse({"token": issue_token(user, deps.cfg.gateway)})  # type: ignore[arg-type]
        except PeerNetError as exc:
            return error_reply(400, exc.code, exc.message)

    return [Route("/v1/dev/token", dev_token, methods=["POST"])]
