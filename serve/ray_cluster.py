"""The one module of the serving side that imports Ray: every call the operator's side makes into
Ray and Serve, each behind a small function that says what it guarantees. `peernet serve`
(serve/deployment.py), the gateway's replicas (serve/gateway.py), the node watch, rolling
upgrades, `peernet status` and the Serve config check call these and import no Ray themselves
(the actors' side has its own such module, actors/wiring.py).

Actor handles pass through the other modules as opaque values: they come from actors/wiring.py or
`named_actor`, and only the functions here call them."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import psutil
import ray
from ray import serve
from ray.actor import ActorHandle

# Ray waits 30 s (hard-coded) for a new raylet to register; a starved machine can miss that.
RAY_START_ATTEMPTS = 3


# --- this process as Ray's driver --------------------------------------------------------------


def start_driver(init_args: Mapping[str, Any]) -> str | None:
    """Connect this process to Ray as its driver (`ray.init(**init_args)`: joining the cluster at
    `address`, or starting a head of its own without one); the cluster's GCS address.

    A head of our own that timed out during startup is tried again, up to RAY_START_ATTEMPTS in
    all, after the processes of the failed attempt are killed; any other failure is raised."""
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        try:
            info: Any = ray.init(**init_args)
        except Exception as exc:
            if "timed out during startup" not in str(exc) or "address" in init_args \
                    or attempt == RAY_START_ATTEMPTS:
                raise
            print(f"peernet: ray did not start in time (attempt {attempt}); retrying", flush=True)
            ray.shutdown()
            _stop_ray_processes(str(init_args.get("_temp_dir", "")))
            continue
        gcs: str | None = info.address_info.get("gcs_address")
        return gcs
    raise AssertionError("unreachable")


def _stop_ray_processes(temp_dir: str) -> None:
    """Kill what a failed local start left running: the processes that name its temp dir."""
    if not temp_dir:
        return

    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if temp_dir in cmdline and proc.pid != os.getpid():
            with contextlib.suppress(psutil.Error):
                proc.kill()


def attach_reader(address: str, namespace: str) -> None:
    """Attach this process to the running cluster at `address` as a driver that only reads:
    nothing of its workers' logs is copied here, and Ray logs warnings and worse. Raises when
    Ray cannot attach. May run off the main thread: Ray's warning that such a driver sets no
    SIGTERM handler is dropped (the reader wants none, so that it can be given up on)."""
    logging.getLogger("ray._private.worker").addFilter(
        lambda record: not record.getMessage().startswith("SIGTERM handler is not set"))
    ray.init(address=address, namespace=namespace, log_to_driver=False,
             logging_level=logging.WARNING)


def detach() -> None:
    """Disconnect this driver from Ray (stopping a head it started); the cluster it joined and
    the detached actors in it keep running."""
    ray.shutdown()


def stop_serve_and_driver() -> None:
    """Stop Serve (its controller, proxies and every application's replicas), then this driver,
    which the driver does even when stopping Serve fails."""
    try:
        serve.shutdown()
    finally:
        ray.shutdown()


# --- the cluster's tables ----------------------------------------------------------------------


def node_table() -> list[dict[str, Any]]:
    """Ray's node table, dead nodes included: one `ray.nodes()` row per node (NodeID, Alive,
    Resources, NodeManagerAddress, ...), as serve/placement.py and peernet/status_report.py
    read them. Blocks on the GCS; call it from a thread in async code."""
    return list(ray.nodes())


def actor_table() -> list[dict[str, Any]]:
    """Ray's actor table, dead actors included, as rows of the GCS. `ray.util.state` would be
    the public way, but it asks the dashboard, which PeerNet runs without; this reads the same
    table from the GCS."""
    return list(ray._private.state.actors().values())


# --- actors ------------------------------------------------------------------------------------


def named_actor(name: str, namespace: str) -> ActorHandle:
    """A handle to the live actor called `name` in `namespace`; raises ValueError when there is
    none. The handle stays valid across the actor's restarts, not across its re-creation."""
    return ray.get_actor(name, namespace=namespace)


def call(handle: ActorHandle, method: str, *args: Any) -> Awaitable[Any]:
    """Call `method` of the actor behind `handle` with `args`, now: the call is sent before this
    returns, and the awaitable gives its answer, or raises what it raised (a Ray error when the
    actor died or is restarting). Cancelling the wait does not cancel the call."""
    ref: Awaitable[Any] = getattr(handle, method).remote(*args)
    return ref


