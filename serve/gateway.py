"""The gateway as a Ray Serve deployment: one replica is the Starlette app (serve/app.py) on this
process's own backends, and answers /healthz's Ray check and /metrics' reads of the shard actors.
The operator's side (serve/deployment.py) deploys it; Serve and the actors are reached through
serve/ray_cluster.py."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import psutil
from starlette.applications import Starlette

from actors.wiring import NAMESPACE, PresenceShardClient, actor_names, consumer_actor_names
from bus.backends import backends
from bus.eventlog import ConsumerLag
from peernet.config import load_config
from peernet.logs import setup_logging
from serve.app import build_app
from serve.deps import GatewayDeps
from serve.ray_cluster import call, ingress_deployment, named_actor, node_address, replica_id
from serve.ws_server import use_server_settings

log = logging.getLogger("peernet.serve")

# One actor's answer to `lag` or `queue_depth` for /metrics; a slower one is left out of that
# scrape.
LAG_CALL_TIMEOUT_S = 1.0
# The ports Serve gives the replicas' own HTTP servers (ray.serve._private.constants, read from
# the same variables Serve reads).
DIRECT_INGRESS_HTTP_PORTS = range(
    int(os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "30000")),
    int(os.environ.get("RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT", "31000")) + 1)


def own_listening_port(ports: range) -> int | None:
    """The lowest TCP port in `ports` this process listens on, or None."""
    try:
        found = [c.laddr.port for c in psutil.Process().net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port in ports]
    except psutil.Error:
        return None
    return min(found) if found else None


@ingress_deployment(ray_actor_options={"num_cpus": 0}, health_check_period_s=2,
                    graceful_shutdown_timeout_s=5)
class Gateway:
    """One gateway replica: the Starlette app with this process's own backends."""

    def __init__(self) -> None:
        setup_logging()
        self._cfg = load_config()
        use_server_settings(self._cfg.gateway)  # before Serve starts this replica's server
        self._handles: dict[str, Any] = {}
        self._metric_handles: dict[str, Any] = {}  # the actors /metrics asks, by name
        self._direct: str | None = None  # this replica's own base URL, once found

    async def __serve_build_asgi_app__(self) -> Starlette:
        cfg = self._cfg
        replica = replica_id()
        if replica is None:  # outside a replica (tests)
            replica = f"pid{os.getpid()}"
        b = backends(cfg, client_id=f"peernet-gateway-{replica}", linger_ms=cfg.gateway.kafka_linger_ms)
        deps = GatewayDeps(cfg=cfg, log=b.log, cache=b.cache, inbox=b.inbox, pubsub=b.pubsub,
                           store=b.store, feeds=b.feeds, presence=b.presence, groups=b.groups,
                           conversations=b.conversations,
                           presence_shards=PresenceShardClient(cfg),
                           checks={"ray": self._ray_check}, replica=replica,
                           consumer_lag=self._consumer_lag,
                           shard_queue_depth=self._shard_queue_depth,
                           direct_url=self._direct_url,
                           on_startup=[b.start], on_shutdown=[b.stop])
        return build_app(deps)

    def _direct_url(self) -> str | None:
        """This replica's own base URL: with the `haproxy` ingress Serve starts a server in each
        replica on a port of its direct-ingress range, after this class's constructor; found
        among the process's listening sockets once it is there. The host is the one it binds,
        or the node's address when it binds every interface."""
        if self._direct is not None or self._cfg.gateway.ingress != "haproxy":
            return self._direct
        port = own_listening_port(DIRECT_INGRESS_HTTP_PORTS)
        if port is None:
            return None
        host = self._cfg.gateway.host
        if host in ("", "0.0.0.0", "::"):
            host = node_address()
        self._direct = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        return self._direct

    async def _ray_check(self) -> None:
        if not self._handles:
            self._handles = {n: named_actor(n, NAMESPACE) for n in actor_names(self._cfg)}
        stats = await asyncio.gather(*(call(h, "stats") for h in self._handles.values()))
        down = [n for n, s in zip(self._handles, stats, strict=True) if not s.get("started")]
        if down:
            raise RuntimeError(f"actors not started: {', '.join(down)}")

    async def _ask_each(self, names: list[str], method: str) -> dict[str, Any]:
        """Each named actor's answer to `method` (no arguments), concurrently. An actor that
        does not answer within LAG_CALL_TIMEOUT_S is left out (and logged)."""

        async def one(name: str) -> tuple[str, Any] | None:
            try:
                handle = self._metric_handles.get(name)
                if handle is None:
                    handle = self._metric_handles[name] = named_actor(name, NAMESPACE)
                return name, await asyncio.wait_for(call(handle, method), LAG_CALL_TIMEOUT_S)
            except Exception as exc:
                self._metric_handles.pop(name, None)  # looked up again: it may have been recreated
                log.warning("%s of %s not read: %s: %s", method, name, type(exc).__name__, exc)
                return None

        answers = await asyncio.gather(*(one(n) for n in names))
        return dict(a for a in answers if a is not None)

    async def _consumer_lag(self) -> list[ConsumerLag]:
        """Each consumer actor's own report (its consumer lives there, not in this replica);
        actors that do not answer in time are left out of this scrape."""
        reports = await self._ask_each(consumer_actor_names(self._cfg), "lag")
        return [ConsumerLag(r["group"], r["topic"], {int(p): int(n) for p, n in r["partitions"].items()},
                            int(r.get("renewals", 0)))
                for actor_reports in reports.values() for r in actor_reports or ()]

    async def _shard_queue_depth(self) -> dict[str, int]:
        """Each shard actor's queue depth, by actor name; actors that do not answer in time are
        left out of this scrape."""
        depths = await self._ask_each(actor_names(self._cfg), "queue_depth")
        return {name: int(depth) for name, depth in depths.items()}
