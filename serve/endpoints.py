"""The replicas' own addresses, for clients that connect to a replica directly.

With the `haproxy` ingress every replica serves HTTP and WebSockets on a port of its own, and
HAProxy forwards each frame to it. A client that connects to that port instead skips a process
hop per frame (HAProxy spent about 0.2 ms of CPU per DM at 300 DMs/s, docs/benchmarks.md) and
HAProxy's connection cap (one HAProxy process holds at most half its file descriptors: 7,897
sockets on a machine whose open-files limit is 20,000, docs/deploy.md). Each replica publishes
its base URL and its open connections to the Cache every metrics interval (the same publisher as
/metrics/cluster, `serve/cluster_metrics.py`), and `GET /v1/endpoints` on any replica lists the
live ones, the least loaded first. A replica that died leaves the list within
ENTRY_TTL_INTERVALS intervals; a client whose direct connection fails goes back to the main URL,
which is always right. Nothing here knows Ray: the replica's address comes from GatewayDeps.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bus.cache import Cache
from peernet.errors import PeerNetError
from serve.cluster_metrics import MetricsPublisher

log = logging.getLogger("peernet.endpoints")

def endpoints_group(keyspace: str) -> str:
    """The Cache group the replicas publish their addresses to (PEERNET_METRICS_KEYSPACE)."""
    return f"{keyspace}:endpoints"


def ws_of(url: str, path: str) -> str:
    """The WebSocket URL of `path` at base URL `url` (http -> ws, https -> wss)."""
    scheme, sep, rest = url.partition("://")
    return ("wss" if scheme == "https" else "ws") + sep + rest.rstrip("/") + path


def endpoint_publisher(cache: Cache, keyspace: str, replica: str, every_ms: int,
                       base_url: Callable[[], str | None], connections: Callable[[], int]
                       ) -> MetricsPublisher:
    """Publishes {"url", "connections"} of this replica while `base_url()` knows its address."""

    def render() -> bytes | None:
        url = base_url()
        if url is None:
            return None
        return json.dumps({"url": url, "connections": connections()}).encode()

    return MetricsPublisher(cache, endpoints_group(keyspace), replica, every_ms, render,
                            loop="endpoint_publish")


def endpoint_routes(cache: Cache, keyspace: str, ws_path: str) -> list[Route]:
    """GET /v1/endpoints: {"endpoints": [{"replica", "url", "ws", "connections"}, ...]}, the
    least loaded first (an entry that does not parse is left out); "ws" is `ws_path` there."""

    async def endpoints(request: Request) -> Response:
        try:
            published = await cache.members(endpoints_group(keyspace))
        except PeerNetError as exc:
            return JSONResponse({"error": {"code": exc.code.value, "message": exc.message}},
                                status_code=503)
        out: list[dict[str, Any]] = []
        for replica, raw in published.items():
            try:
                entry = json.loads(raw)
                url = str(entry["url"])
                out.append({"replica": replica, "url": url, "ws": ws_of(url, ws_path),
                            "connections": int(entry.get("connections", 0))})
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("endpoint of replica %s does not parse; left out: %s", replica, exc)
        out.sort(key=lambda e: (e["connections"], e["replica"]))
        return JSONResponse({"endpoints": out})

    return [Route("/v1/endpoints", endpoints)]


__all__ = ["endpoint_publisher", "endpoint_routes", "endpoints_group", "ws_of"]
