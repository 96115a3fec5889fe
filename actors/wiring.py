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
from dataclasses import asdict
from typing import Any

import ray
from ray.actor import ActorHandle

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
# SPREAD: the shards of a kind go to different nodes where there are several, so that one
# node's loss takes as few users' shards as possible (a restart goes to any node left).
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

    async def lag(self) -> dict[str, Any] | None:
        """Its consumer's lag (bus.eventlog.ConsumerLag as a dict), for the gateways' /metrics."""
        lag = await self._shard.lag() if self._shard else None
        return asdict(lag) if lag else None

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

    async def lag(self) -> dict[str, Any] | None:
        """Its consumer's lag (bus.eventlog.ConsumerLag as a dict), for the gateways' /metrics."""
        lag = await self._projector.lag() if self._projector else None
        return asdict(lag) if lag else None

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

    async def lag(self) -> dict[str, Any] | None:
        """Its consumer's lag (bus.eventlog.ConsumerLag as a dict), for the gateways' /metrics."""
        lag = await self._shard.lag() if self._shard else None
        return asdict(lag) if lag else None

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


def create_actors(cfg: PeerNetConfig) -> dict[str, ActorHandle]:
    """Create (or find) every named actor of PeerNet; spread them over the nodes."""
    n = cfg.shards.session_shards
    handles: dict[str, ActorHandle] = {}
    for i in range(n):
        name = session_shard_name(i, n)
        handles[name] = SessionShardActor.options(  # type: ignore[attr-defined]
            name=name, namespace=NAMESPACE, get_if_exists=True,
            scheduling_strategy="SPREAD").remote(i, n)
    p = cfg.shards.presence_shards
    for i in range(p):
        name = presence_shard_name(i, p)
        handles[name] = PresenceShardActor.options(  # type: ignore[attr-defined]
            name=name, namespace=NAMESPACE, get_if_exists=True,
            scheduling_strategy="SPREAD").remote(i, p)
    f = cfg.shards.feed_shards
    for i in range(f):
        name = feed_shard_name(i, f)
        handles[name] = FeedShardActor.options(  # type: ignore[attr-defined]
            name=name, namespace=NAMESPACE, get_if_exists=True,
            scheduling_strategy="SPREAD").remote(i, f)
    handles[PROJECTOR_NAME] = ProjectorActor.options(  # type: ignore[attr-defined]
        name=PROJECTOR_NAME, namespace=NAMESPACE, get_if_exists=True,
        scheduling_strategy="SPREAD").remote()
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