def _pid(self: Any) -> int:
    return os.getpid()


def actor_pid(handle: ActorHandle) -> Awaitable[int]:
    """The process id of the actor behind `handle` (a new one after each restart), asked like
    `call`, without a method of the actor's own."""
    ref: Awaitable[int] = handle.__ray_call__.remote(_pid)
    return ref


def kill_for_restart(handle: ActorHandle) -> None:
    """Kill the actor's process at once (no graceful exit); Ray restarts it as its
    `max_restarts` allows, with its class imported afresh, and calls meanwhile fail or wait."""
    ray.kill(handle, no_restart=False)


# --- Serve -------------------------------------------------------------------------------------


def start_serve(host: str, port: int, location: str) -> None:
    """Start Serve's controller and its HTTP proxies (`location`: Serve's proxy_location) on
    `host`:`port`, owned by this driver: they stop when it exits."""
    serve.start(http_options={"host": host, "port": port, "location": location}, detached=False)


def ingress_deployment(**settings: Any) -> Callable[[type], Any]:
    """A class decorator: the class as a Serve deployment named after it, with Serve's
    deployment `settings`, whose replicas serve the ASGI app that the class's
    `__serve_build_asgi_app__` returns (built in the replica, after the constructor)."""

    def wrap(cls: type) -> Any:
        return serve.deployment(**settings)(serve.ingress()(cls))

    return wrap


def run_application(deployment: Any, *, name: str, actor_options: dict[str, Any],
                    settings: Mapping[str, Any], external_scaler: bool) -> None:
    """Deploy `deployment` (from `ingress_deployment`) as the Serve application `name` on the
    route prefix '/', with these Ray actor options and Serve settings over its own; returns once
    Serve runs it. Deploying the same application again rolls its replicas one at a time when
    `actor_options` changed (Serve keeps code versions to itself: a changed actor environment is
    what makes it restart them). With `external_scaler`, `scale_deployment` may change its
    replica count in place."""
    app = deployment.options(ray_actor_options=actor_options, **settings)
    serve.run(app.bind(), name=name, route_prefix="/", blocking=False,
              external_scaler_enabled=external_scaler)


async def scale_deployment(app: str, deployment: str, replicas: int) -> None:
    """Set the replica count of `deployment` in the Serve application `app` (deployed with
    `external_scaler`) in place: Serve starts or stops replicas and leaves the others running.
    This is the controller call behind Serve's REST `scale` endpoint (its "external scaler"),
    which is served by the dashboard, and PeerNet runs without one. `serve.run` again would
    restart every replica instead: Serve gives each deploy from Python a new code version."""
    # Serve's private names, imported here so that a Ray that moves them breaks this call only.
    from ray.serve._private.common import DeploymentID
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    await controller.update_deployment_replicas.remote(
        DeploymentID(name=deployment, app_name=app), replicas)


def serve_status() -> Any:
    """Serve's status (`serve.status()`: its proxies, and each application's and deployment's
    status and replicas by state, as enums); asks Serve's controller, with no timeout of its
    own."""
    return serve.status()


def serve_config_fields(raw: Mapping[str, Any]) -> dict[str, Any]:
    """What a Serve config file (its YAML as a mapping) sets, as checked and read by Serve's own
    schema (ServeDeploySchema), unset fields left out; raises (pydantic's ValidationError,
    naming every field that failed) when the schema refuses it."""
    from ray.serve.schema import ServeDeploySchema

    fields: dict[str, Any] = ServeDeploySchema.model_validate(raw).model_dump(exclude_unset=True)
    return fields


# --- inside a gateway replica ------------------------------------------------------------------


def replica_id() -> str | None:
    """This Serve replica's unique id, or None outside a replica (the tests' in-process app)."""
    try:
        replica: str = serve.get_replica_context().replica_id.unique_id
    except Exception:
        return None
    return replica


def node_address() -> str:
    """The IP address of the Ray node this process runs on."""
    address: str = ray.util.get_node_ip_address()
    return address


__all__ = [
    "actor_pid", "actor_table", "attach_reader", "call", "detach", "ingress_deployment",
    "kill_for_restart", "named_actor", "node_address", "node_table", "replica_id",
    "run_application", "scale_deployment", "serve_config_fields", "serve_status", "start_driver",
    "start_serve", "stop_serve_and_driver",
]
