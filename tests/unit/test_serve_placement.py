"""Where the gateway's replicas may go: never all on one node of a multi-node cluster; and in
`every_node` placement, one on each live node carrying the gateway resource."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import pytest

from peernet.config import ConfigError, load_config
from serve import node_watch
from serve.deployment import start
from serve.node_watch import GatewayNodeWatch, replicas_per_node_limit
from serve.placement import ReplicaTarget, count_conflicts, gateway_nodes, wanted_replicas
from serve.serve_config import GatewayServeConfig


@pytest.mark.parametrize(("env", "nodes", "want"), [
    ({}, 1, None),                                   # one node: every replica on it
    ({}, 2, 1),                                      # two replicas, two nodes: one each
    ({"PEERNET_REPLICAS": "4"}, 3, 3),               # at least two nodes hold replicas
    ({"PEERNET_REPLICAS": "1"}, 2, None),            # one replica: nothing to spread
    ({"PEERNET_MAX_REPLICAS_PER_NODE": "2"}, 1, 2),  # the operator's setting wins
    ({"PEERNET_MAX_REPLICAS_PER_NODE": "2", "PEERNET_REPLICAS": "6"}, 4, 2),
])
def test_replicas_per_node_limit(env: dict[str, str], nodes: int, want: int | None) -> None:
    assert replicas_per_node_limit(load_config(env), nodes) == want


# --- every_node placement: one replica on each live node carrying the gateway resource -------


def node(node_id: str, alive: bool = True, **resources: float) -> dict[str, Any]:
    """A `ray.nodes()` row, as much of it as placement reads."""
    return {"NodeID": node_id, "Alive": alive, "Resources": {"CPU": 2.0, **resources}}


def test_every_node_is_off_by_default_and_parsed() -> None:
    assert load_config({}).gateway.placement == "spread"
    env = {"PEERNET_GATEWAY_PLACEMENT": "every_node"}
    assert load_config(env).gateway.placement == "every_node"
    with pytest.raises(ConfigError, match="PEERNET_GATEWAY_PLACEMENT='daemonset' is not one of"):
        load_config({"PEERNET_GATEWAY_PLACEMENT": "daemonset"})


def test_gateway_nodes_are_the_live_ones_carrying_the_resource() -> None:
    nodes = [
        node("b", peernet_gateway=1),
        node("a", peernet_gateway=1),
        node("dead", alive=False, peernet_gateway=1),   # a dead node takes no traffic
        node("plain"),                                   # no resource: no replica
        node("half", peernet_gateway=0.5),               # less than the one unit a replica needs
        node("two", peernet_gateway=2),                  # still one replica (max 1 per node)
        {"NodeID": "bare", "Alive": True},               # no Resources at all
    ]
    assert gateway_nodes(nodes) == ["a", "b", "two"]
    assert wanted_replicas(nodes) == 3
    assert gateway_nodes(nodes, resource="other") == []


def test_the_gateway_never_asks_for_zero_replicas() -> None:
    # With no node carrying the resource, one replica waits for one rather than none running.
    assert wanted_replicas([]) == 1
    assert wanted_replicas([node("plain"), node("dead", alive=False, peernet_gateway=1)]) == 1


def test_a_node_joining_raises_the_count_at_once() -> None:
    target = ReplicaTarget(2)
    assert target.observe(2) is None
    assert target.observe(3) == 3
    target.applied(3)
    assert target.current == 3
    assert target.observe(3) is None


def test_a_lower_count_is_applied_only_once_read_twice_in_a_row() -> None:
    target = ReplicaTarget(3)
    assert target.observe(2) is None      # first reading: Serve may not have counted it out yet
    assert target.observe(2) == 2         # confirmed
    target.applied(2)
    assert target.observe(2) is None


def test_a_node_that_comes_back_between_two_readings_changes_nothing() -> None:
    target = ReplicaTarget(3)
    assert target.observe(2) is None
    assert target.observe(3) is None      # back: the lower reading is forgotten
    assert target.observe(2) is None      # so a new drop needs two readings again
    assert target.observe(1) is None      # and a different lower count starts over
    assert target.observe(1) == 1


def test_a_count_that_failed_to_apply_is_asked_for_again() -> None:
    target = ReplicaTarget(2)
    assert target.observe(3) == 3         # not applied (the controller call failed)
    assert target.observe(3) == 3
    target = ReplicaTarget(3)
    target.observe(2)
    assert target.observe(2) == 2         # not applied
    assert target.observe(2) == 2


def test_a_serve_config_file_may_not_set_the_count_in_every_node_placement(tmp_path: Path) -> None:
    assert count_conflicts({"graceful_shutdown_timeout_s": 5}) == []
    assert count_conflicts({"autoscaling_config": {}, "max_replicas_per_node": 2, "num_replicas": 3,
                            "max_surge_percent": 25}) == ["num_replicas", "autoscaling_config",
                                                          "max_replicas_per_node", "max_surge_percent"]
    cfg = load_config({"PEERNET_GATEWAY_PLACEMENT": "every_node", "PEERNET_HOME": str(tmp_path)})
    file = GatewayServeConfig(tmp_path / "serve-config.yaml",
                              {"autoscaling_config": {"min_replicas": 2, "max_replicas": 8}})
    # Refused before anything starts (no topics, no Ray).
    with pytest.raises(ConfigError, match="sets autoscaling_config"):
        start(cfg, file)


class FakeCluster:
    """Ray's node table and the controller's scale call, for GatewayNodeWatch without Ray. The first
    `failures` scale calls fail; `done` is set by the first that succeeds."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, nodes: list[dict[str, Any]],
                 failures: int = 0) -> None:
        self.nodes = nodes
        self.scaled: list[int] = []
        self.failures = failures
        self.done = asyncio.Event()
        monkeypatch.setattr(node_watch, "node_table", lambda: list(self.nodes))
        monkeypatch.setattr(node_watch, "_scale_gateway", self.scale)

    async def scale(self, replicas: int) -> None:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("controller away")
        self.scaled.append(replicas)
        self.done.set()


