"""Reads a running PeerNet for `peernet status`, changing nothing: Ray's node and actor tables
and Serve's status (attached as a read-only driver, through serve/ray_cluster.py), the gateway's
/healthz and /metrics over HTTP, and the backing services through a reader the caller passes in.
Every read is bounded."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from actors.wiring import NAMESPACE, actor_names
from peernet.config import PeerNetConfig
from peernet.status_report import (
    Gateway,
    Health,
    ServeProcess,
    Service,
    StatusReport,
    node_from_ray,
    parse_consumer_lag,
    pick_actors,
    replica_actors,
)
from serve.deployment import already_serving, state_file
from serve.ray_cluster import actor_table, attach_reader, detach, node_table, serve_status
from serve.serve_config import APP_NAME

# Threads that read for `peernet status` are named so; one still running after its deadline
# is stuck in a call that has no timeout of its own (ray.init, Serve's controller).
THREAD_PREFIX = "peernet-status-"
DEFAULT_TIMEOUT_S = 10.0
HTTP_TIMEOUT_S = 5.0
GCS_CONNECT_TIMEOUT_S = 2.0


def find_serve(cfg: PeerNetConfig, *, address: str = "",
               url: str = "") -> tuple[ServeProcess, dict[str, Any]]:
    """The `peernet serve` to report on, and its state file's contents ({} when none).

    A live state file (its pid is a running `peernet serve`) names the Ray cluster and the URL;
    `address` (--address) and `url` (--url) override them, and PEERNET_RAY_ADDRESS stands in for
    a missing file (a node of a cluster whose driver runs elsewhere: the driver is not checked)."""
    path = state_file(cfg)
    try:
        state: dict[str, Any] = json.loads(path.read_text())
        if not isinstance(state, dict):
            state = {}
    except (OSError, ValueError):
        state = {}
    live = already_serving(cfg)
    default_url = f"http://{_reachable(cfg.gateway.host)}:{cfg.gateway.port}"
    if live is not None:
        gcs = address or str(live.get("gcs_address") or "")
        served_at = _local(str(live.get("url") or default_url))
        return ServeProcess(running=True, source=str(path), url=url or served_at,
                            gcs_address=gcs, namespace=str(live.get("namespace") or NAMESPACE),
                            pid=int(live["pid"]), ingress=str(live.get("ingress") or ""),
                            started_at=_float(live.get("started_at"))), live
    gcs = address or cfg.ray.address
    if state:
        detail = f"{path} names pid {state.get('pid')}, which is not a running peernet serve"
        return ServeProcess(running=False, source=str(path), url=url or default_url, gcs_address=gcs,
                            namespace=NAMESPACE, detail=detail), {}
    if gcs:
        return ServeProcess(running=None, source="--address" if address else "PEERNET_RAY_ADDRESS",
                            url=url or default_url, gcs_address=gcs, namespace=NAMESPACE,
                            detail=f"no state file at {path}: the driver is not checked"), {}
    return ServeProcess(running=False, source=str(path), url=url or default_url, gcs_address="",
                        namespace=NAMESPACE,
                        detail=f"no state file at {path} (give --address to look at a cluster)"), {}


def _reachable(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _local(url: str) -> str:
    """A URL that names the wildcard address (the bind address) as one to connect to."""
    return url.replace("://0.0.0.0:", "://127.0.0.1:", 1)


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# --- HTTP: /healthz and /metrics ---------------------------------------------------------------


def read_health(url: str, timeout_s: float = HTTP_TIMEOUT_S) -> Health:
    reply = httpx.get(url + "/healthz", timeout=timeout_s)
    try:
        body = reply.json()
    except ValueError:
        body = {}
    checks = body.get("checks") if isinstance(body, dict) else None
    return Health(status_code=reply.status_code, status=str(body.get("status", "")) if body else "",
                  checks={str(k): str(v) for k, v in (checks or {}).items()})


def read_lag(url: str, timeout_s: float = HTTP_TIMEOUT_S) -> Any:
    reply = httpx.get(url + "/metrics", timeout=timeout_s)
    reply.raise_for_status()
    return parse_consumer_lag(reply.text)


# --- Ray: nodes, actors, Serve -----------------------------------------------------------------


def _gcs_reachable(gcs: str, timeout_s: float) -> None:
    """Fail fast on an address nothing listens on (ray.init would retry for a minute)."""
    if gcs == "auto" or gcs.startswith("ray://") or ":" not in gcs:
        return
    host, _, port = gcs.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=timeout_s):
        pass


def read_ray(report: StatusReport, cfg: PeerNetConfig, state: dict[str, Any]) -> None:
    """Nodes, shard actors and the gateway on Serve, into `report` (errors under "ray" and
    "gateway"). Attaches to the cluster as a driver and detaches; starts and changes nothing."""
    gcs = report.serve.gcs_address
    try:
        _gcs_reachable(gcs, GCS_CONNECT_TIMEOUT_S)
    except (OSError, ValueError) as exc:
        report.errors["ray"] = f"Ray at {gcs} not reachable: {exc}"
        return
    os.environ.setdefault("RAY_AUTH_MODE", cfg.ray.auth_mode)
    try:
        attach_reader(gcs, report.serve.namespace)
    except Exception as exc:
        report.errors["ray"] = f"could not attach to Ray at {gcs}: {type(exc).__name__}: {exc}"
        return
    try:
        nodes = [node_from_ray(n) for n in node_table()]
        addresses = {n.node_id: n.address for n in nodes}
        table = actor_table()
        names = [str(n) for n in state.get("actors") or actor_names(cfg)]
        report.nodes = nodes
        report.shards = pick_actors(table, names, addresses)
        try:
            report.gateway = _gateway(serve_status(), int(state.get("replicas") or cfg.gateway.replicas),
                                      replica_actors(table, APP_NAME, addresses))
        except Exception as exc:
            report.errors["gateway"] = f"Serve's status not read: {type(exc).__name__}: {exc}"
    except Exception as exc:
        report.errors["ray"] = f"Ray's tables not read: {type(exc).__name__}: {exc}"
    finally:
        detach()


def _name(value: Any) -> str:
    """Serve's statuses are enums; their value is the name Serve documents (RUNNING, ...)."""
    return str(getattr(value, "value", value))


