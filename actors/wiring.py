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
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import ray
import ray._private.state as ray_state
from ray.actor import ActorHandle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.feed import FeedShard
from actors.presence import LeaseTiming, PresenceShard
from actors.projector import Projector
from actors.session import SessionShard
from bus.backends import Backends, backends, presence_store
from bus.eventlog import ConsumerLag
from bus.pubsub_redis import RedisPubSub
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


class HostedLogic(Protocol):
    """A piece of actor logic as its actor hosts it: SessionShard, FeedShard, PresenceShard,
    Projector.

    `start` is called once per actor process, by the first `ensure_started` (the supervisor
    calls it every second) or, for a presence shard, the first report; a `start` that raises is
    tried again, on new backends, at the next such call. The logic then runs until its process
    dies, and Ray's restart starts it afresh from the log and Redis: an actor never calls `stop`
    (its other host, the unit tests, does). `stats` is a dataclass, read at
    any time, before `start` too; `queue_depth` counts the work received and not yet finished (0
    before `start`), for the gateways' /metrics."""

    @property
    def stats(self) -> Any: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def queue_depth(self) -> int: ...


@runtime_checkable
class Consumer(Protocol):
    """Logic that reads the log in a consumer group (all but the presence shards)."""

    async def lag(self) -> list[ConsumerLag]:
        """How far its consumers trail their topics (empty before `start`)."""
        ...


L = TypeVar("L", bound=HostedLogic)


@dataclass(frozen=True)
class Built(Generic[L]):
    logic: L
    # Backends started for the logic and kept as long as it (it may hold only some of them).
    backends: Backends | None = None


# Builds an actor's logic, not yet started, from the configuration and the actor's shard index
# and shard count (the projector has neither: 0 of 1).
LogicBuilder = Callable[[PeerNetConfig, int, int], Awaitable[Built[Any]]]


async def build_session_shard(cfg: PeerNetConfig, index: int, count: int) -> Built[SessionShard]:
    b = backends(cfg, client_id=f"peernet-{session_shard_name(index, count)}")
    await b.start()
    return Built(SessionShard(index, count, cfg, b.log, b.inbox, b.pubsub), b)


async def build_projector(cfg: PeerNetConfig, index: int, count: int) -> Built[Projector]:
    b = backends(cfg, client_id="peernet-projector")
    await b.start()
    return Built(Projector(cfg, b.log, b.store), b)


async def build_feed_shard(cfg: PeerNetConfig, index: int, count: int) -> Built[FeedShard]:
    b = backends(cfg, client_id=f"peernet-{feed_shard_name(index, count)}")
    await b.log.start()  # the feed store has no start: its Redis client connects on use
    return Built(FeedShard(index, count, cfg, b.log, b.feeds), b)


async def build_presence_shard(cfg: PeerNetConfig, index: int, count: int) -> Built[PresenceShard]:
    pubsub = RedisPubSub(cfg.services.redis_url)
    await pubsub.start()
    return Built(PresenceShard(index, count, presence_store(cfg), pubsub,
                               LeaseTiming(presence_lease_ms(cfg))))


