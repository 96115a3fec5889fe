"""One gateway replica's long-lived parts, built from its injected GatewayDeps and shared by its
sockets and routes; started and stopped with the app (its lifespan)."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from peernet.config import presence_lease_ms
from peernet.lease import LeaseTiming
from serve import cluster_metrics, metrics
from serve.acks import AckBuffer
from serve.deps import GatewayDeps
from serve.endpoints import endpoint_publisher
from serve.groups import Groups
from serve.handlers import HandlerTable, build_handlers
from serve.hub import Hub
from serve.limits import AddressLimiter, TrustedProxies
from serve.liveness import Liveness, tick_for
from serve.messaging import Messenger
from serve.presence import Presence
from serve.reads import ReadState

# The app's logger: "gateway ... ready" has always been its line.
log = logging.getLogger("peernet.app")


@dataclass(frozen=True)
class Replica:
    """Built once per app (`Replica.build`); the socket entry, the presence route and the
    lifespan share it, and the app exposes some of it on `app.state` for tests."""

    deps: GatewayDeps
    hub: Hub
    presence: Presence
    acks: AckBuffer
    liveness: Liveness
    handlers: HandlerTable
    trusted: TrustedProxies
    per_address: AddressLimiter
    # This replica's metrics, and its direct address, published to Redis while it runs.
    publisher: cluster_metrics.MetricsPublisher
    endpoint: cluster_metrics.MetricsPublisher

    @classmethod
    def build(cls, deps: GatewayDeps) -> Replica:
        cfg, gw = deps.cfg, deps.cfg.gateway
        hub = Hub(deps.pubsub)
        presence = Presence(deps.presence, deps.presence_shards, deps.pubsub,
                            LeaseTiming(presence_lease_ms(cfg)), deps.replica, gw.max_watch,
                            cfg.presence.report_gap_ms / 1000)
        acks = AckBuffer(deps.inbox, gw.ack_flush_ms)
        direct_url = deps.direct_url
        messenger = Messenger(cfg, deps.log, deps.cache)
        groups = Groups(deps.groups, messenger, cfg.topics.messages)
        reads = ReadState(deps.conversations, deps.store, groups, messenger, cfg.topics.messages)
        return cls(
            deps=deps, hub=hub, presence=presence, acks=acks,
            liveness=Liveness(tick_for(gw.hello_timeout_s, 2 * gw.heartbeat_ms / 1000)),
            handlers=build_handlers(messenger, presence, acks, groups, reads),
            trusted=TrustedProxies(gw.trusted_proxies),
            per_address=AddressLimiter(gw.max_connections_per_address),
            publisher=cluster_metrics.MetricsPublisher(
                deps.cache, cluster_metrics.metrics_group(cfg.metrics.keyspace), deps.replica,
                cfg.metrics.publish_ms),
            endpoint=endpoint_publisher(
                deps.cache, cfg.metrics.keyspace, deps.replica,
                cfg.metrics.publish_ms if gw.direct_endpoints else 0,
                direct_url if direct_url is not None else (lambda: None),
                lambda: hub.connections),
        )

    async def start(self) -> None:
        """The injected start-ups first (`on_startup`, in order), then this replica's parts."""
        metrics.watch_gc()
        for start in self.deps.on_startup:
            await start()
        self.liveness.start()
        await self.presence.start()
        await self.acks.start()
        await self.publisher.start()
        await self.endpoint.start()
        log.info("gateway %s ready", self.deps.replica)

    async def stop(self) -> None:
        """Every part, then the injected shut-downs (`on_shutdown`), each whatever the others
        raise: a replica going away stops all it can."""
        for stop in (self.liveness.stop, self.presence.stop, self.acks.stop,
                     self.publisher.stop, self.endpoint.stop, *self.deps.on_shutdown):
            with contextlib.suppress(Exception):
                await stop()
