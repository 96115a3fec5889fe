"""The one module that serves the gateway on Ray Serve, and `peernet serve`, the main job:
Ray, the topics, the shard actors and their supervisor, and the gateway replicas."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import resource
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import ray
from ray import serve
from starlette.applications import Starlette

from actors.wiring import (
    NAMESPACE,
    PresenceShardClient,
    actor_names,
    consumer_actor_names,
    ensure_started,
    start_actors,
)
from bus.backends import backends, event_log
from bus.eventlog import ConsumerLag
from bus.topics import peernet_topics
from peernet.config import GATEWAY_RESOURCE, ConfigError, PeerNetConfig, load_config, ray_tmpdir
from peernet.logs import setup_logging
from peernet.serve_process import is_serve_command, state_file
from serve.app import build_app
from serve.deps import GatewayDeps
from serve.limits import TrustedProxies
from serve.os_limits import files_for, listen_backlog, raise_open_files
from serve.placement import ReplicaTarget, count_conflicts, gateway_nodes, wanted_replicas
from serve.serve_config import DEPLOYMENT_NAME, GatewayServeConfig, apply_env, load_serve_config
from serve.upgrade import UpgradeRecord, rolling_upgrade, save_record, update_state
from serve.ws_server import use_server_settings

log = logging.getLogger("peernet.serve")

APP_NAME = "peernet"
SUPERVISE_EVERY_S = 1.0
# One actor's answer to `lag` or `queue_depth` for /metrics; a slower one is left out of that
# scrape.
LAG_CALL_TIMEOUT_S = 1.0
# In `every_node` placement: how often `peernet serve` reads Ray's node table, and how long one
# reading and the change it leads to may take before that round counts as failed.
NODE_WATCH_EVERY_S = 2.0
NODE_WATCH_TIMEOUT_S = 30.0


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


@serve.deployment(ray_actor_options={"num_cpus": 0}, health_check_period_s=2,
                  graceful_shutdown_timeout_s=5)
@serve.ingress()
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
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a replica (tests)
            replica = f"pid{os.getpid()}"
        b = backends(cfg, client_id=f"peernet-gateway-{replica}", linger_ms=cfg.gateway.kafka_linger_ms)
        deps = GatewayDeps(cfg=cfg, log=b.log, cache=b.cache, inbox=b.inbox, pubsub=b.pubsub,
                           store=b.store, feeds=b.feeds, presence=b.presence,
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
            host = ray.util.get_node_ip_address()
        self._direct = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        return self._direct

    async def _ray_check(self) -> None:
        if not self._handles:
            self._handles = {n: ray.get_actor(n, namespace=NAMESPACE) for n in actor_names(self._cfg)}
        stats = await asyncio.gather(*(h.stats.remote() for h in self._handles.values()))
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
                    handle = self._metric_handles[name] = ray.get_actor(name, namespace=NAMESPACE)
                return name, await asyncio.wait_for(getattr(handle, method).remote(),
                                                    LAG_CALL_TIMEOUT_S)
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


def _peernet_env(cfg: PeerNetConfig) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith("PEERNET_")}
    env.setdefault("PEERNET_HOME", str(cfg.stack.home))
    return env


# Ports for HAProxy's side listeners come from below the kernel's ephemeral range (32768 and
# up on Linux) and above Ray's worker ports (10002-19999): a port the kernel hands out as free
# is also one it may give an outgoing connection before HAProxy binds it, which made HAProxy
# fail to start in CI ("cannot bind socket (Address already in use)").
_SIDE_PORTS = (23000, 32000)


def _free_port() -> int:
    return free_port_in(*_SIDE_PORTS)


def free_port_in(low: int, high: int, tries: int = 50) -> int:
    """A port in [low, high) that is free now (any free port when none of `tries` draws is)."""
    for _ in range(tries):
        port = random.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


# The listen backlog below which `peernet serve` warns (connect bursts of 1,000 a second).
MIN_BACKLOG = 1024


def _haproxy_maxconn(cfg: PeerNetConfig) -> int:
    """The replicas' connection budget, within the open-files limit: HAProxy refuses to start
    unless it may open about 2.5 files per connection (client and replica sockets, splice pipes).
    In `every_node` placement the replica count follows the nodes, and each node's HAProxy
    balances over every replica: the open-files limit alone bounds it."""
    budget = cfg.gateway.replicas * cfg.gateway.max_connections_per_replica
    files = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if files == resource.RLIM_INFINITY:
        return budget
    bound = (files - 256) * 2 // 5
    return bound if cfg.gateway.placement == "every_node" else min(budget, bound)


def ingress_env(cfg: PeerNetConfig) -> dict[str, str]:
    """Ray Serve's variables for `cfg.gateway.ingress` (see docs/architecture.md, "The ingress").

    Serve reads them when its modules load in the controller and the replicas, so they must be
    in the environment of the Ray processes: set before `ray.init`, or on every node of a
    cluster given by PEERNET_RAY_ADDRESS. A variable already set is left as it is.
    """
    mode = cfg.gateway.ingress
    if mode == "proxy":
        return {}
    if mode != "haproxy":
        raise ConfigError(f"PEERNET_INGRESS={mode!r} is not one of proxy, haproxy")
    wanted = {
        # Replicas serve their sockets themselves; HAProxy on the public port balances them.
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        # Otherwise every replica stays up 30 s after it is told to stop, and so does shutdown.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
        # A replica that restarts makes Serve reload HAProxy; the worker from before the reload
        # keeps its WebSockets until they close, but only up to this bound (120 s by default,
        # which cut every socket on the healthy replicas too). A tunnel's replica connection is
        # fixed at upgrade, so a freed replica port needs no day-long quarantine.
        "RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S": str(24 * 3600),
        "RAY_SERVE_PORT_QUARANTINE_S": "150",
        # HAProxy's manager actor took over 5 s (Serve's limit) to start on a busy machine; the
        # controller then replaced it, and `serve.start` failed on the first one's death.
        "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30",
        # HAProxy's own cap is 4,096 by default.
        "RAY_SERVE_HAPROXY_MAXCONN": str(_haproxy_maxconn(cfg)),
        # Fixed ports by default (8404, 9101, 8500): a second cluster on the machine would fail.
        "RAY_SERVE_HAPROXY_STATS_PORT": "",
        "RAY_SERVE_HAPROXY_METRICS_PORT": "",
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": "",
    }
    return {k: os.environ.get(k) or v or str(_free_port()) for k, v in wanted.items()}


# Uvicorn (the replicas' server, and the proxy's) replaces a connection's peer address with the
# X-Forwarded-For it names when the peer is loopback; Serve's HAProxy passes a client's own
# header through, so that address would be the client's choice. With no trusted host it leaves
# the peer as it is, and the app reads the header itself, trusting PEERNET_TRUSTED_PROXIES only.
ASGI_SERVER_ENV = {"FORWARDED_ALLOW_IPS": ""}

# Defaults for the replicas (a variable already set is left as it is).
# RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 runs the app on the replica's own event loop, so
# a send to a socket the server has already closed fails in the app's own `send`, where the
# connection handles it. In a thread of its own (Serve's default) the app's frames are forwarded
# later by Serve, which logs a traceback for each one the server refuses: every socket with
# frames in flight did so when a rolling upgrade stopped its replica (the server closes its
# sockets with 1012 first).
REPLICA_ENV_DEFAULTS = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}


# What Ray runs that PeerNet does not use, off; the loops it keeps, slower. Each wakes every
# Ray process (or the Serve controller) on its own timer, so an idle stack paid for them: see
# docs/benchmarks.md, "The idle stack", and its entries in docs/benchmarks-journal.md. A variable
# already set is left as it is; on a cluster started with `ray start` (cluster.yaml) the nodes
# export the same.
QUIET_RAY_ENV = {
    # No usage report to Anyscale (it would fail here anyway: no network).
    "RAY_USAGE_STATS_ENABLED": "0",
    # No OpenCensus/OpenTelemetry export from every worker to its node's agent: PeerNet's own
    # /metrics is what operators scrape.
    "RAY_enable_metrics_collection": "0",
    # Serve's replicas push their cached metrics every 100 ms by default, and the controller
    # runs its control loop every 100 ms; a second is enough for both (replica health is
    # checked on its own period, not by this loop).
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    # No idle workers started with the first driver: every PeerNet and Serve actor gets a
    # process of its own (their runtime environments differ from the driver's), so the raylet's
    # prestarted workers (one per CPU) sat idle for ever, each waking 100 times a second (the
    # core worker's signal check, 10 ms, fixed in Ray): 0.8% of a core apiece.
    "RAY_prestart_worker_first_driver": "0",
    # The log monitor (which streams workers' log files to drivers; PeerNet's drivers do not
    # read them) globbed the session's log directory every 0.1 s while it held fewer than a
    # thousand files: with the threshold at 0 it looks for new files every 5 s instead and
    # still reads the open ones every 0.1 s. The files themselves are written as before.
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
    "LOG_NAME_UPDATE_INTERVAL_S": "5",
    # The dashboard agent's reporter walks every process of the node with psutil every 5 s for
    # the dashboard and Ray's metrics, both off here: once a minute (0.40 -> 0.17% of a core on
    # a bare head with two actors).
    "REPORTER_UPDATE_INTERVAL_MS": "60000",
}


def replica_env(cfg: PeerNetConfig) -> dict[str, str]:
    """The variables Serve's processes need for `cfg`: the ingress mode's, the ASGI server's, and
    REPLICA_ENV_DEFAULTS and QUIET_RAY_ENV unless set already."""
    defaults = {k: os.environ.get(k) or v
                for k, v in {**REPLICA_ENV_DEFAULTS, **QUIET_RAY_ENV}.items()}
    return {**defaults, **ingress_env(cfg), **ASGI_SERVER_ENV}


async def _ensure_topics(cfg: PeerNetConfig) -> None:
    log_ = event_log(cfg, client_id="peernet-admin")
    await log_.ensure_topics(peernet_topics(cfg))


# Ray waits 30 s (hard-coded) for a new raylet to register; a starved machine can miss that.
RAY_START_ATTEMPTS = 3


def _init_ray(init_args: dict[str, Any]) -> Any:
    """ray.init, retried when a local head timed out during startup (the processes of the
    failed attempt are stopped first)."""
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        try:
            return ray.init(**init_args)
        except Exception as exc:
            if "timed out during startup" not in str(exc) or "address" in init_args \
                    or attempt == RAY_START_ATTEMPTS:
                raise
            print(f"peernet: ray did not start in time (attempt {attempt}); retrying", flush=True)
            ray.shutdown()
            _stop_ray_processes(str(init_args.get("_temp_dir", "")))
    raise AssertionError("unreachable")


def _stop_ray_processes(temp_dir: str) -> None:
    """Kill what a failed local start left running: the processes that name its temp dir."""
    if not temp_dir:
        return
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if temp_dir in cmdline and proc.pid != os.getpid():
            with contextlib.suppress(psutil.Error):
                proc.kill()


def replicas_per_node_limit(cfg: PeerNetConfig, nodes: int, replicas: int | None = None
                            ) -> int | None:
    """Serve's `max_replicas_per_node` for the gateway on a cluster of `nodes` live nodes, with
    at most `replicas` of them (default PEERNET_REPLICAS): the configured limit, else
    `replicas - 1` when there are two nodes or more (one node's death then leaves a replica
    serving; Ray's SPREAD placement alone once put both on one node), else none."""
    replicas = cfg.gateway.replicas if replicas is None else replicas
    if cfg.gateway.max_replicas_per_node > 0:
        return cfg.gateway.max_replicas_per_node
    if nodes >= 2 and replicas >= 2:
        return replicas - 1
    return None


async def _scale_gateway(replicas: int) -> None:
    """Set the gateway's replica count in place: Serve starts or stops replicas and leaves the
    others running. This is the controller call behind Serve's REST `scale` endpoint (its
    "external scaler", enabled for the application by `serve.run(external_scaler_enabled=True)`),
    which is served by the dashboard, and PeerNet runs without one. `serve.run` again would
    restart every replica instead: Serve gives each deploy from Python a new code version."""
    from ray.serve._private.common import DeploymentID
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    await controller.update_deployment_replicas.remote(
        DeploymentID(name=DEPLOYMENT_NAME, app_name=APP_NAME), replicas)


class GatewayNodeWatch:
    """`every_node` placement: keeps the gateway's replica count equal to the number of live Ray
    nodes carrying GATEWAY_RESOURCE (serve/placement.py decides, from a reading of the node
    table every NODE_WATCH_EVERY_S), changed in place without restarting a replica."""

    def __init__(self, replicas: int, state_path: Path) -> None:
        self.target = ReplicaTarget(replicas)
        self.state_path = state_path
        self.errors = 0  # failed rounds, each logged

    @property
    def replicas(self) -> int:
        """The count in force (what a redeploy, such as a rolling upgrade, must ask for)."""
        return self.target.current

    async def check(self) -> None:
        """Read the node table once and apply the count it calls for."""
        nodes = await asyncio.to_thread(ray.nodes)
        carrying = gateway_nodes(nodes)
        before = self.target.current
        new = self.target.observe(wanted_replicas(nodes))
        if new is None:
            return
        await _scale_gateway(new)
        self.target.applied(new)
        # Said before the state file changes: whoever sees the new count there finds the line.
        print(f"peernet: gateway replicas {before} -> {new}: {len(carrying)} live Ray node(s) "
              f"carry {GATEWAY_RESOURCE} ({', '.join(n[:8] for n in carrying) or 'none'})",
              flush=True)
        update_state(self.state_path, {"replicas": new}, tmp_suffix=".nodes.tmp")
        if not carrying:
            log.warning("no live Ray node carries %s: the gateway's one replica waits for one "
                        "(start a node with --resources='{\"%s\": 1}')",
                        GATEWAY_RESOURCE, GATEWAY_RESOURCE)

    async def run(self, every_s: float = NODE_WATCH_EVERY_S) -> None:
        """Check for ever (until cancelled). A failed round is counted and logged, and the next
        one tries again."""
        while True:
            try:
                await asyncio.wait_for(self.check(), NODE_WATCH_TIMEOUT_S)
            except Exception as exc:
                self.errors += 1
                log.warning("gateway node watch failed (%d so far): %s: %s",
                            self.errors, type(exc).__name__, exc)
            await asyncio.sleep(every_s)


def start(cfg: PeerNetConfig, serve_config: GatewayServeConfig | None = None
          ) -> tuple[dict[str, Any], dict[str, Any], Callable[[str], None],
                     GatewayNodeWatch | None]:
    """Start (or join) Ray, create the topics and actors, and deploy the gateway.

    Returns the state written to `state_file`, the actor handles (the actors live as long as
    the caller keeps them: they are owned by this driver and die with it), the function that
    deploys the gateway again with a new version (a rolling restart of its replicas), and, in
    `every_node` placement, the watch that keeps the replica count equal to the gateway nodes.
    """
    every_node = cfg.gateway.placement == "every_node"
    sc = serve_config or GatewayServeConfig(Path())  # no file: nothing from it
    conflicts = count_conflicts(sc.options) if every_node else []
    if conflicts:
        raise ConfigError(f"PEERNET_GATEWAY_PLACEMENT=every_node puts one gateway replica on "
                          f"each node carrying {GATEWAY_RESOURCE}; the Serve config file "
                          f"{sc.path} sets {', '.join(conflicts)}, which it does not take: remove "
                          "them (docs/deploy.md, \"Gateway on every node\")")
    os.environ["RAY_AUTH_MODE"] = cfg.ray.auth_mode
    TrustedProxies(cfg.gateway.trusted_proxies)  # a bad setting stops here, not in each replica
    if not cfg.ray.address:
        # Our own head: Ray, HAProxy and the replicas are this process's children and inherit
        # the limit, and HAProxy's maxconn follows it. Nodes that `ray start` joined to a
        # cluster keep their own (cluster.yaml asks for 131,072), which HAProxy on each of them
        # must carry: there the limit this process had is the one maxconn is computed from.
        node_sockets = cfg.gateway.connections_per_node
        print(raise_open_files(files_for(node_sockets)).line(node_sockets), flush=True)
    backlog = listen_backlog()
    if backlog is not None and backlog < MIN_BACKLOG:
        print(f"peernet: WARNING: the kernel caps listen backlogs at {backlog} "
              f"(net.core.somaxconn); bursts of connects beyond it are dropped and retried by "
              f"the clients' TCP: set it to {MIN_BACKLOG} or more", flush=True)
    serve_env = replica_env(cfg)
    os.environ.update(serve_env)
    env = {**_peernet_env(cfg), **serve_env}
    t0 = time.monotonic()
    asyncio.run(_ensure_topics(cfg))
    print(f"peernet: topics ready ({time.monotonic() - t0:.1f}s)", flush=True)
    init_args: dict[str, Any] = {"namespace": NAMESPACE, "runtime_env": {"env_vars": env},
                                 "logging_level": logging.WARNING, "log_to_driver": False}
    if cfg.ray.address:
        init_args["address"] = cfg.ray.address
    else:
        tmp = ray_tmpdir(cfg)
        Path(tmp).mkdir(parents=True, exist_ok=True)
        init_args.update(include_dashboard=False, _temp_dir=tmp,
                         object_store_memory=cfg.ray.object_store_mb * 1024 * 1024)
        if cfg.ray.num_cpus:
            init_args["num_cpus"] = cfg.ray.num_cpus
        if every_node:  # a head of our own takes traffic: it runs the one ingress
            init_args["resources"] = {GATEWAY_RESOURCE: 1}
    info: Any = _init_ray(init_args)
    gcs = info.address_info.get("gcs_address")
    print(f"peernet: ray ready at {gcs} "
          f"({time.monotonic() - t0:.1f}s)", flush=True)
    if every_node and not gateway_nodes(ray.nodes()):
        # serve.run would wait for ever for a replica that no node can take.
        raise ConfigError(f"PEERNET_GATEWAY_PLACEMENT=every_node, and no live Ray node carries "
                          f"the {GATEWAY_RESOURCE} resource: start the nodes that take traffic "
                          f"with `ray start --resources='{{\"{GATEWAY_RESOURCE}\": 1}}'` "
                          "(docs/deploy.md, \"Gateway on every node\")")
    started = asyncio.run(start_actors(cfg, timeout_s=120))
    handles = started.handles
    for name, result in started.results.items():
        outcome = (f"started on node {started.nodes[name][:12]}" if isinstance(result, dict)
                   else f"FAILED: {result}")
        print(f"peernet: actor {name} {outcome}", flush=True)
    if started.misplaced:
        print(f"peernet: warning: {', '.join(started.misplaced)} not on the node chosen for them "
              "(Ray's soft affinity fell back); they stay where they are", flush=True)
    serve.start(http_options={"host": cfg.gateway.host, "port": cfg.gateway.port,
                              "location": cfg.gateway.proxy_location},
                detached=False)
    ray_nodes = ray.nodes()
    nodes = sum(1 for n in ray_nodes if n.get("Alive"))
    watch: GatewayNodeWatch | None = None
    actor_resources: dict[str, Any] = {}
    if every_node:
        # Each replica takes the node's unit of the resource (so only those nodes get one), and
        # at most one per node even where a node has several units.
        replicas = wanted_replicas(ray_nodes)
        scaling = None
        per_node: int | None = 1
        actor_resources = {"resources": {GATEWAY_RESOURCE: 1}}
        watch = GatewayNodeWatch(replicas, state_file(cfg))
    else:
        replicas = sc.replicas(cfg.gateway.replicas)
        scaling = sc.autoscaling
        per_node = (sc.options.get("max_replicas_per_node")
                    or replicas_per_node_limit(cfg, nodes, sc.max_replicas(replicas)))
    options: dict[str, Any] = {
        "max_ongoing_requests": cfg.gateway.max_connections_per_replica,
        # Serve takes a fixed count or an autoscaling config, not both.
        **({} if scaling else {"num_replicas": replicas}),
        **({"max_replicas_per_node": per_node} if per_node else {}),
        **sc.options,  # the Serve config file's settings win
    }

    def deploy_gateway(version: str) -> None:
        """Deploy the gateway; a new `version` makes Serve roll the replicas one at a time (Serve
        keeps versions to itself: a changed actor environment is what makes it restart them)."""
        count = {"num_replicas": watch.replicas} if watch else {}  # the nodes' count, now
        gateway = Gateway.options(  # type: ignore[attr-defined]
            ray_actor_options={"num_cpus": 0, **actor_resources, "runtime_env": {
                "env_vars": {**env, "PEERNET_GATEWAY_VERSION": version}}},
            **{**options, **count},
        )
        serve.run(gateway.bind(), name=APP_NAME, route_prefix="/", blocking=False,
                  external_scaler_enabled=every_node)

    deploy_gateway("v0")
    url = f"http://{cfg.gateway.host}:{cfg.gateway.port}"
    state: dict[str, Any] = {"pid": os.getpid(), "url": url, "gcs_address": gcs,
             "namespace": NAMESPACE, "ingress": cfg.gateway.ingress, "started_at": time.time(),
             "startup_s": round(time.monotonic() - t0, 1),
             # What `peernet status` expects to find, whatever the environment it runs in.
             "actors": list(handles), "replicas": replicas,
             "replicas_per_node": per_node,
             "placement": cfg.gateway.placement,
             "autoscaling": scaling,
             "serve_config": str(serve_config.path) if serve_config else None}
    path = state_file(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state))
    if every_node:
        print(f"peernet: {nodes} Ray node(s), {replicas} carrying {GATEWAY_RESOURCE}; one gateway "
              f"replica on each (PEERNET_GATEWAY_PLACEMENT=every_node; the count follows those "
              f"nodes, read every {NODE_WATCH_EVERY_S:g}s)", flush=True)
        unused = [v for v in ("PEERNET_REPLICAS", "PEERNET_MAX_REPLICAS_PER_NODE") if v in os.environ]
        if unused:
            print(f"peernet: {' and '.join(unused)} not used with every_node placement", flush=True)
    else:
        print(f"peernet: {nodes} Ray node(s); gateway replicas per node: "
              f"{per_node or 'no limit'}", flush=True)
    shown = (f"{scaling.get('min_replicas', 1)} to {scaling.get('max_replicas', 1)} (autoscaled)"
             if scaling else str(replicas))
    print(f"peernet: serving on {url} with {shown} gateway replicas "
          f"behind {cfg.gateway.ingress} "
          f"(ready in {state['startup_s']}s; Ctrl-C stops)", flush=True)
    return state, handles, deploy_gateway, watch


