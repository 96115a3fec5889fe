"""Where the gateway's replicas may go: never all on one node of a multi-node cluster."""

from __future__ import annotations

import pytest

from peernet.config import load_config
from serve.deployment import replicas_per_node_limit


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
