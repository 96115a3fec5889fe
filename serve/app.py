"""The Starlette app: the WebSocket endpoint and the HTTP API, built from injected dependencies."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketClose

from peernet.config import PROJECT_ROOT, presence_lease_ms
from peernet.errors import CloseCode, ErrorCode, PeerNetError
from peernet.lease import LeaseTiming
from peernet.tokens import TokenError, issue_token, valid_user_id, verify_token
from serve import cluster_metrics, metrics
from serve.acks import AckBuffer
from serve.connection import Connection
from serve.deps import GatewayDeps
from serve.endpoints import endpoint_publisher, endpoint_routes
from serve.handlers import build_handlers
from serve.hub import Hub
from serve.limits import AddressLimiter, TrustedProxies, client_address
from serve.liveness import Liveness, tick_for
from serve.messaging import Messenger
from serve.presence import Presence, state_map
from serve.social import social_routes
from serve.validate import conv_participants

log = logging.getLogger("peernet.app")

HEALTH_TIMEOUT_S = 2.0
# The close reason of a connection over PEERNET_MAX_CONNECTIONS_PER_ADDRESS (with 4429).
ADDRESS_FULL = "too many connections from this address"
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


def _error(status: int, code: ErrorCode, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code.value, "message": message}}, status_code=status)


def build_app(deps: GatewayDeps) -> Starlette:
    hub = Hub(deps.pubsub)
    messenger = Messenger(deps.cfg, deps.log, deps.cache)
    presence = Presence(deps.presence, deps.presence_shards, deps.pubsub,
                        LeaseTiming(presence_lease_ms(deps.cfg)), deps.replica,
                        deps.cfg.gateway.max_watch)
    acks = AckBuffer(deps.inbox, deps.cfg.gateway.ack_flush_ms)
    gw = deps.cfg.gateway
    liveness = Liveness(tick_for(gw.hello_timeout_s, 2 * gw.heartbeat_ms / 1000))
    handlers = build_handlers(messenger, presence, acks)
    trusted = TrustedProxies(deps.cfg.gateway.trusted_proxies)
    per_address = AddressLimiter(deps.cfg.gateway.max_connections_per_address)
    metrics_group = cluster_metrics.metrics_group(deps.cfg.metrics.keyspace)
    publisher = cluster_metrics.MetricsPublisher(deps.cache, metrics_group, deps.replica,
                                                 deps.cfg.metrics.publish_ms)
    direct_url = deps.direct_url
    endpoint = endpoint_publisher(
        deps.cache, deps.cfg.metrics.keyspace, deps.replica,
        deps.cfg.metrics.publish_ms if deps.cfg.gateway.direct_endpoints else 0,
        direct_url if direct_url is not None else (lambda: None), lambda: hub.connections)

    async def websocket(ws: WebSocket) -> None:
        peer = ws.client.host if ws.client else None
        address = client_address(peer, ws.headers.getlist("x-forwarded-for"), trusted)
        if not per_address.acquire(address):
            await refuse(ws, "address", ADDRESS_FULL)
            return
        try:
            await Connection(ws, deps, hub, handlers, presence, liveness).run()
        finally:
            # Every way out of the connection, its errors and cancellation too.
            per_address.release(address)

    async def refuse(ws: WebSocket, reason: str, message: str) -> None:
        # Accepted, then closed: a browser sees the close code, never the HTTP status of a
        # refused upgrade. Nothing is logged per refusal (a flood would fill the log).
        metrics.CONNECTIONS_REFUSED.labels(reason).inc()
        metrics.CLOSES.labels(str(CloseCode.SLOW_OR_FLOODING.value)).inc()
        with contextlib.suppress(Exception):
            await ws.accept()
            await ws.close(CloseCode.SLOW_OR_FLOODING, message)

    async def healthz(request: Request) -> Response:
        checks = {"kafka": deps.log.ping, "redis": deps.cache.ping, "mongo": deps.store.ping,
                  **deps.checks}

        async def run(check: Any) -> str:
            try:
                await asyncio.wait_for(check(), HEALTH_TIMEOUT_S)
                return "ok"
            except Exception as exc:
                return f"down: {type(exc).__name__}: {exc}"[:300]

        results = dict(zip(checks, await asyncio.gather(*(run(c) for c in checks.values())),
                           strict=True))
        healthy = all(v == "ok" for v in results.values())
        body: dict[str, Any] = {"status": "ok" if healthy else "unavailable", "checks": results}
        if not healthy:
            body["failing"] = [k for k, v in results.items() if v != "ok"]
        return JSONResponse(body, status_code=200 if healthy else 503)

    async def read_lag() -> None:
        if deps.consumer_lag is None:
            return
        try:
            metrics.set_consumer_lag(await asyncio.wait_for(deps.consumer_lag(),
                                                            METRICS_LAG_TIMEOUT_S))
        except Exception as exc:
            # A stale lag would read as a healthy one: no series rather than old ones.
            log.warning("consumer lag not read for /metrics: %s: %s", type(exc).__name__, exc)
            metrics.set_consumer_lag([])
            metrics.CONSUMER_LAG_ERRORS.inc()

    async def read_queue_depths() -> None:
        if deps.shard_queue_depth is None:
            return
        try:
            metrics.set_shard_queue_depth(await asyncio.wait_for(deps.shard_queue_depth(),
                                                                 METRICS_LAG_TIMEOUT_S))
        except Exception as exc:
            log.warning("shard queue depths not read for /metrics: %s: %s",
                        type(exc).__name__, exc)
            metrics.set_shard_queue_depth({})

    async def metrics_endpoint(request: Request) -> Response:
        await asyncio.gather(read_lag(), read_queue_depths())
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    async def cluster_metrics_endpoint(request: Request) -> Response:
        readings = asyncio.gather(read_lag(), read_queue_depths())
        try:
            published = await deps.cache.members(metrics_group)
        except PeerNetError as exc:
            await readings
            return _error(503, exc.code, exc.message)
        await readings
        # A few ms of parsing per replica: in a thread, so the loop serves its sockets between
        # the thread's turns at the GIL rather than after the whole merge.
        body = await asyncio.to_thread(cluster_metrics.merge, published,
                                       cluster_metrics.deployment_wide())
        return Response(body, media_type="text/plain; version=0.0.4")

    async def dev_token(request: Request) -> Response:
        if not deps.cfg.gateway.dev_tokens:
            return _error(404, ErrorCode.NOT_FOUND, "development tokens are disabled")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, ErrorCode.BAD_REQUEST, "body must be JSON")
        user = body.get("user") if isinstance(body, dict) else None
        try:
            return JSONResponse({"token": issue_token(user, deps.cfg.gateway)})  # type: ignore[arg-type]
        except PeerNetError as exc:
            return _error(400, exc.code, exc.message)

    def authed(request: Request) -> str:
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            raise TokenError("missing bearer token")
        return verify_token(header[7:].strip(), deps.cfg.gateway)

    async def conversation_messages(request: Request) -> Response:
        try:
            user = authed(request)
        except TokenError as exc:
            return _error(401, ErrorCode.FORBIDDEN, str(exc))
        conv = request.path_params["conv"]
        parts = conv_participants(conv)
        if parts is None:
            return _error(404, ErrorCode.NOT_FOUND, "no such conversation")
        if user not in parts:
            return _error(403, ErrorCode.FORBIDDEN, "only participants may read a conversation")
        try:
            limit = int(request.query_params.get("limit", "50"))
            before_raw = request.query_params.get("before")
            before = int(before_raw) if before_raw else None
        except ValueError:
            return _error(400, ErrorCode.BAD_REQUEST, "limit and before must be integers")
        if not 1 <= limit <= 100:
            return _error(400, ErrorCode.BAD_REQUEST, "limit must be from 1 to 100")
        if before is not None and not 0 <= before < 2**63:
            # A cursor is a log position (a Kafka offset); a larger int would reach MongoDB,
            # whose BSON encoder raises OverflowError, a 500, for anything past 8 bytes.
            return _error(400, ErrorCode.BAD_REQUEST, "before is not a cursor of this conversation")
        try:
            docs = await deps.store.history_page(conv, before=before, limit=limit)
        except PeerNetError as exc:
            return _error(503, exc.code, exc.message)
        items = [{"id": d["_id"], "conv": d["conv"], "from": d["from"], "to": d["to"],
                  "body": d["body"], "ts": d["ts"]} for d in docs]
        nxt = str(docs[-1]["pos"]) if len(docs) == limit else None
        return JSONResponse({"items": items, "next": nxt})

    async def presence_states(request: Request) -> Response:
        try:
            authed(request)
        except TokenError as exc:
            return _error(401, ErrorCode.FORBIDDEN, str(exc))
        users = list(dict.fromkeys(u for u in request.query_params.get("users", "").split(",") if u))
        limit = deps.cfg.gateway.max_watch
        if not users or len(users) > limit or not all(valid_user_id(u) for u in users):
            return _error(400, ErrorCode.BAD_REQUEST,
                          f"users must be 1 to {limit} comma-separated user ids")
        try:
            states = await presence.read(users)
        except PeerNetError as exc:
            return _error(503, exc.code, exc.message)
        return JSONResponse({"users": state_map(states)})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        metrics.watch_gc()
        for start in deps.on_startup:
            await start()
        liveness.start()
        await presence.start()
        await acks.start()
        await publisher.start()
        await endpoint.start()
        log.info("gateway %s ready", deps.replica)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                await liveness.stop()
            with contextlib.suppress(Exception):
                await presence.stop()
            with contextlib.suppress(Exception):
                await acks.stop()
            with contextlib.suppress(Exception):
                await publisher.stop()
            with contextlib.suppress(Exception):
                await endpoint.stop()
            for stop in deps.on_shutdown:
                with contextlib.suppress(Exception):
                    await stop()

    async def websocket_asgi(scope: Scope, receive: Receive, send: Send) -> None:
        await websocket(WebSocket(scope, receive, send))

    routes = [
        WebSocketRoute(WS_PATH, websocket),
        Route("/healthz", healthz),
        Route("/metrics", metrics_endpoint),
        Route("/metrics/cluster", cluster_metrics_endpoint),
        Route("/v1/dev/token", dev_token, methods=["POST"]),
        Route("/v1/conversations/{conv}/messages", conversation_messages),
        *social_routes(deps),
        Route("/v1/presence", presence_states),
        *endpoint_routes(deps.cache, deps.cfg.metrics.keyspace, WS_PATH),
    ]
    if (WEB_DIST / "index.html").is_file():
        # Last, so that every route above wins; a build made later is served after a restart.
        static = StaticFiles(directory=WEB_DIST, html=True)

        async def web(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":  # a WebSocket to an unknown path: refused, as before
                await WebSocketClose()(scope, receive, send)
                return
            await static(scope, receive, send)

        routes.append(Mount("/", app=web, name="web"))
    app = GatewayApp(ws_endpoint=websocket_asgi, routes=routes, lifespan=lifespan)
    app.state.hub = hub
    app.state.presence = presence
    app.state.liveness = liveness
    app.state.per_address = per_address
    return app
