"""The WebSocket entry: a connection admitted (at most PEERNET_MAX_CONNECTIONS_PER_ADDRESS per
client address) and run (serve/connection.py) for as long as it lives."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

from starlette.datastructures import Headers
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from peernet.errors import CloseCode
from serve import metrics
from serve.connection import Connection
from serve.limits import client_address
from serve.replica import Replica

# The close reason of a connection over PEERNET_MAX_CONNECTIONS_PER_ADDRESS (with 4429).
ADDRESS_FULL = "too many connections from this address"

SocketEndpoint = Callable[[WebSocket], Awaitable[None]]


def socket_endpoint(replica: Replica) -> SocketEndpoint:
    """The handler of one socket, run for the connection's whole life."""
    deps, hub, handlers, presence, liveness = (replica.deps, replica.hub, replica.handlers,
                                               replica.presence, replica.liveness)
    trusted, per_address = replica.trusted, replica.per_address

    async def websocket(ws: WebSocket) -> None:
        peer = ws.client.host if ws.client else None
        # Headers of its own, not `ws.headers`, which the WebSocket would keep for its life.
        forwarded = Headers(scope=ws.scope).getlist("x-forwarded-for")
        address = client_address(peer, forwarded, trusted)
        if not per_address.acquire(address):
            await refuse(ws, "address", ADDRESS_FULL)
            return
        try:
            await Connection(ws, deps, hub, handlers, presence, liveness).run()
        finally:
            # Every way out of the connection, its errors and cancellation too.
            per_address.release(address)

    return websocket


def socket_asgi(endpoint: SocketEndpoint) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """`endpoint` as a bare ASGI app, for GatewayApp's direct path (serve/app.py)."""

    def websocket_asgi(scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # The endpoint's own coroutine, not one awaiting it: a frame less for the socket's life.
        return endpoint(WebSocket(scope, receive, send))

    return websocket_asgi


async def refuse(ws: WebSocket, reason: str, message: str) -> None:
    # Accepted, then closed: a browser sees the close code, never the HTTP status of a
    # refused upgrade. Nothing is logged per refusal (a flood would fill the log).
    metrics.CONNECTIONS_REFUSED.labels(reason).inc()
    metrics.CLOSES.labels(str(CloseCode.SLOW_OR_FLOODING.value)).inc()
    with contextlib.suppress(Exception):
        await ws.accept()
        await ws.close(CloseCode.SLOW_OR_FLOODING, message)
