"""`peernet serve`, the main job: Ray started (or joined) in the environment serve/ray_env.py
gives it, the topics, the shard actors and their supervisor, the gateway (serve/gateway.py)
deployed on Serve, the node watch of `every_node` placement (serve/node_watch.py), and the state
file that `peernet status` and `peernet upgrade` read. Ray and Serve are called through
serve/ray_cluster.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.wiring import NAMESPACE, ensure_started, start_actors
from bus.backends import event_log
from bus.topics import peernet_topics
from peernet.config import GATEWAY_RESOURCE, ConfigError, PeerNetConfig, load_config, ray_tmpdir
from peernet.logs import setup_logging
from peernet.serve_process import is_serve_command, state_file
from serve.gateway import Gateway
from serve.limits import TrustedProxies
from serve.node_watch import NODE_WATCH_EVERY_S, GatewayNodeWatch, replicas_per_node_limit
from serve.os_limits import files_for, listen_backlog, raise_open_files
from serve.placement import count_conflicts, gateway_nodes, wanted_replicas
from serve.ray_cluster import (
    node_table,
    run_application,
    start_driver,
    start_serve,
    stop_serve_and_driver,
)
from serve.ray_env import MIN_BACKLOG, peernet_env, replica_env
from serve.serve_config import APP_NAME, GatewayServeConfig, apply_env, load_serve_config
from serve.upgrade import UpgradeRecord, rolling_upgrade, save_record

log = logging.getLogger("peernet.serve")

SUPERVISE_EVERY_S = 1.0


async def _ensure_topics(cfg: PeerNetConfig) -> None:
    log_ = event_log(cfg, client_id="peernet-admin")
    await log_.ensure_topics(peernet_topics(cfg))


def _check_host(cfg: PeerNetConfig, sc: GatewayServeConfig, every_node: bool) -> None:
    """Refuse a configuration that cannot start, and raise or warn about this host's limits,
    before anything is started."""
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


def _ray_init_args(cfg: PeerNetConfig, env: dict[str, str], every_node: bool) -> dict[str, Any]:
    """`ray.init`'s arguments: join PEERNET_RAY_ADDRESS, or start a head of our own."""
    init_args: dict[str, Any] = {"namespace": NAMESPACE, "runtime_env": {"env_vars": env},
                                 "logging_level": logging.WARNING, "log_to_driver": False}
    if cfg.ray.address:
        init_args["address"] = cfg.ray.address
        return init_args
    tmp = ray_tmpdir(cfg)
    Path(tmp).mkdir(parents=True, exist_ok=True)
    init_args.update(include_dashboard=False, _temp_dir=tmp,
                     object_store_memory=cfg.ray.object_store_mb * 1024 * 1024)
    if cfg.ray.num_cpus:
        init_args["num_cpus"] = cfg.ray.num_cpus
    if every_node:  # a head of our own takes traffic: it runs the one ingress
        init_args["resources"] = {GATEWAY_RESOURCE: 1}
    return init_args


def _start_shards(cfg: PeerNetConfig) -> dict[str, Any]:
    """Create and start the shard actors, and say where each runs; their handles."""
    started = asyncio.run(start_actors(cfg, timeout_s=120))
    for name, result in started.results.items():
        outcome = (f"started on node {started.nodes[name][:12]}" if isinstance(result, dict)
                   else f"FAILED: {result}")
        print(f"peernet: actor {name} {outcome}", flush=True)
    if started.misplaced:
        print(f"peernet: warning: {', '.join(started.misplaced)} not on the node chosen for them "
              "(Ray's soft affinity fell back); they stay where they are", flush=True)
    return started.handles


@dataclass(frozen=True)
class _GatewayPlan:
    """How many gateway replicas, where, and with which Serve options."""

    replicas: int
    scaling: dict[str, Any] | None
    per_node: int | None
    actor_resources: dict[str, Any]
    options: dict[str, Any]
    nodes: int  # live Ray nodes now
    watch: GatewayNodeWatch | None


def _plan_gateway(cfg: PeerNetConfig, sc: GatewayServeConfig, every_node: bool) -> _GatewayPlan:
    ray_nodes = node_table()
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
        "logging_config": {"enable_access_log": cfg.gateway.access_log},
        **sc.options,  # the Serve config file's settings win
    }
    return _GatewayPlan(replicas, scaling, per_node, actor_resources, options, nodes, watch)


