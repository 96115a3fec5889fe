"""The gateway's Serve config file: deploy/serve-config.yaml passes Serve's own schema, and what
`peernet serve` takes from a file, or refuses in it, by name."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from peernet.config import PROJECT_ROOT, ConfigError
from serve.placement import count_conflicts
from serve.serve_config import apply_env, load_serve_config

REPO_FILE = PROJECT_ROOT / "deploy" / "serve-config.yaml"

BASE: dict[str, Any] = {
    "applications": [{
        "name": "peernet", "route_prefix": "/", "import_path": "serve.gateway:Gateway",
        "runtime_env": {"env_vars": {"PEERNET_HEARTBEAT_MS": "20000"}},
        "deployments": [{"name": "Gateway", "num_replicas": 3, "graceful_shutdown_timeout_s": 7}],
    }],
}


def _write(tmp_path: Path, doc: dict[str, Any]) -> Path:
    path = tmp_path / "serve-config.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_the_repositorys_file_passes_serves_schema_and_suits_every_node_placement() -> None:
    # deploy/peernet.env puts a replica on every gateway node: the file sets no count of its own
    # (`peernet serve` would refuse it; tests/unit/test_cluster_config.py checks the pairing).
    sc = load_serve_config(REPO_FILE)
    assert sc.autoscaling is None and count_conflicts(sc.options) == []
    assert sc.options["graceful_shutdown_timeout_s"] == 5
    assert sc.env["PEERNET_HOST"] == "0.0.0.0" and sc.env["PEERNET_PROXY_LOCATION"] == "EveryNode"
    assert all(k.startswith("PEERNET_") for k in sc.env)


def test_deployment_settings_and_variables_are_taken(tmp_path: Path) -> None:
    sc = load_serve_config(_write(tmp_path, BASE))
    assert sc.options == {"num_replicas": 3, "graceful_shutdown_timeout_s": 7}
    assert sc.replicas(default=2) == 3 and sc.autoscaling is None
    assert sc.env == {"PEERNET_HEARTBEAT_MS": "20000"}


def test_a_variable_already_in_the_environment_wins(tmp_path: Path) -> None:
    doc = copy.deepcopy(BASE)
    doc["applications"][0]["runtime_env"]["env_vars"]["PEERNET_PORT"] = "9000"
    sc = load_serve_config(_write(tmp_path, doc))
    environ = {"PEERNET_PORT": "8001"}
    assert apply_env(sc, environ) == ["PEERNET_HEARTBEAT_MS"]
    assert environ == {"PEERNET_PORT": "8001", "PEERNET_HEARTBEAT_MS": "20000"}


def _broken(change: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    change(doc)
    return doc


@pytest.mark.parametrize(("doc", "says"), [
    (_broken(lambda d: d["applications"][0]["deployments"][0].update(
        autoscaling_config={"min_replicas": 5, "max_replicas": 2})), "not a valid Serve config"),
    (_broken(lambda d: d["applications"].append({**d["applications"][0], "name": "other",
                                                 "route_prefix": "/x"})), "exactly one application"),
    (_broken(lambda d: d["applications"][0].update(name="app")), "exactly one application"),
    (_broken(lambda d: d["applications"][0]["deployments"][0].update(name="Other")), "'Other'"),
    (_broken(lambda d: d["applications"][0]["runtime_env"]["env_vars"].update(PATH="/x")),
     "PEERNET_* variables only, not PATH"),
    (_broken(lambda d: d["applications"][0]["runtime_env"].update(pip=["x"])), "runtime_env.pip"),
    (_broken(lambda d: d["applications"][0]["deployments"][0].update(
        ray_actor_options={"num_cpus": 1})), "ray_actor_options"),
    (_broken(lambda d: d.update(grpc_options={"port": 9001})), "grpc_options"),
    (_broken(lambda d: d["applications"][0].update(route_prefix="/api")), "route_prefix must be"),
])
def test_what_peernet_does_not_apply_is_refused_by_name(tmp_path: Path, doc: dict[str, Any],
                                                       says: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_serve_config(_write(tmp_path, doc))
    assert says in str(refused.value)


def test_a_file_that_is_not_there_or_not_yaml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_serve_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications: [\n")
    with pytest.raises(ConfigError, match="not YAML"):
        load_serve_config(bad)
