"""The web client's bundle (web/dist, built by ./dev) at /, when it is built."""

from __future__ import annotations

from pathlib import Path

from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocketClose


def web_routes(dist: Path) -> list[Mount]:
    """A mount of `dist` at / if it holds an index.html, else none. To go last, so that every
    other route wins; a build made later is served after a restart."""
    if not (dist / "index.html").is_file():
        return []
    static = StaticFiles(directory=dist, html=True)

    async def web(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # a WebSocket to an unknown path: refused, as before
            await WebSocketClose()(scope, receive, send)
            return
        await static(scope, receive, send)

    return [Mount("/", app=web, name="web")]
