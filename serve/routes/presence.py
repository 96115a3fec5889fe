"""`GET /v1/presence?users=a,b`: the presence of up to PEERNET_MAX_WATCH users, read once."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from peernet.errors import ErrorCode, PeerNetError
from peernet.tokens import valid_user_id
from serve.deps import GatewayDeps
from serve.presence import Presence, state_map
from serve.routes import error_reply
from serve.routes.tokens import caller_or_reply


def presence_routes(deps: GatewayDeps, presence: Presence) -> list[Route]:
    """With a bearer token (anyone's): {"users": {user: state}}."""

    async def presence_states(request: Request) -> Response:
        caller = caller_or_reply(request, deps.cfg.gateway)
        if isinstance(caller, Response):
            return caller
        users = list(dict.fromkeys(u for u in request.query_params.get("users", "").split(",") if u))
        limit = deps.cfg.gateway.max_watch
        if not users or len(users) > limit or not all(valid_user_id(u) for u in users):
            return error_reply(400, ErrorCode.BAD_REQUEST,
                               f"users must be 1 to {limit} comma-separated user ids")
        try:
            states = await presence.read(users)
        except PeerNetError as exc:
            return error_reply(503, exc.code, exc.message)
        return JSONResponse({"users": state_map(states)})

    return [Route("/v1/presence", presence_states)]
