"""The Starlette app: the WebSocket endpoint and the HTTP API, built from injected dependencies
and assembled from the route modules of serve/routes."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.routing import BaseRoute, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from peernet.config import PROJECT_ROOT
from serve.deps import GatewayDeps
from serve.endpoints import endpoint_routes
from serve.follows import follow_routes
from serve.replica import Replica
from serve.routes.conversations import conversation_routes
from serve.routes.monitoring import monitoring_routes
from serve.routes.presence import presence_routes
from serve.routes.socket import ADDRESS_FULL, socket_asgi, socket_endpoint
from serve.routes.tokens import token_routes
from serve.routes.web import web_routes
from serve.social import social_routes

__all__ = ["ADDRESS_FULL", "HEALTH_TIMEOUT_S", "METRICS_LAG_TIMEOUT_S", "WEB_DIST", "WS_PATH",
           "GatewayApp", "build_app"]

# The settings below are read when the app is built (tests shorten the timeouts).
HEALTH_TIMEOUT_S = 2.0
# A scrape waits at most this long for the consumers' lag, and as long for the shards' queue
# depths (read at once); what is not read in time has no series in that scrape.
METRICS_LAG_TIMEOUT_S = 1.5
# The web client's bundle, built by ./dev (not committed; README, "Web client"); served at / when present.
WEB_DIST = PROJECT_ROOT / "web" / "dist"


# The WebSocket endpoint's path: see GatewayApp.
WS_PATH = "/v1/ws"


class GatewayApp(Starlette):
    """Starlette, with a direct path for the WebSocket endpoint.

    A socket's handler runs for the connection's whole life, and through Starlette's middleware
    and router every layer keeps its coroutine frame and closures alive with it (about 4 KiB per
    idle connection, docs/benchmarks.md). A WebSocket to WS_PATH (no root path) goes straight to
    the endpoint instead: the same handler and the same `scope["app"]`; for a WebSocket those
    layers only route it (Starlette's error middleware passes WebSockets through, and the
    exception middleware re-raises what is not an HTTP or WebSocket exception, which the
    endpoint never raises). Everything else, and the route in `routes` (which Serve reads for
    its route names), is unchanged."""

    def __init__(self, *, ws_endpoint: ASGIApp, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._ws_endpoint = ws_endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "websocket" and scope.get("path") == WS_PATH
                and not scope.get("root_path")):
            scope["app"] = self
            await self._ws_endpoint(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def build_app(deps: GatewayDeps) -> Starlette:
    """The gateway on `deps`: one Replica of its parts, started and stopped with the app, and the
    routes of serve/routes in the order they match."""
    replica = Replica.build(deps)
    websocket = socket_endpoint(replica)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await replica.start()
        try:
            yield
        finally:
            await replica.stop()

    routes: list[BaseRoute] = [
        WebSocketRoute(WS_PATH, websocket),
        *monitoring_routes(deps, check_timeout_s=HEALTH_TIMEOUT_S,
                           read_timeout_s=METRICS_LAG_TIMEOUT_S),
        *token_routes(deps),
        *conversation_routes(deps),
        *social_routes(deps),
        *follow_routes(deps),
        *presence_routes(deps, replica.presence),
        *endpoint_routes(deps.cache, deps.cfg.metrics.keyspace, WS_PATH),
        *web_routes(WEB_DIST),  # last: every route above wins
    ]
    app = GatewayApp(ws_endpoint=socket_asgi(websocket), routes=routes, lifespan=lifespan)
    app.state.hub = replica.hub
    app.state.presence = replica.presence
    app.state.liveness = replica.liveness
    app.state.per_address = replica.per_address
    return app
