"""Configuration: one frozen dataclass per component, read from `PEERNET_*` environment
variables in one place (`load_config`). Every variable, its default and meaning is listed in
docs/configuration.md; `peernet config` prints the values in force."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ServicesConfig:
    """Where the backing services are. A service given by its variable is the user's own: the
    local stack neither installs nor starts it."""

    kafka_bootstrap: str = "127.0.0.1:9092"
    redis_url: str = "redis://127.0.0.1:6379/0"
    mongo_url: str = "mongodb://127.0.0.1:27017/?directConnection=true"
    mongo_db: str = "peernet"
    # After an `unavailable` append, appends are refused at once for this long (bus.kafka.FailFast).
    kafka_fail_fast_ms: int = 1000
    # Log consumers commit their offsets at most this often (0: after every batch); a crash
    # redelivers up to this much, which every consumer absorbs (docs/architecture.md).
    kafka_commit_interval_ms: int = 1000
    # How every Kafka client of PeerNet reaches the brokers: "PLAINTEXT" or "SSL" (TLS, the
    # broker's certificate checked against `kafka_ssl_cafile`, or the system's CAs when empty).
    # A client certificate (mutual TLS): `kafka_ssl_certfile` and `kafka_ssl_keyfile`. For a
    # Kafka of your own only: the local stack's broker speaks PLAINTEXT (see load_config).
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_ssl_cafile: str = ""
    kafka_ssl_certfile: str = ""
    kafka_ssl_keyfile: str = ""
    kafka_external: bool = False
    redis_external: bool = False
    mongo_external: bool = False


@dataclass(frozen=True)
class TopicsConfig:
    """The Kafka topics PeerNet creates, with explicit partition counts."""

    events: str = "peernet.events"
    events_partitions: int = 8
    # The messages of conversations (DMs) have a log of their own, so that what reads only the
    # social events (the FeedShards) never fetches one; kept for ever like the event log.
    messages: str = "peernet.messages"
    messages_partitions: int = 8
    inbox: str = "peernet.inbox"
    inbox_partitions: int = 8
    replication_factor: int = 1


@dataclass(frozen=True)
class StackConfig:
    """The local development stack (`peernet stack up`)."""

    home: Path = PROJECT_ROOT / ".peernet"
    kafka_version: str = "4.1.1"
    kafka_heap_mb: int = 512
    redis_port: int = 6379
    kafka_port: int = 9092
    kafka_controller_port: int = 9093
    mongo_port: int = 27017
    mongo_cache: str = "256M"
    secantus_version: str = "0.7.0b3"


@dataclass(frozen=True)
class GatewayConfig:
    """The WebSocket gateway: limits of each connection and the Serve deployment."""

    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 2
    # How clients reach the replicas: "haproxy", each replica serves its own sockets and HAProxy
    # (bundled with Ray Serve) on `port` spreads connections over them by least connections;
    # "proxy", Serve's HTTP proxy actor relays every frame (docs/benchmarks.md: slower, and 5x
    # the memory per connection, on this project's 2-core machine).
    ingress: str = "haproxy"
    # Where Serve runs its ingress (HAProxy or its proxy): "EveryNode" that has a replica, or
    # "HeadOnly" (several Ray nodes on one host, which would all bind `port`).
    proxy_location: str = "EveryNode"
    # At most this many gateway replicas on one Ray node, so that a node's death never takes
    # every replica (Ray's SPREAD placement is a preference only). 0: `replicas - 1` when the
    # cluster has two or more nodes at deploy time, no limit on one node. A replica lost with its
    # node comes back only on a node with room (docs/deploy.md, "Failover").
    max_replicas_per_node: int = 0
    # Where the replicas go (GATEWAY_PLACEMENTS): "spread", `replicas` of them (or the Serve
    # config file's count or autoscaling) held apart by `max_replicas_per_node`; "every_node",
    # one on each live Ray node that carries GATEWAY_RESOURCE, and only there, the count kept
    # equal to those nodes as they join and leave (docs/deploy.md, "Gateway on every node").
    placement: str = "spread"
    # A Serve config file for the gateway (replicas or autoscaling, environment): see
    # serve/serve_config.py and deploy/serve-config.yaml. Empty: none.
    serve_config: str = ""
    max_connections_per_replica: int = 25_000
    # Sockets one node should hold: `peernet serve` raises the open-files limit for it (HAProxy
    # needs ~2.5 files per connection) and says at start when the machine refuses
    # (serve/os_limits.py).
    connections_per_node: int = 50_000
    # Connections one client address may hold open on one replica; over it a new one is closed
    # with 4429 (0: no limit). IPv6 addresses count by /64. See serve/limits.py, client_address.
    max_connections_per_address: int = 1_000
    # Peers whose X-Forwarded-For names the client (addresses or networks, comma-separated):
    # loopback and private networks, where a proxy in front of the replicas connects from.
    trusted_proxies: str = "127.0.0.0/8,::1,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7"
    max_frame_bytes: int = 64 * 1024
    # Whether the replicas' WebSocket server (uvicorn; see serve/ws_server.py) agrees to
    # permessage-deflate when a client offers it, as browsers do. Off: PeerNet's frames are
    # small msgpack, and compression state costs memory on every connection.
    ws_compression: bool = False
    # Serve's access log: a line per HTTP request and per WebSocket connection, written by each
    # replica. Off by default: at a thousand connects a second it cost a replica about a tenth
    # of a connect's CPU; PeerNet logs the connections it closes and why on its own.
    access_log: bool = False
    max_body_chars: int = 4_000
    # Acks (cumulative, no reply) are written to the inbox cache together this often, each
    # user's newest only (serve/acks.py); 0: each at once.
    ack_flush_ms: int = 100
    rate_per_s: float = 200.0
    rate_burst: int = 400
    # Frames over the limit within one flood window that close the connection (4429).
    flood_close_after: int = 1_000
    outbound_queue: int = 1_000
    hello_timeout_s: float = 10.0
    heartbeat_ms: int = 25_000
    token_secret: str = "peernet-development-secret-change-me-in-production"
    token_ttl_s: int = 24 * 3600
    dev_tokens: bool = False
    # Each replica publishes its own address for GET /v1/endpoints (serve/endpoints.py).
    direct_endpoints: bool = True
    cid_ttl_s: int = 24 * 3600
    # How long the gateway's Kafka producer waits for more records before it sends a produce
    # request (aiokafka's linger_ms): the DMs of one such window go to the broker as one request
    # instead of one each. It adds at most this much to a DM's `ok` (docs/architecture.md).
    kafka_linger_ms: int = 2
    # Users one connection may watch at once (presence); watching more is bad_request.
    max_watch: int = 1_000


@dataclass(frozen=True)
class ShardsConfig:
    """The fixed pools of shard actors that host the virtual per-user actors.

    One of each kind by default: that suits a node of a few cores. Every session shard fetches
    every DM and pays its own fetch, inbox produce and Redis call per batch, and every actor is a
    process that wakes when idle, so a second shard on the same cores doubles that work without
    adding a core (docs/benchmarks-journal.md, "One shard of each kind"). A cluster sets its
    counts (deploy/peernet.env: 4 of each)."""

    session_shards: int = 1
    feed_shards: int = 1
    presence_shards: int = 1
    inbox_retention_items: int = 10_000
    inbox_retention_ms: int = 7 * 24 * 3600 * 1000
    # Message ids the conversation index keeps per conversation (and per group of users of a
    # session shard) so that `read` finds a message's place in one Redis round trip; a `read`
    # of an older message looks it up in MongoDB.
    conversation_index_keep: int = 1_000
    # Deliveries batched into one shard call and one Kafka produce.
    max_batch: int = 500
    # The projector waits this long after the first record of a batch for more, so that one
    # MongoDB write carries many events; its Kafka fetch gathers as long again, so the store of
    # record trails delivery by up to twice this.
    projector_linger_ms: int = 250
    # The FeedShards' consumer lets events gather this long before a fetch: most events are DMs,
    # which a FeedShard only skips. A post's pushes and feed writes trail it by up to this much
    # more, and an idle shard then fetches every `feed_linger_ms` instead of every 500 ms (the
    # broker holds a lingering fetch for the whole linger): 0 by default, since 20 ms saved
    # nothing measurable at 50 DMs/s and cost idle fetches (docs/benchmarks.md).
    feed_linger_ms: int = 0


@dataclass(frozen=True)
class PresenceConfig:
    """Presence: the replicas' leases and what Redis keeps of it (see docs/architecture.md)."""

    # The bound on how long a dead gateway replica's users stay online; 0: 3 x heartbeat.
    lease_ms: int = 0
    # How long an offline user's `since` (last seen) is kept; after it the user reads as never seen.
    last_seen_ttl_s: int = 30 * 24 * 3600
    # Prefix of every presence key in Redis: deployments sharing one Redis keep apart by it.
    keyspace: str = "presence"
    # A replica reports its users' changes to a shard at most once per this gap: a change with
    # nothing reported for that long goes at once, and a burst of connects is gathered into one
    # actor call instead of one call each (issue 19: 1.5 ms of the shard's CPU per connect).
    report_gap_ms: int = 50


