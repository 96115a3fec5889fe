"""The environment of the Ray processes `peernet serve` starts: PeerNet's own settings, Serve's
for the chosen ingress (HAProxy's ports and connection budget), the replicas' server, and what
Ray runs that PeerNet does not use, turned off. Read before `ray.init` (and exported by every
node of a cluster, cluster.yaml), so it imports no Ray."""

from __future__ import annotations

import os
import random
import resource
import socket

from peernet.config import ConfigError, PeerNetConfig


def peernet_env(cfg: PeerNetConfig) -> dict[str, str]:
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


def _haproxy_threads() -> int:
    """Half this node's cores, 1 to 4 (Serve's own default is 4 whatever the node). HAProxy only
    relays the sockets' bytes; with 4 threads on 2 cores it cost 0.22 ms of CPU per DM at 300/s,
    with 1 thread 0.17-0.18 (docs/benchmarks-journal.md, "One shard of each kind")."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


# The function Serve's proxy calls as it starts (`proxy` ingress); a path, since this module
# imports neither Serve nor the server.
PROXY_CALLBACK = "serve.ws_server.in_serve_proxy"


def ingress_env(cfg: PeerNetConfig) -> dict[str, str]:
    """Ray Serve's variables for `cfg.gateway.ingress` (see docs/architecture.md, "The ingress").

    Serve reads them when its modules load in the controller and the replicas, so they must be
    in the environment of the Ray processes: set before `ray.init`, or on every node of a
    cluster given by PEERNET_RAY_ADDRESS. A variable already set is left as it is.
    """
    mode = cfg.gateway.ingress
    if mode == "proxy":
        # Serve's proxy holds the sockets: its server counts WebSocket pings as the replicas'
        # does (serve/ws_server.py, ProxyHeardProtocol), set up by this callback as it starts.
        return {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH":
                os.environ.get("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH") or PROXY_CALLBACK}
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
        "RAY_SERVE_HAPROXY_NBTHREAD": str(_haproxy_threads()),
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