def _announce(cfg: PeerNetConfig, plan: _GatewayPlan, url: str, startup_s: float,
              every_node: bool) -> None:
    if every_node:
        print(f"peernet: {plan.nodes} Ray node(s), {plan.replicas} carrying {GATEWAY_RESOURCE}; "
              f"one gateway replica on each (PEERNET_GATEWAY_PLACEMENT=every_node; the count "
              f"follows those nodes, read every {NODE_WATCH_EVERY_S:g}s)", flush=True)
        unused = [v for v in ("PEERNET_REPLICAS", "PEERNET_MAX_REPLICAS_PER_NODE") if v in os.environ]
        if unused:
            print(f"peernet: {' and '.join(unused)} not used with every_node placement", flush=True)
    else:
        print(f"peernet: {plan.nodes} Ray node(s); gateway replicas per node: "
              f"{plan.per_node or 'no limit'}", flush=True)
    scaling = plan.scaling
    shown = (f"{scaling.get('min_replicas', 1)} to {scaling.get('max_replicas', 1)} (autoscaled)"
             if scaling else str(plan.replicas))
    print(f"peernet: serving on {url} with {shown} gateway replicas "
          f"behind {cfg.gateway.ingress} "
          f"(ready in {startup_s}s; Ctrl-C stops)", flush=True)


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
    _check_host(cfg, sc, every_node)
    serve_env = replica_env(cfg)
    os.environ.update(serve_env)
    env = {**peernet_env(cfg), **serve_env}
    t0 = time.monotonic()
    asyncio.run(_ensure_topics(cfg))
    print(f"peernet: topics ready ({time.monotonic() - t0:.1f}s)", flush=True)
    gcs = start_driver(_ray_init_args(cfg, env, every_node))
    print(f"peernet: ray ready at {gcs} "
          f"({time.monotonic() - t0:.1f}s)", flush=True)
    if every_node and not gateway_nodes(node_table()):
        # serve.run would wait for ever for a replica that no node can take.
        raise ConfigError(f"PEERNET_GATEWAY_PLACEMENT=every_node, and no live Ray node carries "
                          f"the {GATEWAY_RESOURCE} resource: start the nodes that take traffic "
                          f"with `ray start --resources='{{\"{GATEWAY_RESOURCE}\": 1}}'` "
                          "(docs/deploy.md, \"Gateway on every node\")")
    handles = _start_shards(cfg)
    start_serve(cfg.gateway.host, cfg.gateway.port, cfg.gateway.proxy_location)
    plan = _plan_gateway(cfg, sc, every_node)
    watch = plan.watch

    def deploy_gateway(version: str) -> None:
        """Deploy the gateway; a new `version` makes Serve roll the replicas one at a time (Serve
        keeps versions to itself: a changed actor environment is what makes it restart them)."""
        count = {"num_replicas": watch.replicas} if watch else {}  # the nodes' count, now
        run_application(
            Gateway, name=APP_NAME,
            actor_options={"num_cpus": 0, **plan.actor_resources, "runtime_env": {
                "env_vars": {**env, "PEERNET_GATEWAY_VERSION": version}}},
            settings={**plan.options, **count}, external_scaler=every_node)

    deploy_gateway("v0")
    url = f"http://{cfg.gateway.host}:{cfg.gateway.port}"
    state: dict[str, Any] = {"pid": os.getpid(), "url": url, "gcs_address": gcs,
             "namespace": NAMESPACE, "ingress": cfg.gateway.ingress, "started_at": time.time(),
             "startup_s": round(time.monotonic() - t0, 1),
             # What `peernet status` expects to find, whatever the environment it runs in.
             "actors": list(handles), "replicas": plan.replicas,
             "replicas_per_node": plan.per_node,
             "placement": cfg.gateway.placement,
             "autoscaling": plan.scaling,
             "serve_config": str(serve_config.path) if serve_config else None}
    path = state_file(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state))
    _announce(cfg, plan, url, state["startup_s"], every_node)
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
            stop_serve_and_driver()
        finally:
            state_file(cfg).unlink(missing_ok=True)
    return 0


__all__ = ["Gateway", "run_forever", "start", "supervise"]