class LogicActor(Generic[L]):
    """The body of every PeerNet actor: hosts one piece of logic (HostedLogic), built by its
    kind's `build` from the PEERNET_* environment (connections do not travel between processes)
    and started on first use. Each kind is a subclass naming its builder, wrapped by `ray.remote`
    under its own name (`_remote`), so that a worker's process title says which actor it is
    (`ray::SessionShardActor`: bench/probe.py and the chaos harness tell them apart by it)."""

    build: LogicBuilder

    def __init__(self, index: int = 0, count: int = 1) -> None:
        _setup_logging()
        self._index = index
        self._count = count
        self._lock = asyncio.Lock()
        self._built: Built[L] | None = None

    async def _started(self) -> L:
        async with self._lock:
            if self._built is None:
                built = await type(self).build(load_config(), self._index, self._count)
                await built.logic.start()
                self._built = built
        return self._built.logic

    @property
    def _logic(self) -> L | None:
        return self._built.logic if self._built is not None else None

    async def ensure_started(self) -> dict[str, Any]:
        """Start the logic if it is not running yet; its stats."""
        return asdict((await self._started()).stats)

    async def stats(self) -> dict[str, Any]:
        logic = self._logic
        return asdict(logic.stats) if logic is not None else {"started": False}

    async def lag(self) -> list[dict[str, Any]]:
        """Its consumers' lag (bus.eventlog.ConsumerLag as dicts), for the gateways' /metrics;
        empty for logic that is no consumer."""
        logic = self._logic
        if not isinstance(logic, Consumer):
            return []
        return [asdict(lag) for lag in await logic.lag()]

    async def queue_depth(self) -> int:
        """Work received and not yet handled (the logic's queue_depth), for /metrics."""
        logic = self._logic
        return logic.queue_depth() if logic is not None else 0

    async def ping(self) -> str:
        return "pong"

    async def node(self) -> str:
        return str(ray.get_runtime_context().get_node_id())


class PresenceShardHost(LogicActor[PresenceShard]):
    """A PresenceShard's actor, which takes the gateways' reports. Reports start the shard
    themselves: a report that Ray retries into a restarted actor must not wait for the
    supervisor."""

    async def update(self, replica: str, seq: int, online: list[str], offline: list[str]) -> None:
        await (await self._started()).update(replica, seq, online, offline)

    async def sync(self, replica: str, seq: int, users: list[str]) -> None:
        await (await self._started()).sync(replica, seq, users)


def _remote(name: str, build: LogicBuilder, host: type[LogicActor[Any]] = LogicActor) -> Any:
    """The Ray actor class `name`: `host` with `build` as its builder."""
    cls = type(name, (host,), {"build": staticmethod(build), "__module__": __name__,
                               "__qualname__": name})
    return ray.remote(**_ACTOR_OPTIONS)(cls)


SessionShardActor = _remote("SessionShardActor", build_session_shard)
ProjectorActor = _remote("ProjectorActor", build_projector)
PresenceShardActor = _remote("PresenceShardActor", build_presence_shard, PresenceShardHost)
# A member of the feeds consumer group.
FeedShardActor = _remote("FeedShardActor", build_feed_shard)


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


# How long `schedulable_nodes` waits for a node that has just joined to reach the scheduler.
SCHEDULER_VIEW_WAIT_S = 15.0


