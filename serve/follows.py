"""`GET /v1/following` and `GET /v1/followers` (protocol 1.1): a user's side of the social
graph read back over HTTP a page at a time, so that every device sees the same follows."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bus.feeds import GraphSide
from peernet.errors import PeerNetError, bad_request
from peernet.tokens import valid_user_id
from serve.routes import request_error_reply
from serve.routes.tokens import caller_or_reply
from serve.social import feeds_of, limit_param

if TYPE_CHECKING:
    from serve.deps import GatewayDeps


def _user_param(request: Request, name: str) -> str | None:
    value = request.query_params.get(name)
    if value is None or value == "":
        return None
    if not valid_user_id(value):
        raise bad_request(f"'{name}' must be a user id")
    return value


def follow_routes(deps: GatewayDeps) -> list[Route]:
    """`GET /v1/following` and `GET /v1/followers` `?user=&limit=&before=` with a bearer token:
    `{"items":[USER,...],"next":CURSOR_OR_NULL}`, ascending by user id; `user` defaults to the
    caller, and any user may read anyone's (the graph is public: a follow notes the followed)."""

    def route(side: GraphSide) -> Route:
        async def endpoint(request: Request) -> Response:
            caller = caller_or_reply(request, deps.cfg.gateway)
            if isinstance(caller, Response):
                return caller
            try:
                user = _user_param(request, "user") or caller
                limit = limit_param(request)
                # The cursor is the last user id of the previous page. Named `before` as on
                # every paged route, though this list goes up.
                after = _user_param(request, "before")
                page = await feeds_of(deps).graph(user, side, limit, after)
            except PeerNetError as exc:
                return request_error_reply(exc)
            return JSONResponse({"items": page.items, "next": page.next})

        return Route(f"/v1/{side}", endpoint)

    return [route("following"), route("followers")]
