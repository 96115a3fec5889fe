"""`every_node` placement: the gateway's replica count kept equal to the live Ray nodes that carry
GATEWAY_RESOURCE, changed in place; and the per-node limit of the other placements."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from peernet.config import GATEWAY_RESOURCE, PeerNetConfig
from serve.placement import ReplicaTarget, gateway_nodes, wanted_replicas
from serve.ray_cluster import node_table, scale_deployment
from serve.serve_config import APP_NAME, DEPLOYMENT_NAME
from serve.upgrade import update_state

log = logging.getLogger("peernet.serve")

# In `every_node` placement: how often `peernet serve` reads Ray's node table, and how long one
# reading and the change it leads to may take before that round counts as failed.
NODE_WATCH_EVERY_S = 2.0
NODE_WATCH_TIMEOUT_S = 30.0


def replicas_per_node_limit(cfg: PeerNetConfig, nodes: int, replicas: int | None = None
                            ) -> int | None:
    """Serve's `max_replicas_per_node` for the gateway on a cluster of `nodes` live nodes, with
    at most `replicas` of them (default PEERNET_REPLICAS): the configured limit, else
    `replicas - 1` when there are two nodes or more (one node's death then leaves a replica
    serving; Ray's SPREAD placement alone once put both on one node), else none."""
    replicas = cfg.gateway.replicas if replicas is None else replicas
    if cfg.gateway.max_replicas_per_node > 0:
        return cfg.gateway.max_replicas_per_node
    if nodes >= 2 and replicas >= 2:
        return replicas - 1
    return None


async def _scale_gateway(replicas: int) -> None:
    """Set the gateway's replica count in place, without restarting a running replica
    (serve/ray_cluster.py's scale_deployment; `peernet serve` deploys the gateway with the
    external scaler in `every_node` placement)."""
    await scale_deployment(APP_NAME, DEPLOYMENT_NAME, replicas)


class GatewayNodeWatch:
    """`every_node` placement: keeps the gateway's replica count equal to the number of live Ray
    nodes carrying GATEWAY_RESOURCE (serve/placement.py decides, from a reading of the node
    table every NODE_WATCH_EVERY_S), changed in place without restarting a replica."""

    def __init__(self, replicas: int, state_path: Path) -> None:
        self.target = ReplicaTarget(replicas)
        self.state_path = state_path
        self.errors = 0  # failed rounds, each logged

    @property
    def replicas(self) -> int:
        """The count in force (what a redeploy, such as a rolling upgrade, must ask for)."""
        return self.target.current

    async def check(self) -> None:
        """Read the node table once and apply the count it calls for."""
        nodes = await asyncio.to_thread(node_table)
        carrying = gateway_nodes(nodes)
        before = self.target.current
        new = self.target.observe(wanted_replicas(nodes))
        if new is None:
            return
        await _scale_gateway(new)
        self.target.applied(new)
        # Said before the state file changes: whoever sees the new count there finds the line.
        print(f"peernet: gateway replicas {before} -> {new}: {len(carrying)} live Ray node(s) "
              f"carry {GATEWAY_RESOURCE} ({', '.join(n[:8] for n in carrying) or 'none'})",
              flush=True)
        update_state(self.state_path, {"replicas": new}, tmp_suffix=".nodes.tmp")
        if not carrying:
            log.warning("no live Ray node carries %s: the gateway's one replica waits for one "
                        "(start a node with --resources='{\"%s\": 1}')",
                        GATEWAY_RESOURCE, GATEWAY_RESOURCE)

    async def run(self, every_s: float = NODE_WATCH_EVERY_S) -> None:
        """Check for ever (until cancelled). A failed round is counted and logged, and the next
        one tries again."""
        while True:
            try:
                await asyncio.wait_for(self.check(), NODE_WATCH_TIMEOUT_S)
            except Exception as exc:
                self.errors += 1
                log.warning("gateway node watch failed (%d so far): %s: %s",
                            self.errors, type(exc).__name__, exc)
            await asyncio.sleep(every_s)
