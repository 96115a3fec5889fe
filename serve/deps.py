"""What the gateway needs from the outside world, injected: the app knows nothing of Ray."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from bus.cache import Cache
from bus.conversations import ConversationIndex
from bus.eventlog import ConsumerLag, EventLog
from bus.feeds import FeedStore
from bus.groups import GroupStore
from bus.inbox import InboxCache
from bus.presence import PresenceStore
from bus.pubsub import PubSub
from bus.store import DocumentStore
from peernet.config import PeerNetConfig
from serve.presence import PresenceShards

HealthCheck = Callable[[], Awaitable[None]]
# The lag of every consumer PeerNet runs, read when /metrics is scraped.
LagSource = Callable[[], Awaitable[list[ConsumerLag]]]
# Each shard actor's queue depth (actor name -> depth), read when /metrics is scraped.
QueueDepthSource = Callable[[], Awaitable[dict[str, int]]]


@dataclass
class GatewayDeps:
    cfg: PeerNetConfig
    log: EventLog
    cache: Cache
    inbox: InboxCache
    pubsub: PubSub
    store: DocumentStore
    presence: PresenceStore
    presence_shards: PresenceShards
    # Named health checks beside kafka/redis/mongo (e.g. "ray"), each raising when down.
    checks: dict[str, HealthCheck] = field(default_factory=dict)
    replica: str = "local"
    # Started with the app (lifespan) and stopped with it, in order.
    on_startup: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    on_shutdown: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Home feeds and the social graph (serve/social.py); None: social frames are unavailable.
    feeds: FeedStore | None = None
    # Groups' current membership (serve/groups.py); None: group requests are unavailable.
    groups: GroupStore | None = None
    # Every user's conversations and read markers (serve/reads.py, GET /v1/conversations);
    # None: `read` and the list are unavailable.
    conversations: ConversationIndex | None = None
    # The consumers' lag for /metrics (bounded by METRICS_LAG_TIMEOUT_S); None: not exported.
    consumer_lag: LagSource | None = None
    # The shard actors' queue depths for /metrics (bounded likewise); None: not exported.
    shard_queue_depth: QueueDepthSource | None = None
    # This replica's own base URL ("http://host:port") where clients may connect to it directly,
    # None while it is not known (or there is none: the `proxy` ingress). serve/endpoints.py.
    direct_url: Callable[[], str | None] | None = None
