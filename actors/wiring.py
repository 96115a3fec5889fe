"""The one module that wraps PeerNet's actor logic in Ray: names, options, placement, and the
supervisor that (re)starts the logic inside restarted actors.

Each actor builds its own backends from the PEERNET_* environment (connections do not travel
between processes) and starts its logic on the first `ensure_started` call; the supervisor calls
it every second, so an actor that Ray restarted after a crash is running again within a second
of coming back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import ray
from ray.actor import ActorHandle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.feed import FeedShard
from actors.presence import LeaseTiming, PresenceShard
from actors.projector import Projector
from actors.session import SessionShard
from bus.backends import Backends, backends, presence_store
from bus.redis import RedisPubSub
from peernet.config import PeerNetConfig, load_config, presence_lease_ms
from peernet.logs import setup_logging

NAMESPACE = "peernet"
PROJECTOR_NAME = "projector"

log = logging.getLogger("peernet.wiring")


def session_shard_name(index: int, count: int) -> str:
    return f"session-shard-{index}-of-{count}"


def feed_shard_name(index: int, count: int) -> str:
    return f"feed-shard-{index}-of-{count}"


def _feed_shard_names(cfg: PeerNetConfig) -> list[str]:
    return [feed_shard_name(i, cfg.shards.feed_shards) for i in range(cfg.shards.feed_shards)]


def presence_shard_name(index: int, count: int) -> str:
    return f"presence-shard-{index}-of-{count}"


def _setup_logging() -> None:
    setup_logging()


# Actors restart for ever after a crash or a kill (state is rebuilt from the log and Redis), and
# take no CPU reservation: they are I/O-bound and the machine is shared with the services.
# Placement: `create_actors` pins each actor softly to a node (`place_on_nodes`), so that the
# shards of a kind are on different nodes where there are several and one node's loss takes as
# few users' shards as possible; a restart after its node died goes to any node left.
_ACTOR_OPTIONS: dict[str, Any] = {"num_cpus": 0, "max_restarts": -1, "max_task_retries": -1,
                                  "scheduling_strategy": "SPREAD"}


@ray.remote(**_ACTOR_OPTIONS)
class SessionShardActor:
    def __init__(self, index: int, count: int) -> None:
        _setup_logging()
        self._index = index
        self._count = count
        self._lock = asyncio.Lock()
        self._backends: Backends | None = None
        self._shard: SessionShard | None = None

    async def ensure_started(self) -> dict[str, Any]:
        async with self._lock:
            if self._shard is None:
                cfg = load_config()
                b = backends(cfg, client_id=f"peernet-{session_shard_name(self._index, self._count)}")
                await b.start()
                shard = SessionShard(self._index, self._count, cfg, b.log, b.inbox, b.pubsub)
                await shard.start()
                self._backends, self._shard = b, shard
        return asdict(self._shard.stats)

    async def stats(self) -> dict[str, Any]:
        return asdict(self._shard.stats) if self._shard else {"started": False}

    async def lag(self) -> list[dict[str, Any]]:
        """Its consumers' lag (bus.eventlog.ConsumerLag as dicts), for the gateways' /metrics."""
        return [asdict(lag) for lag in await self._shard.lag()] if self._shard else []

    async def queue_depth(self) -> int:
        """Records fetched and not yet handled (SessionShard.queue_depth), for /metrics."""
        return self._shard.queue_depth() if self._shard else 0

    async def ping(self) -> str:
        return "pong"


@ray.remote(**_ACTOR_OPTIONS)
class ProjectorActor:
    def __init__(self) -> None:
        _setup_logging()
        self._lock = asyncio.Lock()
        self._projector: Projector | None = None

    async def ensure_started(self) -> dict[str, Any]:
        async with self._lock:
            if self._projector is None:
                cfg = load_config()
                b = backends(cfg, client_id="peernet-projector")
                await b.start()
                projector = Projector(cfg, b.log, b.store)
                await projector.start()
                self._projector = projector
        return asdict(self._projector.stats)

    async def stats(self) -> dict[str, Any]:
        return asdict(self._projector.stats) if self._projector else {"started": False}

    async def lag(self) -> list[dict[str, Any]]:
        """Its consumers' lag (bus.eventlog.ConsumerLag as dicts), for the gateways' /metrics."""
        return [asdict(lag) for lag in await self._projector.lag()] if self._projector else []

    async def queue_depth(self) -> int:
        """Records fetched and not yet handled (Projector.queue_depth), for /metrics."""
        return self._projector.queue_depth() if self._projector else 0

    async def ping(self) -> str:
        return "pong"


@ray.remote(**_ACTOR_OPTIONS)
class PresenceShardActor:
    """Hosts one PresenceShard. Reports start the shard themselves: a report that Ray retries
    into a restarted actor must not wait for the supervisor."""

    def __init__(self, index: int, count: int) -> None:
        _setup_logging()
        self._index = index
        self._count = count
        self._lock = asyncio.Lock()
        self._shard: PresenceShard | None = None

    async def _started(self) -> PresenceShard:
        async with self._lock:
            if self._shard is None:
                cfg = load_config()
                pubsub = RedisPubSub(cfg.services.redis_url)
                await pubsub.start()
                shard = PresenceShard(self._index, self._count, presence_store(cfg), pubsub,
                                      LeaseTiming(presence_lease_ms(cfg)))
                await shard.start()
                self._shard = shard
        return self._shard

    async def ensure_started(self) -> dict[str, Any]:
        return asdict((await self._started()).stats)

    async def update(self, replica: str, seq: int, online: list[str], offline: list[str]) -> None:
        await (await self._started()).update(replica, seq, online, offline)

    async def sync(self, replica: str, seq: int, users: list[str]) -> None:
        await (await self._started()).sync(replica, seq, users)

    async def stats(self) -> dict[str, Any]:
        return asdict(self._shard.stats) if self._shard else {"started": False}

    async def queue_depth(self) -> int:
        """Reports received and not yet finished (PresenceShard.queue_depth), for /metrics."""
        return self._shard.queue_depth() if self._shard else 0

    async def ping(self) -> str:
        return "pong"


class PresenceShardClient:
    """The presence shard actors as a gateway replica calls them (serve/presence.py's
    PresenceShards), found by name on first use."""

    def __init__(self, cfg: PeerNetConfig, *, call_timeout_s: float = 10.0) -> None:
        self.count = cfg.shards.presence_shards
        self._timeout_s = call_timeout_s
        self._handles: dict[int, ActorHandle] = {}

    def _handle(self, shard: int) -> ActorHandle:
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = ray.get_actor(presence_shard_name(shard, self.count),
                                                          namespace=NAMESPACE)
        return handle

    async def _call(self, shard: int, method: str, *args: Any) -> None:
        try:
            ref = getattr(self._handle(shard), method).remote(*args)
            await asyncio.wait_for(ref, self._timeout_s)
        except BaseException:
            self._handles.pop(shard, None)  # looked up again: the actor may have been recreated
            raise

    async def update(self, shard: int, replica: str, seq: int, online: list[str],
                     offline: list[str]) -> None:
        await self._call(shard, "update", replica, seq, online, offline)

    async def sync(self, shard: int, replica: str, seq: int, users: list[str]) -> None:
        await self._call(shard, "sync", replica, seq, users)


@ray.remote(**_ACTOR_OPTIONS)
class FeedShardActor:
    """Hosts one FeedShard, a member of the feeds consumer group."""

    def __init__(self, index: int, count: int) -> None:
        _setup_logging()
        self._index = index
        self._count = count
        self._lock = asyncio.Lock()
        self._shard: FeedShard | None = None

    async def ensure_started(self) -> dict[str, Any]:
        async with self._lock:
            if self._shard is None:
                cfg = load_config()
                b = backends(cfg, client_id=f"peernet-{feed_shard_name(self._index, self._count)}")
                await b.log.start()
                shard = FeedShard(self._index, self._count, cfg, b.log, b.feeds)
                await shard.start()
                self._shard = shard
        return asdict(self._shard.stats)

    async def stats(self) -> dict[str, Any]:
        return asdict(self._shard.stats) if self._shard else {"started": False}

    async def lag(self) -> list[dict[str, Any]]:
        """Its consumers' lag (bus.eventlog.ConsumerLag as dicts), for the gateways' /metrics."""
        return [asdict(lag) for lag in await self._shard.lag()] if self._shard else []

    async def queue_depth(self) -> int:
        """Records fetched and not yet handled (FeedShard.queue_depth), for /metrics."""
        return self._shard.queue_depth() if self._shard else 0

    async def ping(self) -> str:
        return "pong"


def actor_names(cfg: PeerNetConfig) -> list[str]:
    """Every named actor of PeerNet: the shards of each kind and the projector (each answers
    `queue_depth`)."""
    n = cfg.shards.session_shards
    p = cfg.shards.presence_shards
    return ([session_shard_name(i, n) for i in range(n)]
            + [presence_shard_name(i, p) for i in range(p)] + _feed_shard_names(cfg) + [PROJECTOR_NAME])


def consumer_actor_names(cfg: PeerNetConfig) -> list[str]:
    """The actors that read the events topic in a consumer group (and answer `lag`)."""
    n = cfg.shards.session_shards
    return [session_shard_name(i, n) for i in range(n)] + _feed_shard_names(cfg) + [PROJECTOR_NAME]


def place_on_nodes(names: Sequence[str], nodes: Sequence[str]) -> dict[str, str]:
    """Actor name -> node id, round robin over `nodes` in the order of `names`: with each kind's
    shards named one after another, a kind of k shards is on min(k, len(nodes)) nodes, and no
    node holds more than one actor above any other. Deterministic, unlike Ray's SPREAD, which
    decides from the scheduling raylet's view of the cluster: on a busy CI machine it put six of
    seven actors (both session shards and both feed shards) on one node of two."""
    if not nodes:
        return {}
    return {name: nodes[i % len(nodes)] for i, name in enumerate(names)}


def live_nodes() -> list[str]:
    """The ids of the Ray nodes alive now, in a stable order."""
    return sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))


def create_actors(cfg: PeerNetConfig) -> dict[str, ActorHandle]:
    """Create (or find) every named actor of PeerNet, each pinned softly to a node chosen by
    `place_on_nodes` over the live nodes (soft: a restart after that node died goes to another).
    An actor that exists already stays where it is."""
    n, p, f = cfg.shards.session_shards, cfg.shards.presence_shards, cfg.shards.feed_shards
    wanted: list[tuple[str, Any, tuple[int, ...]]] = [
        *((session_shard_name(i, n), SessionShardActor, (i, n)) for i in range(n)),
        *((presence_shard_name(i, p), PresenceShardActor, (i, p)) for i in range(p)),
        *((feed_shard_name(i, f), FeedShardActor, (i, f)) for i in range(f)),
        (PROJECTOR_NAME, ProjectorActor, ()),
    ]
    placement = place_on_nodes([name for name, _, _ in wanted], live_nodes())
    handles: dict[str, ActorHandle] = {}
    for name, actor_class, args in wanted:
        node = placement.get(name)
        strategy: Any = ("SPREAD" if node is None
                         else NodeAffinitySchedulingStrategy(node_id=node, soft=True))
        handles[name] = actor_class.options(
            name=name, namespace=NAMESPACE, get_if_exists=True,
            scheduling_strategy=strategy).remote(*args)
    return handles


def lookup_actors(cfg: PeerNetConfig) -> dict[str, ActorHandle]:
    return {name: ray.get_actor(name, namespace=NAMESPACE) for name in actor_names(cfg)}


async def ensure_started(handles: dict[str, ActorHandle], timeout_s: float) -> dict[str, Any]:
    """Call ensure_started on every actor; the answer (stats) or the failure, per actor."""

    async def one(name: str, handle: ActorHandle) -> Any:
        try:
            return await asyncio.wait_for(handle.ensure_started.remote(), timeout_s)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"[:300]

    names = list(handles)
    results = await asyncio.gather(*(one(n, handles[n]) for n in names))
    return dict(zip(names, results, strict=True))