@dataclass(frozen=True)
class FeedsConfig:
    """Home feeds and the social graph (see docs/architecture.md, "Feeds")."""

    # Newest entries kept per home feed and per author's own post index.
    cap: int = 800
    # Authors with more followers than this are not fanned out; readers merge their posts.
    celebrity_threshold: int = 10_000
    # Prefix of every feed and graph key in Redis: deployments sharing one Redis keep apart by it.
    keyspace: str = "social"


@dataclass(frozen=True)
class MetricsConfig:
    """The gateway's aggregated scrape target, /metrics/cluster (serve/cluster_metrics.py)."""

    # Each gateway replica publishes its own metrics to Redis this often (0: never; its series
    # are then missing from /metrics/cluster). Its entry expires after 3 intervals without one.
    publish_ms: int = 5_000
    # Prefix of the published metrics' keys in Redis: deployments sharing one Redis keep apart by it.
    keyspace: str = "metrics"


@dataclass(frozen=True)
class LogsConfig:
    """How every PeerNet process logs (peernet/logs.py)."""

    format: str = "text"  # "text", or "json": one object per line for a log pipeline
    level: str = "INFO"


@dataclass(frozen=True)
class RayConfig:
    address: str = ""  # empty: `peernet serve` starts a local Ray head
    tmpdir: str = ""  # empty: .peernet/ray, or /tmp/peernet-ray when that path is too long
    auth_mode: str = "disabled"
    num_cpus: int = 0  # 0: Ray's own count
    object_store_mb: int = 256