def supervise(handles: dict[str, Any], stop: list[bool], wake: list[Any] | None = None,
              watch: GatewayNodeWatch | None = None) -> None:
    """Keep every actor's logic running: a restarted actor is started again within a second;
    and with `watch`, the gateway's replica count equal to its nodes meanwhile. Returns once
    `stop` or `wake` is not empty."""
    wake = [] if wake is None else wake

    async def loop() -> None:
        watching = asyncio.create_task(watch.run()) if watch else None
        try:
            while not stop and not wake:
                results = await ensure_started(handles, timeout_s=60)
                for name, result in results.items():
                    if not isinstance(result, dict):
                        log.warning("actor %s: %s", name, result)
                await asyncio.sleep(SUPERVISE_EVERY_S)
        finally:
            if watching:
                watching.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watching

    asyncio.run(loop())


def already_serving(cfg: PeerNetConfig) -> dict[str, Any] | None:
    """The state of a `peernet serve` of this home that is still running (its state file names a
    live process whose command line is `peernet serve`), or None. A stale file is ignored."""
    try:
        state: dict[str, Any] = json.loads(state_file(cfg).read_text())
        pid = int(state["pid"])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if pid == os.getpid() or not is_serve_command([p.decode(errors="replace") for p in cmdline]):
        return None
    return state


