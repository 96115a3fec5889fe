"""The gateway's Serve config file (`PEERNET_SERVE_CONFIG`): Serve's own format, kept in the
repository (deploy/serve-config.yaml), checked by Serve's own schema, applied by `peernet serve`.

`serve deploy` cannot deploy PeerNet by itself: the gateway needs the shard actors that
`peernet serve` creates first, and `serve deploy` talks to the dashboard, which PeerNet runs
without. So `peernet serve` reads the file and applies, to the one application (`peernet`) and
its one deployment (`Gateway`):

- the deployment's settings as Serve defines them (`num_replicas` or `autoscaling_config`,
  `max_ongoing_requests`, `max_replicas_per_node`, `graceful_shutdown_timeout_s`, ...), over
  PeerNet's defaults for them;
- the application's `runtime_env.env_vars`: `PEERNET_*` settings, each used unless the variable
  is already set in `peernet serve`'s environment (an explicit variable wins);
- `proxy_location` and `http_options.host`/`port`, the same way (as `PEERNET_PROXY_LOCATION`,
  `PEERNET_HOST`, `PEERNET_PORT`).

Anything else the file sets is refused with a ConfigError naming it, rather than ignored.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from peernet.config import ConfigError
from serve.ray_cluster import serve_config_fields

APP_NAME = "peernet"
DEPLOYMENT_NAME = "Gateway"
# Deployment settings PeerNet sets itself from its own configuration.
_OWN = frozenset({"name", "ray_actor_options", "placement_group_bundles",
                  "placement_group_strategy", "placement_group_bundle_label_selector",
                  "deployment_actors", "gang_scheduling_config", "request_router_config",
                  "user_config", "logging_config"})
_APP_KEYS = frozenset({"name", "route_prefix", "import_path", "runtime_env", "deployments"})
_TOP_KEYS = frozenset({"proxy_location", "http_options", "applications"})
_HTTP_KEYS = frozenset({"host", "port"})


@dataclass(frozen=True)
class GatewayServeConfig:
    """What a Serve config file sets for the gateway."""

    path: Path
    options: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def autoscaling(self) -> dict[str, Any] | None:
        scaling: dict[str, Any] | None = self.options.get("autoscaling_config")
        return scaling

    def replicas(self, default: int) -> int:
        """The replica count to expect running: the autoscaler's minimum, the fixed count, or
        `default` when the file sets neither."""
        if self.autoscaling:
            return int(self.autoscaling.get("min_replicas", 1))
        n = self.options.get("num_replicas")
        return n if isinstance(n, int) else default

    def max_replicas(self, default: int) -> int:
        if self.autoscaling:
            return int(self.autoscaling.get("max_replicas", default))
        return self.replicas(default)


def load_serve_config(path: Path) -> GatewayServeConfig:
    """Read and check the file at `path`; a ConfigError says what is wrong with it."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"PEERNET_SERVE_CONFIG: cannot read {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"PEERNET_SERVE_CONFIG: {path} is not YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"PEERNET_SERVE_CONFIG: {path} must hold a mapping")
    try:
        given = serve_config_fields(raw)
    except Exception as exc:  # pydantic's ValidationError, with every field that failed
        raise ConfigError(f"PEERNET_SERVE_CONFIG: {path} is not a valid Serve config: {exc}") from None
    _refuse(path, "", set(given) - _TOP_KEYS)
    _refuse(path, "http_options.", set(given.get("http_options", {})) - _HTTP_KEYS)
    apps = given.get("applications", [])
    if len(apps) != 1 or apps[0].get("name") != APP_NAME:
        raise ConfigError(f"PEERNET_SERVE_CONFIG: {path} must have exactly one application, "
                          f"named {APP_NAME!r}")
    app = apps[0]
    _refuse(path, "applications[0].", set(app) - _APP_KEYS)
    if app.get("route_prefix", "/") != "/":
        raise ConfigError(f"PEERNET_SERVE_CONFIG: {path}: the route_prefix must be '/'")
    runtime_env = app.get("runtime_env") or {}
    _refuse(path, "runtime_env.", set(runtime_env) - {"env_vars"})
    env = {str(k): str(v) for k, v in (runtime_env.get("env_vars") or {}).items()}
    foreign = sorted(k for k in env if not k.startswith("PEERNET_"))
    if foreign:
        raise ConfigError(f"PEERNET_SERVE_CONFIG: {path}: env_vars may set PEERNET_* variables "
                          f"only, not {', '.join(foreign)}")
    if "proxy_location" in given:
        env["PEERNET_PROXY_LOCATION"] = _proxy_location(given["proxy_location"])
    http = given.get("http_options", {})
    if "host" in http:
        env["PEERNET_HOST"] = str(http["host"])
    if "port" in http:
        env["PEERNET_PORT"] = str(http["port"])
    options: dict[str, Any] = {}
    for dep in app.get("deployments", []):
        if dep.get("name") != DEPLOYMENT_NAME:
            raise ConfigError(f"PEERNET_SERVE_CONFIG: {path}: the one deployment is "
                              f"{DEPLOYMENT_NAME!r}, not {dep.get('name')!r}")
        _refuse(path, f"deployments[{DEPLOYMENT_NAME}].", set(dep) & (_OWN - {"name"}))
        options = {k: v for k, v in dep.items() if k not in _OWN}
    return GatewayServeConfig(path, options, env)


def apply_env(serve_config: GatewayServeConfig, environ: MutableMapping[str, str]) -> list[str]:
    """Set the file's variables that `environ` does not already set; the names set."""
    applied = [k for k in serve_config.env if k not in environ]
    for k in applied:
        environ[k] = serve_config.env[k]
    return applied


def _proxy_location(value: Any) -> str:
    return str(getattr(value, "value", value))


def _refuse(path: Path, where: str, keys: set[str]) -> None:
    if keys:
        raise ConfigError(f"PEERNET_SERVE_CONFIG: {path}: {', '.join(where + k for k in sorted(keys))} "
                          "not supported by `peernet serve` (docs/deploy.md, 'The Serve config file')")