async def test_the_watch_scales_the_gateway_to_its_nodes_and_records_it(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "serve.json"
    state.write_text(json.dumps({"pid": 1, "replicas": 2}))
    cluster = FakeCluster(monkeypatch, [node("a", peernet_gateway=1), node("b", peernet_gateway=1)])
    watch = GatewayNodeWatch(2, state)

    await watch.check()
    assert cluster.scaled == []                     # as deployed: nothing to do
    cluster.nodes.append(node("c", peernet_gateway=1))
    await watch.check()
    assert cluster.scaled == [3]
    assert watch.replicas == 3
    assert json.loads(state.read_text()) == {"pid": 1, "replicas": 3}  # `peernet status` expects 3
    assert "gateway replicas 2 -> 3: 3 live Ray node(s) carry peernet_gateway" in capsys.readouterr().out

    cluster.nodes[2] = node("c", alive=False, peernet_gateway=1)
    await watch.check()
    assert cluster.scaled == [3]                    # one reading of a lower count: wait
    await watch.check()
    assert cluster.scaled == [3, 2]
    assert json.loads(state.read_text())["replicas"] == 2


async def test_a_failed_round_is_counted_and_the_next_one_tries_again(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cluster = FakeCluster(monkeypatch, [node("a", peernet_gateway=1), node("b", peernet_gateway=1)],
                          failures=2)
    watch = GatewayNodeWatch(1, tmp_path / "serve.json")
    running = asyncio.create_task(watch.run(every_s=0.01))
    try:
        await asyncio.wait_for(cluster.done.wait(), 5)
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    assert watch.errors == 2
    assert cluster.scaled == [2]
    assert watch.replicas == 2


def test_ray_runs_quiet_unless_the_operator_says_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    """What PeerNet does not use (usage stats, Ray's metrics export) is off and Serve's loops
    slower in every Ray process `peernet serve` starts; a value already exported wins."""
    from peernet.config import load_config
    from serve.ray_env import QUIET_RAY_ENV, replica_env

    for k in QUIET_RAY_ENV:
        monkeypatch.delenv(k, raising=False)
    env = replica_env(load_config())
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert env["RAY_enable_metrics_collection"] == "0"
    assert env["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.5"
    assert env["RAY_prestart_worker_first_driver"] == "0"  # no idle workers waking 100 times a second
    assert env["RAY_LOG_MONITOR_MANY_FILES_THRESHOLD"] == "0"  # the log monitor globs every 5 s
    assert env["LOG_NAME_UPDATE_INTERVAL_S"] == "5"
    assert env["REPORTER_UPDATE_INTERVAL_MS"] == "60000"  # the dashboard agent's psutil walk
    monkeypatch.setenv("RAY_enable_metrics_collection", "1")
    assert replica_env(load_config())["RAY_enable_metrics_collection"] == "1"