def run_forever(cfg: PeerNetConfig, *, dev_tokens: bool = False) -> int:
    setup_logging()
    running = already_serving(cfg)
    if running is not None:
        # `./dev up` run twice: the second finds the first and leaves it alone.
        print(f"peernet: already serving on {running.get('url')} (pid {running['pid']}, "
              f"state in {state_file(cfg)}); nothing started", flush=True)
        return 0
    if dev_tokens:
        os.environ["PEERNET_DEV_TOKENS"] = "1"
        cfg = load_config()
    serve_config = None
    if cfg.gateway.serve_config:
        serve_config = load_serve_config(Path(cfg.gateway.serve_config).expanduser())
        applied = apply_env(serve_config, os.environ)
        cfg = load_config()
        print(f"peernet: Serve config {serve_config.path}: deployment settings "
              f"{sorted(serve_config.options) or 'none'}; variables set from it: "
              f"{', '.join(applied) or 'none'}", flush=True)
    stop: list[bool] = []
    upgrades: list[float] = []

    def on_signal(signum: int, frame: Any) -> None:
        stop.append(True)

    def on_upgrade(signum: int, frame: Any) -> None:
        upgrades.append(time.time())

    _, handles, deploy_gateway, watch = start(cfg, serve_config)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_upgrade)
    number = 0
    try:
        while not stop:
            supervise(handles, stop, upgrades, watch)
            if upgrades and not stop:
                number += 1
                record = UpgradeRecord(number, upgrades[0])
                upgrades.clear()
                print(f"peernet: rolling upgrade {number} requested", flush=True)
                rolling_upgrade(handles, deploy_gateway, record,
                                lambda r: save_record(state_file(cfg), r))
                outcome = "done" if record.ok else f"FAILED: {record.error}"
                print(f"peernet: rolling upgrade {number} {outcome} in {record.took_s} s",
                      flush=True)
    finally:
        print("peernet: shutting down", flush=True)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            state_file(cfg).unlink(missing_ok=True)
    return 0


__all__ = ["Gateway", "run_forever", "start", "supervise"]
