"""cluster.yaml passes Ray's own cluster-launcher validation (what `ray up` runs), and the
settings it deploys with (deploy/peernet.env) are real PEERNET_* variables that parse."""

from __future__ import annotations

import copy
import subprocess
import tomllib
from typing import Any

import pytest
import yaml
from ray.autoscaler._private.util import hash_runtime_conf, prepare_config, validate_config

from peernet.config import ENV_VARS, GATEWAY_RESOURCE, PROJECT_ROOT, RAY_HEALTH_CHECKS, load_config

CLUSTER_YAML = PROJECT_ROOT / "cluster.yaml"
ENV_FILE = PROJECT_ROOT / "deploy" / "peernet.env"
SERVE_SCRIPT = PROJECT_ROOT / "deploy" / "peernet-serve.sh"


def _cluster() -> dict[str, Any]:
    loaded = yaml.safe_load(CLUSTER_YAML.read_text())
    assert isinstance(loaded, dict)
    return loaded


def _env_file() -> dict[str, str]:
    env: dict[str, str] = {}
    for line in ENV_FILE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        assert sep, f"not NAME=VALUE: {line!r}"
        assert name not in env, f"{name} is set twice"
        env[name] = value
    return env


def test_cluster_yaml_passes_rays_validation_as_ray_up_runs_it() -> None:
    # `ray up` (ray.autoscaler._private.commands._bootstrap_config) prepares the config (fills
    # the provider's defaults, turns the host lists into node types) and then validates it
    # against ray/autoscaler/ray-schema.json.
    config = prepare_config(copy.deepcopy(_cluster()))
    validate_config(config)
    assert config["provider"]["type"] == "local"
    # Both hosts lists are kept: the workers are the listed hosts.
    node_type = config["available_node_types"][config["head_node_type"]]
    assert node_type["min_workers"] == node_type["max_workers"] == 2


def test_rays_validation_would_catch_a_broken_cluster_yaml() -> None:
    import jsonschema

    config = prepare_config(copy.deepcopy(_cluster()))
    config["head_start_ray_commands"] = "ray start --head"  # a string, not a list
    with pytest.raises(jsonschema.ValidationError):
        validate_config(config)


def test_placeholders_are_obvious() -> None:
    provider = _cluster()["provider"]
    for host in [provider["head_ip"], *provider["worker_ips"]]:
        assert host.startswith("REPLACE-WITH-"), host


def test_ray_is_started_with_the_settings_peernet_needs() -> None:
    cluster = _cluster()
    head = " ".join(cluster["head_start_ray_commands"])
    workers = " ".join(cluster["worker_start_ray_commands"])
    for commands in (head, workers):
        assert "export RAY_AUTH_MODE=disabled RAY_TMPDIR=/tmp/peernet;" in commands
        assert "~/peernet-venv/bin/ray start" in commands
    assert "--include-dashboard=false" in head
    # Every node takes traffic: each carries the resource every_node placement puts a replica
    # on (the on-premise provider takes a node's resources from its `ray start`).
    for commands in (head, workers):
        assert f"""--resources='{{"{GATEWAY_RESOURCE}": 1}}'""" in commands
    # Node failure noticed in seconds, as tests/e2e/test_multinode.py runs it.
    for name, value in RAY_HEALTH_CHECKS.items():
        assert f"{name}={value}" in head, name
    # `peernet serve` joins with address "auto", which Ray resolves from $RAY_TMPDIR/ray: the
    # script that runs it must use the same RAY_TMPDIR as `ray start`.
    assert 'RAY_TMPDIR="${RAY_TMPDIR:-/tmp/peernet}"' in SERVE_SCRIPT.read_text()
    # The head runs `peernet serve` after Ray is up, and stops the previous one before.
    assert cluster["head_start_ray_commands"][0] == "~/peernet/deploy/peernet-serve.sh stop"
    assert cluster["head_start_ray_commands"][-1] == "~/peernet/deploy/peernet-serve.sh start"
    assert "pip install --quiet -e ~/peernet" in " ".join(cluster["setup_commands"])


def test_the_nodes_get_every_package_peernet_installs() -> None:
    mounts = _cluster()["file_mounts"]
    for remote, local in mounts.items():
        assert remote == "~/peernet/" + local.removeprefix("./"), (remote, local)
        assert (PROJECT_ROOT / local).exists(), local
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    wanted = {"pyproject.toml", pyproject["project"]["readme"], "deploy", *packages}
    assert {local.removeprefix("./") for local in mounts.values()} == wanted


def test_ray_up_can_hash_the_file_mounts(monkeypatch: pytest.MonkeyPatch) -> None:
    # `ray up` hashes the contents of every file it will copy (commands.get_or_create_head_node);
    # a socket among them (a local Ray's, under .peernet/) would make it fail.
    monkeypatch.chdir(PROJECT_ROOT)
    runtime_hash, contents_hash = hash_runtime_conf(_cluster()["file_mounts"], None, {},
                                                    generate_file_mounts_contents_hash=True)
    assert runtime_hash and contents_hash


def test_the_serve_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(SERVE_SCRIPT)], check=True)
    assert SERVE_SCRIPT.stat().st_mode & 0o111, "deploy/peernet-serve.sh is not executable"


def test_the_deployed_settings_are_real_peernet_variables() -> None:
    env = _env_file()
    unknown = sorted(set(env) - set(ENV_VARS))
    assert not unknown, f"deploy/peernet.env sets variables peernet/config.py does not read: {unknown}"


def test_the_deployed_settings_parse_and_name_external_services() -> None:
    cfg = load_config(_env_file())  # ConfigError if a value does not parse
    s = cfg.services
    assert s.kafka_external and s.redis_external and s.mongo_external
    assert len(s.kafka_bootstrap.split(",")) == 3
    assert cfg.topics.replication_factor == 3
    assert cfg.ray.address == "auto"
    assert cfg.ray.auth_mode == "disabled"
    assert cfg.gateway.host == "0.0.0.0"
    assert not cfg.gateway.dev_tokens
    # Placeholders, not defaults, for what must be the operator's own.
    for value in (s.kafka_bootstrap, s.redis_url, s.mongo_url, cfg.gateway.token_secret):
        assert "REPLACE-WITH-" in value


def test_the_deployed_settings_name_the_serve_config_file_kept_here() -> None:
    """cluster.yaml's file_mounts put the repository at ~/peernet; the file must be in it and
    load (Serve's schema, and what `peernet serve` applies)."""
    from serve.placement import count_conflicts
    from serve.serve_config import load_serve_config

    gateway = load_config(_env_file()).gateway
    assert gateway.serve_config == "~/peernet/deploy/serve-config.yaml"
    sc = load_serve_config(PROJECT_ROOT / "deploy" / "serve-config.yaml")
    # One replica on each node cluster.yaml gives the resource; the file must leave the count
    # to that, or `peernet serve` stops at start.
    assert gateway.placement == "every_node"
    assert count_conflicts(sc.options) == []