def _gateway(status: Any, expected: int, replicas: list[Any]) -> Gateway:
    proxies: dict[str, int] = {}
    for proxy in status.proxies.values():
        proxies[_name(proxy)] = proxies.get(_name(proxy), 0) + 1
    app = status.applications.get(APP_NAME)
    if app is None:
        return Gateway(app_status="NOT_FOUND", deployment_status="NOT_FOUND", replica_states={},
                       expected_replicas=expected, replicas=replicas, proxies=proxies,
                       message=f"no Serve application {APP_NAME!r}")
    deployments = app.deployments
    deployment = deployments.get("Gateway") or next(iter(deployments.values()), None)
    if deployment is None:
        return Gateway(app_status=_name(app.status), deployment_status="NOT_FOUND",
                       replica_states={}, expected_replicas=expected, replicas=replicas,
                       proxies=proxies, message=app.message)
    states = {_name(k): int(v) for k, v in deployment.replica_states.items()}
    return Gateway(app_status=_name(app.status), deployment_status=_name(deployment.status),
                   replica_states=states, expected_replicas=expected, replicas=replicas,
                   proxies=proxies, message=deployment.message or app.message)


# --- all of it ---------------------------------------------------------------------------------


def collect(cfg: PeerNetConfig, *, address: str = "", url: str = "",
            services: Callable[[], list[Service]] | None = None,
            timeout_s: float = DEFAULT_TIMEOUT_S) -> StatusReport:
    """Read everything in parallel, each part within `timeout_s`; a part that did not answer
    in time is named in the report's errors."""
    t0 = time.monotonic()
    serve_process, state = find_serve(cfg, address=address, url=url)
    report = StatusReport(serve=serve_process)
    reached_by_http = serve_process.running is not False or bool(url)

    def health() -> None:
        try:
            report.health = read_health(serve_process.url, min(HTTP_TIMEOUT_S, timeout_s))
        except Exception as exc:
            report.errors["health"] = f"GET {serve_process.url}/healthz: {type(exc).__name__}: {exc}"

    def lag() -> None:
        try:
            report.lag = read_lag(serve_process.url, min(HTTP_TIMEOUT_S, timeout_s))
        except Exception as exc:
            report.errors["lag"] = f"GET {serve_process.url}/metrics: {type(exc).__name__}: {exc}"

    def stack() -> None:
        assert services is not None
        try:
            report.services = services()
        except Exception as exc:
            report.errors["services"] = f"{type(exc).__name__}: {exc}"

    parts: dict[str, Callable[[], None]] = {}
    if serve_process.gcs_address:
        parts["ray"] = lambda: read_ray(report, cfg, state)
    if reached_by_http:
        parts["health"] = health
        parts["lag"] = lag
    if services is not None:
        parts["services"] = stack
    threads = {name: threading.Thread(target=fn, name=THREAD_PREFIX + name, daemon=True)
               for name, fn in parts.items()}
    for thread in threads.values():
        thread.start()
    deadline = t0 + timeout_s
    for name, thread in threads.items():
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            report.errors[name] = f"no answer within {timeout_s:g}s"
    report.elapsed_s = time.monotonic() - t0
    return report


def stuck() -> bool:
    """Whether a read is still running past its deadline (the process should exit at once
    rather than wait for it)."""
    return any(t.is_alive() and t.name.startswith(THREAD_PREFIX) for t in threading.enumerate())


__all__ = ["collect", "find_serve", "read_health", "read_lag", "read_ray", "stuck"]
