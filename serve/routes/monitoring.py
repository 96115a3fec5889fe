"""What probes and scrapers read: `GET /healthz` (the backends and the injected checks),
`GET /metrics` (this replica's) and `GET /metrics/cluster` (every replica's, merged)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from peernet.errors import PeerNetError
from serve import cluster_metrics, metrics
from serve.deps import GatewayDeps
from serve.routes import error_reply

log = logging.getLogger("peernet.app")

PROMETHEUS_TEXT = "text/plain; version=0.0.4"

T = TypeVar("T")


async def health(deps: GatewayDeps, timeout_s: float) -> dict[str, str]:
    """Every check by name: "ok", or why it is down (a check that takes over `timeout_s` is)."""
    checks = {"kafka": deps.log.ping, "redis": deps.cache.ping, "mongo": deps.store.ping,
              **deps.checks}

    async def run(check: Any) -> str:
        try:
            await asyncio.wait_for(check(), timeout_s)
            return "ok"
        except Exception as exc:
            return f"down: {type(exc).__name__}: {exc}"[:300]

    return dict(zip(checks, await asyncio.gather(*(run(c) for c in checks.values())), strict=True))


async def read_into_metrics(what: str, source: Callable[[], Awaitable[T]] | None,
                            set_series: Callable[[T], None], clear: Callable[[], None],
                            timeout_s: float) -> bool:
    """`source`'s reading into the metrics by `set_series`; False when it was not read in
    `timeout_s` (logged), and then `clear`: a stale reading would pass for a current one."""
    if source is None:
        return True
    try:
        set_series(await asyncio.wait_for(source(), timeout_s))
    except Exception as exc:
        log.warning("%s not read for /metrics: %s: %s", what, type(exc).__name__, exc)
        clear()
        return False
    return True


async def read_lag(deps: GatewayDeps, timeout_s: float) -> None:
    if not await read_into_metrics("consumer lag", deps.consumer_lag, metrics.set_consumer_lag,
                                   lambda: metrics.set_consumer_lag([]), timeout_s):
        metrics.CONSUMER_LAG_ERRORS.inc()


async def read_queue_depths(deps: GatewayDeps, timeout_s: float) -> None:
    await read_into_metrics("shard queue depths", deps.shard_queue_depth,
                            metrics.set_shard_queue_depth,
                            lambda: metrics.set_shard_queue_depth({}), timeout_s)


def monitoring_routes(deps: GatewayDeps, *, check_timeout_s: float,
                      read_timeout_s: float) -> list[Route]:
    """`check_timeout_s` bounds each health check; `read_timeout_s` a scrape's wait for the
    consumers' lag, and as long for the shards' queue depths (read at once). The lag and depth
    sources are read from `deps` at each scrape."""
    metrics_group = cluster_metrics.metrics_group(deps.cfg.metrics.keyspace)

    async def healthz(request: Request) -> Response:
        results = await health(deps, check_timeout_s)
        healthy = all(v == "ok" for v in results.values())
        body: dict[str, Any] = {"status": "ok" if healthy else "unavailable", "checks": results}
        if not healthy:
            body["failing"] = [k for k, v in results.items() if v != "ok"]
        return JSONResponse(body, status_code=200 if healthy else 503)

    async def metrics_endpoint(request: Request) -> Response:
        await asyncio.gather(read_lag(deps, read_timeout_s), read_queue_depths(deps, read_timeout_s))
        return Response(metrics.render(), media_type=PROMETHEUS_TEXT)

    async def cluster_metrics_endpoint(request: Request) -> Response:
        readings = asyncio.gather(read_lag(deps, read_timeout_s),
                                  read_queue_depths(deps, read_timeout_s))
        try:
            published = await deps.cache.members(metrics_group)
        except PeerNetError as exc:
            await readings
            return error_reply(503, exc.code, exc.message)
        await readings
        # A few ms of parsing per replica: in a thread, so the loop serves its sockets between
        # the thread's turns at the GIL rather than after the whole merge.
        body = await asyncio.to_thread(cluster_metrics.merge, published,
                                       cluster_metrics.deployment_wide())
        return Response(body, media_type=PROMETHEUS_TEXT)

    return [
        Route("/healthz", healthz),
        Route("/metrics", metrics_endpoint),
        Route("/metrics/cluster", cluster_metrics_endpoint),
    ]
