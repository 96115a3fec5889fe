"""Where the gateway's replicas go in `every_node` placement (PEERNET_GATEWAY_PLACEMENT): one on
each live Ray node that carries GATEWAY_RESOURCE. Pure functions of Ray's node table
(`ray.nodes()` rows); serve/deployment.py and serve/node_watch.py read the table and apply
what they decide."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from peernet.config import GATEWAY_RESOURCE

# Deployment settings a Serve config file may not set in `every_node` placement (it is refused):
# the replica count, its autoscaling and spread, which the nodes decide; and a surge in rolling
# upgrades (Serve's default is none), since a replica started before its predecessor stops has
# no node to go to: each gateway node's one unit of the resource is held by its replica.
EVERY_NODE_REFUSED = ("num_replicas", "autoscaling_config", "max_replicas_per_node",
                      "max_surge_percent")


def gateway_nodes(nodes: Iterable[Mapping[str, Any]], resource: str = GATEWAY_RESOURCE
                  ) -> list[str]:
    """The ids of the live nodes that carry at least one unit of `resource`, sorted. A node
    with several units still takes one replica (the deployment's `max_replicas_per_node` is 1)."""
    return sorted(str(n.get("NodeID", "")) for n in nodes
                  if n.get("Alive") and float((n.get("Resources") or {}).get(resource, 0)) >= 1)


def wanted_replicas(nodes: Iterable[Mapping[str, Any]], resource: str = GATEWAY_RESOURCE) -> int:
    """One replica per live node carrying `resource`, and never fewer than one: with no such
    node the one replica waits, pending, for a node to carry it (a cluster autoscaler may start
    one for it), rather than the gateway being scaled away."""
    return max(1, len(gateway_nodes(nodes, resource)))


def count_conflicts(options: Mapping[str, Any]) -> list[str]:
    """The deployment settings in `options` (a Serve config file's) that `every_node` placement
    cannot honour."""
    return [k for k in EVERY_NODE_REFUSED if k in options]


class ReplicaTarget:
    """The replica count `peernet serve` keeps in `every_node` placement, fed each reading of
    the node table.

    A higher count is taken at once (a node joined: it gets its replica as soon as possible). A
    lower one only once two readings in a row agree: Ray marks a dead node's actors dead when it
    marks the node, but Serve may not have counted that replica out yet, and a count lowered
    before it has makes Serve stop a replica of its choice, possibly a healthy one on a live
    node. The second reading (one watch period later) gives Serve that time.
    """

    def __init__(self, current: int) -> None:
        self.current = current
        self._lower_seen: int | None = None

    def observe(self, wanted: int) -> int | None:
        """The count to apply after reading `wanted`, or None to keep the current one. The
        caller applies it and then calls `applied` (a count that failed to apply is asked for
        again by a later reading)."""
        if wanted >= self.current:
            self._lower_seen = None
            return None if wanted == self.current else wanted
        if self._lower_seen != wanted:
            self._lower_seen = wanted  # first sight of this lower count: read again first
            return None
        return wanted

    def applied(self, count: int) -> None:
        self.current = count
        self._lower_seen = None


__all__ = ["EVERY_NODE_REFUSED", "ReplicaTarget", "count_conflicts", "gateway_nodes", "wanted_replicas"]