def schedulable_nodes(wait_s: float = SCHEDULER_VIEW_WAIT_S) -> list[str]:
    """The live nodes that the scheduler's view of the cluster holds, waiting up to `wait_s` for
    all of them. A node that has just joined is in the node table a moment before the GCS
    scheduler knows its resources, and a soft affinity to a node it does not know falls back to
    another node (seen on CI: a worker started just before `peernet serve` got one actor of the
    three placed on it). A node still unknown after the wait is left out of the placement."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = live_nodes()
        known = set(ray_state.state.total_resources_per_node())
        if set(alive) <= known:
            return alive
        if time.monotonic() >= deadline:
            missing = sorted(set(alive) - known)
            log.warning("placement: node(s) %s not yet known to the scheduler after %.0f s; "
                        "placing the actors on the others", missing, wait_s)
            return [n for n in alive if n in known] or alive
        time.sleep(0.2)


def _wanted(cfg: PeerNetConfig) -> list[tuple[str, Any, tuple[int, ...]]]:
    """Every named actor of PeerNet: its name, class and constructor arguments, each kind's
    shards one after another (the order `place_on_nodes` spreads)."""
    n, p, f = cfg.shards.session_shards, cfg.shards.presence_shards, cfg.shards.feed_shards
    return [
        *((session_shard_name(i, n), SessionShardActor, (i, n)) for i in range(n)),
        *((presence_shard_name(i, p), PresenceShardActor, (i, p)) for i in range(p)),
        *((feed_shard_name(i, f), FeedShardActor, (i, f)) for i in range(f)),
        (PROJECTOR_NAME, ProjectorActor, ()),
    ]


def _exists(name: str) -> bool:
    try:
        ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return False
    return True


def create_actors(cfg: PeerNetConfig, placement: dict[str, str],
                  only: Sequence[str] | None = None) -> dict[str, ActorHandle]:
    """Create (or find) the named actors of PeerNet (`only` those, if given), each pinned softly
    to its node in `placement` (soft: a restart after that node died goes to another). An actor
    that exists already stays where it is."""
    handles: dict[str, ActorHandle] = {}
    for name, actor_class, args in _wanted(cfg):
        if only is not None and name not in only:
            continue
        node = placement.get(name)
        strategy: Any = ("SPREAD" if node is None
                         else NodeAffinitySchedulingStrategy(node_id=node, soft=True))
        handles[name] = actor_class.options(
            name=name, namespace=NAMESPACE, get_if_exists=True,
            scheduling_strategy=strategy).remote(*args)
    return handles


@dataclass(frozen=True)
class StartedActors:
    handles: dict[str, ActorHandle]
    # ensure_started's answer (the actor's stats) or why it failed, per actor.
    results: dict[str, Any]
    # The id of the node each actor runs on, or why it did not say.
    nodes: dict[str, str]
    # Actors this start created on another node than `place_on_nodes` chose, though that node
    # was alive (after the one attempt to place them again).
    misplaced: list[str]


async def _kill_and_free(handle: ActorHandle, name: str, timeout_s: float) -> None:
    ray.kill(handle, no_restart=True)
    for _ in range(int(timeout_s / 0.1)):  # until Ray has freed the name
        if not _exists(name):
            return
        await asyncio.sleep(0.1)


async def start_actors(cfg: PeerNetConfig, timeout_s: float) -> StartedActors:
    """Create every named actor on the nodes `place_on_nodes` chooses and start it. An actor
    this start created elsewhere than on its chosen node while that node is alive (a soft
    affinity falls back when the scheduling raylet does not yet know a node that has just
    joined: seen on CI, one actor of three on the new node) is stopped and created once more;
    actors found running stay where they are."""
    placement = place_on_nodes([name for name, _, _ in _wanted(cfg)], schedulable_nodes())
    fresh = {name for name, _, _ in _wanted(cfg) if not _exists(name)}
    handles = create_actors(cfg, placement)
    results = await ensure_started(handles, timeout_s)
    nodes = await actor_nodes(handles, timeout_s)

    def off(names: set[str]) -> list[str]:
        alive = set(live_nodes())
        return sorted(n for n in names if placement.get(n) in alive and nodes[n] != placement[n]
                      and isinstance(results[n], dict))

    again = off(fresh)
    if again:
        log.warning("placement: %s started off their chosen nodes; placing them again", again)
        await asyncio.gather(*(_kill_and_free(handles[n], n, timeout_s) for n in again))
        handles.update(create_actors(cfg, placement, only=again))
        redone = {n: handles[n] for n in again}
        results.update(await ensure_started(redone, timeout_s))
        nodes.update(await actor_nodes(redone, timeout_s))
    misplaced = off(set(again))
    if misplaced:
        log.warning("placement: %s still off their chosen nodes", misplaced)
    return StartedActors(handles, results, nodes, misplaced)


async def actor_nodes(handles: dict[str, ActorHandle], timeout_s: float) -> dict[str, str]:
    """The node each actor runs on (its id), or why it did not answer, per actor."""

    async def one(handle: ActorHandle) -> str:
        try:
            return str(await asyncio.wait_for(handle.node.remote(), timeout_s))
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"[:200]

    names = list(handles)
    return dict(zip(names, await asyncio.gather(*(one(handles[n]) for n in names)), strict=True))


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