@dataclass(frozen=True)
class PeerNetConfig:
    services: ServicesConfig = field(default_factory=ServicesConfig)
    topics: TopicsConfig = field(default_factory=TopicsConfig)
    stack: StackConfig = field(default_factory=StackConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    presence: PresenceConfig = field(default_factory=PresenceConfig)
    feeds: FeedsConfig = field(default_factory=FeedsConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    logs: LogsConfig = field(default_factory=LogsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


# Ray's node health checks on a PeerNet cluster's head (cluster.yaml sets them before `ray start
# --head`; the GCS reads them): a node is checked each second and called dead after 3 misses, so
# its shard actors restart elsewhere within seconds (Ray's default is 3 s x 5 with a 10 s
# timeout). Shown by tests/e2e/test_multinode.py, which starts its cluster with them.
RAY_HEALTH_CHECKS: dict[str, str] = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


# The custom Ray resource of the nodes that take traffic, for `PEERNET_GATEWAY_PLACEMENT=every_node`:
# each gateway replica needs one unit, so none goes to a node without it. Nodes get it from
# `ray start --resources='{"peernet_gateway": 1}'` (cluster.yaml) or a node type's `resources`.
GATEWAY_RESOURCE = "peernet_gateway"
# What PEERNET_GATEWAY_PLACEMENT may say.
GATEWAY_PLACEMENTS = ("spread", "every_node")


# The longest producer linger the gateway takes (PEERNET_GATEWAY_LINGER_MS), in ms.
MAX_GATEWAY_LINGER_MS = 50


# Environment variable -> (section, field). The one table of every PEERNET_* variable.
ENV_VARS: dict[str, tuple[str, str]] = {
    "PEERNET_KAFKA_BOOTSTRAP": ("services", "kafka_bootstrap"),
    "PEERNET_REDIS_URL": ("services", "redis_url"),
    "PEERNET_MONGO_URL": ("services", "mongo_url"),
    "PEERNET_MONGO_DB": ("services", "mongo_db"),
    "PEERNET_KAFKA_FAIL_FAST_MS": ("services", "kafka_fail_fast_ms"),
    "PEERNET_KAFKA_COMMIT_INTERVAL_MS": ("services", "kafka_commit_interval_ms"),
    "PEERNET_KAFKA_SECURITY_PROTOCOL": ("services", "kafka_security_protocol"),
    "PEERNET_KAFKA_SSL_CAFILE": ("services", "kafka_ssl_cafile"),
    "PEERNET_KAFKA_SSL_CERTFILE": ("services", "kafka_ssl_certfile"),
    "PEERNET_KAFKA_SSL_KEYFILE": ("services", "kafka_ssl_keyfile"),
    "PEERNET_EVENTS_TOPIC": ("topics", "events"),
    "PEERNET_EVENTS_PARTITIONS": ("topics", "events_partitions"),
    "PEERNET_MESSAGES_TOPIC": ("topics", "messages"),
    "PEERNET_MESSAGES_PARTITIONS": ("topics", "messages_partitions"),
    "PEERNET_INBOX_TOPIC": ("topics", "inbox"),
    "PEERNET_INBOX_PARTITIONS": ("topics", "inbox_partitions"),
    "PEERNET_KAFKA_REPLICATION": ("topics", "replication_factor"),
    "PEERNET_HOME": ("stack", "home"),
    "PEERNET_KAFKA_VERSION": ("stack", "kafka_version"),
    "PEERNET_KAFKA_HEAP_MB": ("stack", "kafka_heap_mb"),
    "PEERNET_STACK_REDIS_PORT": ("stack", "redis_port"),
    "PEERNET_STACK_KAFKA_PORT": ("stack", "kafka_port"),
    "PEERNET_STACK_KAFKA_CONTROLLER_PORT": ("stack", "kafka_controller_port"),
    "PEERNET_STACK_MONGO_PORT": ("stack", "mongo_port"),
    "PEERNET_HOST": ("gateway", "host"),
    "PEERNET_PORT": ("gateway", "port"),
    "PEERNET_REPLICAS": ("gateway", "replicas"),
    "PEERNET_INGRESS": ("gateway", "ingress"),
    "PEERNET_LOG_FORMAT": ("logs", "format"),
    "PEERNET_LOG_LEVEL": ("logs", "level"),
    "PEERNET_METRICS_PUBLISH_MS": ("metrics", "publish_ms"),
    "PEERNET_METRICS_KEYSPACE": ("metrics", "keyspace"),
    "PEERNET_PROXY_LOCATION": ("gateway", "proxy_location"),
    "PEERNET_MAX_REPLICAS_PER_NODE": ("gateway", "max_replicas_per_node"),
    "PEERNET_GATEWAY_PLACEMENT": ("gateway", "placement"),
    "PEERNET_SERVE_CONFIG": ("gateway", "serve_config"),
    "PEERNET_MAX_CONNECTIONS_PER_REPLICA": ("gateway", "max_connections_per_replica"),
    "PEERNET_CONNECTIONS_PER_NODE": ("gateway", "connections_per_node"),
    "PEERNET_MAX_CONNECTIONS_PER_ADDRESS": ("gateway", "max_connections_per_address"),
    "PEERNET_TRUSTED_PROXIES": ("gateway", "trusted_proxies"),
    "PEERNET_MAX_FRAME_BYTES": ("gateway", "max_frame_bytes"),
    "PEERNET_WS_COMPRESSION": ("gateway", "ws_compression"),
    "PEERNET_ACCESS_LOG": ("gateway", "access_log"),
    "PEERNET_MAX_BODY_CHARS": ("gateway", "max_body_chars"),
    "PEERNET_RATE_PER_S": ("gateway", "rate_per_s"),
    "PEERNET_RATE_BURST": ("gateway", "rate_burst"),
    "PEERNET_FLOOD_CLOSE_AFTER": ("gateway", "flood_close_after"),
    "PEERNET_OUTBOUND_QUEUE": ("gateway", "outbound_queue"),
    "PEERNET_HELLO_TIMEOUT_S": ("gateway", "hello_timeout_s"),
    "PEERNET_HEARTBEAT_MS": ("gateway", "heartbeat_ms"),
    "PEERNET_ACK_FLUSH_MS": ("gateway", "ack_flush_ms"),
    "PEERNET_TOKEN_SECRET": ("gateway", "token_secret"),
    "PEERNET_TOKEN_TTL_S": ("gateway", "token_ttl_s"),
    "PEERNET_DEV_TOKENS": ("gateway", "dev_tokens"),
    "PEERNET_DIRECT_ENDPOINTS": ("gateway", "direct_endpoints"),
    "PEERNET_CID_TTL_S": ("gateway", "cid_ttl_s"),
    "PEERNET_GATEWAY_LINGER_MS": ("gateway", "kafka_linger_ms"),
    "PEERNET_MAX_WATCH": ("gateway", "max_watch"),
    "PEERNET_SESSION_SHARDS": ("shards", "session_shards"),
    "PEERNET_FEED_SHARDS": ("shards", "feed_shards"),
    "PEERNET_PRESENCE_SHARDS": ("shards", "presence_shards"),
    "PEERNET_INBOX_RETENTION_ITEMS": ("shards", "inbox_retention_items"),
    "PEERNET_INBOX_RETENTION_MS": ("shards", "inbox_retention_ms"),
    "PEERNET_CONVERSATION_INDEX_KEEP": ("shards", "conversation_index_keep"),
    "PEERNET_MAX_BATCH": ("shards", "max_batch"),
    "PEERNET_PROJECTOR_LINGER_MS": ("shards", "projector_linger_ms"),
    "PEERNET_FEED_LINGER_MS": ("shards", "feed_linger_ms"),
    "PEERNET_PRESENCE_LEASE_MS": ("presence", "lease_ms"),
    "PEERNET_PRESENCE_LAST_SEEN_TTL_S": ("presence", "last_seen_ttl_s"),
    "PEERNET_PRESENCE_KEYSPACE": ("presence", "keyspace"),
    "PEERNET_PRESENCE_REPORT_GAP_MS": ("presence", "report_gap_ms"),
    "PEERNET_FEED_CAP": ("feeds", "cap"),
    "PEERNET_CELEBRITY_THRESHOLD": ("feeds", "celebrity_threshold"),
    "PEERNET_FEED_KEYSPACE": ("feeds", "keyspace"),
    "PEERNET_RAY_ADDRESS": ("ray", "address"),
    "PEERNET_RAY_TMPDIR": ("ray", "tmpdir"),
    "PEERNET_RAY_AUTH_MODE": ("ray", "auth_mode"),
    "PEERNET_RAY_NUM_CPUS": ("ray", "num_cpus"),
    "PEERNET_RAY_OBJECT_STORE_MB": ("ray", "object_store_mb"),
}

# What PEERNET_KAFKA_SECURITY_PROTOCOL may say (SASL is not supported).
KAFKA_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL")

_EXTERNAL_FLAGS = {
    "PEERNET_KAFKA_BOOTSTRAP": "kafka_external",
    "PEERNET_REDIS_URL": "redis_external",
    "PEERNET_MONGO_URL": "mongo_external",
}


# The longest a consumer may let records gather (PEERNET_*_LINGER_MS).
MAX_LINGER_MS = 2000


class ConfigError(ValueError):
    """A PEERNET_* variable whose value does not parse."""


def _parse(name: str, raw: str, kind: type) -> object:
    try:
        if kind is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if issubclass(kind, Path):
            return Path(raw).expanduser()
        convert: Callable[[str], object] = kind
        return convert(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a valid {kind.__name__}") from None


def load_config(env: Mapping[str, str] | None = None) -> PeerNetConfig:
    """Read the configuration from `env` (default: os.environ). Unset variables keep defaults."""
    env = os.environ if env is None else env
    base = PeerNetConfig()
    sections: dict[str, dict[str, object]] = {f.name: {} for f in fields(base)}
    for var, (section, name) in ENV_VARS.items():
        if var in env:
            current = getattr(getattr(base, section), name)
            sections[section][name] = _parse(var, env[var], type(current))
    for var, flag in _EXTERNAL_FLAGS.items():
        if env.get(var):
            sections["services"][flag] = True
    cfg = PeerNetConfig(**{
        name: type(getattr(base, name))(**{**_asdict(getattr(base, name)), **values})
        for name, values in sections.items()
    })
    # A service the local stack runs is reached on the stack's own port (and in plaintext).
    s, st = cfg.services, cfg.stack
    protocol = s.kafka_security_protocol.strip().upper()
    if protocol not in KAFKA_SECURITY_PROTOCOLS:
        raise ConfigError(f"PEERNET_KAFKA_SECURITY_PROTOCOL={s.kafka_security_protocol!r} is not "
                          f"one of {', '.join(KAFKA_SECURITY_PROTOCOLS)}")
    for var, linger in (("PEERNET_PROJECTOR_LINGER_MS", cfg.shards.projector_linger_ms),
                        ("PEERNET_FEED_LINGER_MS", cfg.shards.feed_linger_ms)):
        # A linger is how long the broker holds a fetch: it must stay well inside the
        # client's request timeout (5 s), or every quiet fetch would time out.
        if not 0 <= linger <= MAX_LINGER_MS:
            raise ConfigError(f"{var}={linger} is not between 0 and {MAX_LINGER_MS}")
    if not 0 <= cfg.gateway.kafka_linger_ms <= MAX_GATEWAY_LINGER_MS:
        # Every DM's `ok` waits up to the linger: a long one would only add latency.
        raise ConfigError(f"PEERNET_GATEWAY_LINGER_MS={cfg.gateway.kafka_linger_ms} is not between 0 "
                          f"and {MAX_GATEWAY_LINGER_MS}")
    if cfg.shards.conversation_index_keep < 1:
        raise ConfigError("PEERNET_CONVERSATION_INDEX_KEEP="
                          f"{cfg.shards.conversation_index_keep} is not 1 or more")
    if cfg.gateway.placement not in GATEWAY_PLACEMENTS:
        raise ConfigError(f"PEERNET_GATEWAY_PLACEMENT={cfg.gateway.placement!r} is not one of "
                          f"{', '.join(GATEWAY_PLACEMENTS)}")
    services = replace(
        s,
        kafka_security_protocol=protocol if s.kafka_external else "PLAINTEXT",
        kafka_bootstrap=s.kafka_bootstrap if s.kafka_external else f"127.0.0.1:{st.kafka_port}",
        redis_url=s.redis_url if s.redis_external else f"redis://127.0.0.1:{st.redis_port}/0",
        mongo_url=s.mongo_url if s.mongo_external
        else f"mongodb://127.0.0.1:{st.mongo_port}/?directConnection=true")
    return replace(cfg, services=services)


def _asdict(obj: object) -> dict[str, object]:
    return {f.name: getattr(obj, f.name) for f in fields(obj)}  # type: ignore[arg-type]


def presence_lease_ms(cfg: PeerNetConfig) -> int:
    """The presence lease in force: PEERNET_PRESENCE_LEASE_MS, or 3 x heartbeat when unset."""
    return cfg.presence.lease_ms or 3 * cfg.gateway.heartbeat_ms


def ray_tmpdir(cfg: PeerNetConfig) -> str:
    """Ray's temp dir: short enough for Ray's unix sockets (about 107 bytes in all)."""
    if cfg.ray.tmpdir:
        return cfg.ray.tmpdir
    candidate = str(cfg.stack.home / "ray")
    return candidate if len(candidate) <= 48 else "/tmp/peernet-ray"
