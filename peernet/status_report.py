"""The report of `peernet status`: what was read from a running PeerNet, the verdict (healthy
or the reasons it is not), and its rendering as text or JSON. Pure: no Ray, no I/O."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

LAG_METRIC = "peernet_kafka_consumer_lag"


@dataclass(frozen=True)
class ServeProcess:
    """The `peernet serve` driver, as its state file (or the command line) names it."""

    running: bool | None  # None: not known here (a cluster given by address, no state file)
    source: str  # where it was found: the state file's path, or "--address"
    url: str
    gcs_address: str
    namespace: str
    pid: int | None = None
    ingress: str = ""
    started_at: float | None = None
    detail: str = ""  # why it is not running, when it is not


@dataclass(frozen=True)
class Node:
    node_id: str
    alive: bool
    address: str
    hostname: str
    head: bool
    cpus: float
    memory_bytes: int


@dataclass(frozen=True)
class ActorInfo:
    """One named actor (a shard, or a gateway replica) from Ray's actor table."""

    name: str
    state: str  # Ray's: ALIVE, RESTARTING, PENDING_CREATION, DEPENDENCIES_UNREADY, DEAD; MISSING
    node: str = ""  # the address of its node
    pid: int | None = None
    restarts: int | None = None


@dataclass(frozen=True)
class Gateway:
    """The gateway application on Serve."""

    app_status: str  # Serve's: RUNNING, DEPLOYING, DEPLOY_FAILED, ...; NOT_FOUND
    deployment_status: str  # HEALTHY, UPDATING, UNHEALTHY, ...
    replica_states: dict[str, int]  # Serve's replica states and how many are in each
    expected_replicas: int
    replicas: list[ActorInfo] = field(default_factory=list)
    proxies: dict[str, int] = field(default_factory=dict)  # Serve's proxies by status
    message: str = ""

    @property
    def running_replicas(self) -> int:
        return self.replica_states.get("RUNNING", 0)


@dataclass(frozen=True)
class GroupLag:
    """One consumer group's lag: records after its position, summed over its partitions."""

    group: str
    topic: str
    partitions: int
    total: int


@dataclass(frozen=True)
class Health:
    """What GET /healthz answered."""

    status_code: int
    status: str
    checks: dict[str, str]

    @property
    def healthy(self) -> bool:
        return self.status_code == 200 and all(v == "ok" for v in self.checks.values())


@dataclass(frozen=True)
class Service:
    """One backing service as `peernet stack status` sees it."""

    name: str
    state: str  # running, unhealthy, stopped
    address: str
    external: bool
    pid: int | None
    detail: str


_SECTION_ORDER = {name: i for i, name in enumerate(
    ("serve", "nodes", "shards", "gateway", "health", "services", "lag"))}


@dataclass
class StatusReport:
    """Everything `peernet status` read. A section that could not be read is None and its
    reason is in `errors` under the section's name."""

    serve: ServeProcess
    nodes: list[Node] | None = None
    shards: list[ActorInfo] | None = None
    gateway: Gateway | None = None
    lag: list[GroupLag] | None = None
    health: Health | None = None
    services: list[Service] | None = None
    errors: dict[str, str] = field(default_factory=dict)
    elapsed_s: float = 0.0
    now: float = field(default_factory=time.time)

    def problems(self) -> list[str]:
        """Why PeerNet is not healthy, most telling first; empty when it is."""
        out: list[str] = []
        if self.serve.running is False:
            out.append(f"peernet serve is not running: {self.serve.detail}".rstrip(": "))
        # Unread sections in a fixed order, most telling first (they are read in parallel, so
        # the order they failed in is chance): the one-line reason is always the same.
        out += [f"{section}: {why}" for section, why in
                sorted(self.errors.items(), key=lambda kv: _SECTION_ORDER.get(kv[0], 99))]
        if self.nodes is not None and not any(n.alive for n in self.nodes):
            out.append("no Ray node is alive")
        for shard in self.shards or []:
            if shard.state != "ALIVE":
                out.append(f"shard actor {shard.name} is {shard.state}")
        if self.gateway is not None:
            g = self.gateway
            if g.app_status != "RUNNING" or g.deployment_status != "HEALTHY":
                out.append(f"gateway application {g.app_status}, deployment {g.deployment_status}"
                           + (f": {g.message}" if g.message else ""))
            if g.running_replicas < g.expected_replicas:
                out.append(f"{g.running_replicas} of {g.expected_replicas} gateway replicas running")
            if g.proxies.get("UNHEALTHY"):
                out.append(f"{g.proxies['UNHEALTHY']} Serve proxy(ies) UNHEALTHY")
        if self.health is not None and not self.health.healthy:
            failing = [k for k, v in self.health.checks.items() if v != "ok"]
            out.append(f"/healthz answered {self.health.status_code}"
                       + (f", failing: {', '.join(failing)}" if failing else ""))
        for svc in self.services or []:
            if svc.state != "running":
                out.append(f"service {svc.name} is {svc.state}"
                           + (f": {svc.detail}" if svc.detail else ""))
        return out

    def warnings(self) -> list[str]:
        """What an operator should know that does not make PeerNet unhealthy."""
        out: list[str] = []
        dead = [n for n in self.nodes or [] if not n.alive]
        if dead:
            # Ray keeps dead nodes in its table; whatever ran there shows in the actors' states.
            out.append(f"{len(dead)} dead Ray node(s) in the cluster's table: "
                       + ", ".join(n.address or n.node_id[:8] for n in dead))
        if self.lag is not None and not self.lag:
            out.append("/metrics reported no consumer lag (no consumer answered in time)")
        return out

    @property
    def healthy(self) -> bool:
        return not self.problems()

    def reason(self) -> str:
        """The one-line verdict."""
        problems = self.problems()
        if not problems:
            return "healthy"
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return f"NOT HEALTHY: {problems[0]}{more}"

    def uptime_s(self) -> float | None:
        if self.serve.started_at is None or not self.serve.running:
            return None
        return max(0.0, self.now - self.serve.started_at)

    def to_dict(self) -> dict[str, Any]:
        serve = asdict(self.serve)
        serve["uptime_s"] = None if (u := self.uptime_s()) is None else round(u, 1)
        gateway = None
        if self.gateway is not None:
            gateway = {**asdict(self.gateway), "running_replicas": self.gateway.running_replicas}
        return {
            "healthy": self.healthy,
            "reason": self.reason(),
            "problems": self.problems(),
            "warnings": self.warnings(),
            "serve": serve,
            "nodes": None if self.nodes is None else [asdict(n) for n in self.nodes],
            "shards": None if self.shards is None else [asdict(s) for s in self.shards],
            "gateway": gateway,
            "lag": None if self.lag is None else [asdict(g) for g in self.lag],
            "health": None if self.health is None else {**asdict(self.health),
                                                        "healthy": self.health.healthy},
            "services": None if self.services is None else [asdict(s) for s in self.services],
            "errors": dict(self.errors),
            "elapsed_s": round(self.elapsed_s, 2),
        }


# --- reading what the server exposes ----------------------------------------------------------


def parse_consumer_lag(metrics_text: str) -> list[GroupLag]:
    """The `peernet_kafka_consumer_lag{group,topic,partition}` series of a /metrics scrape,
    summed per group and topic, sorted by group."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[tuple[str, str], tuple[int, float]] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name != LAG_METRIC:
            continue
        for sample in family.samples:
            if sample.name != LAG_METRIC:
                continue
            key = (sample.labels.get("group", ""), sample.labels.get("topic", ""))
            partitions, total = totals.get(key, (0, 0.0))
            totals[key] = (partitions + 1, total + float(sample.value))
    return [GroupLag(group, topic, partitions, int(total))
            for (group, topic), (partitions, total) in sorted(totals.items())]


ACTIVE_STATES = ("ALIVE", "RESTARTING", "PENDING_CREATION", "DEPENDENCIES_UNREADY")


def pick_actors(table: list[dict[str, Any]], names: list[str],
                node_addresses: dict[str, str]) -> list[ActorInfo]:
    """One entry per name in `names`, from Ray's actor table (`ray._private.state.actors()`
    rows). A name can have several rows (a dead actor stays in the table): the live one wins,
    else the latest to end. A name with no row is MISSING."""
    best: dict[str, dict[str, Any]] = {}
    for row in table:
        name = row.get("Name") or ""
        if name not in names:
            continue
        seen = best.get(name)
        if seen is None or _rank(row) > _rank(seen):
            best[name] = row
    return [_actor_info(best[name], node_addresses) if name in best
            else ActorInfo(name=name, state="MISSING") for name in names]


def replica_actors(table: list[dict[str, Any]], app: str,
                   node_addresses: dict[str, str]) -> list[ActorInfo]:
    """The live replica actors of Serve application `app` (named SERVE_REPLICA::<app>#...),
    sorted by name; dead ones (replaced replicas) are left out."""
    prefix = f"SERVE_REPLICA::{app}#"
    rows = [r for r in table if (r.get("Name") or "").startswith(prefix)
            and r.get("State") in ACTIVE_STATES]
    return sorted((_actor_info(r, node_addresses) for r in rows), key=lambda a: a.name)


def _rank(row: dict[str, Any]) -> tuple[int, float]:
    live = row.get("State") in ACTIVE_STATES
    return (1 if live else 0, float(row.get("EndTime") or row.get("StartTime") or 0))


def _actor_info(row: dict[str, Any], node_addresses: dict[str, str]) -> ActorInfo:
    node_id = (row.get("Address") or {}).get("NodeID", "")
    pid = row.get("Pid")
    return ActorInfo(name=row.get("Name") or "", state=str(row.get("State") or "UNKNOWN"),
                     node=node_addresses.get(node_id, node_id[:8]), pid=int(pid) if pid else None,
                     restarts=row.get("NumRestarts"))


def node_from_ray(row: dict[str, Any]) -> Node:
    """A `ray.nodes()` row."""
    resources = row.get("Resources") or {}
    return Node(node_id=str(row.get("NodeID", "")), alive=bool(row.get("Alive")),
                address=str(row.get("NodeManagerAddress", "")),
                hostname=str(row.get("NodeManagerHostname", "")),
                head=bool(row.get("IsHeadNode") or "node:__internal_head__" in resources),
                cpus=float(resources.get("CPU", 0.0)),
                memory_bytes=int(resources.get("memory", 0)))


# --- rendering -------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d{h:02d}h"
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))).rstrip()
            for r in rows]


def render_text(report: StatusReport) -> str:
    """The human-readable report; its last line is the verdict."""
    lines: list[str] = []
    s = report.serve
    if s.running is not False:
        uptime = report.uptime_s()
        parts = [f"pid {s.pid}" if s.pid else "pid unknown", s.url,
                 f"ingress {s.ingress}" if s.ingress else "",
                 f"up {_duration(uptime)}" if uptime is not None else "",
                 f"ray {s.gcs_address}" if s.gcs_address else "",
                 f"({s.detail})" if s.running is None else ""]
        lines.append("serve     " + "  ".join(p for p in parts if p))
    else:
        lines.append(f"serve     NOT RUNNING: {s.detail}")

    def unread(section: str) -> None:
        if section in report.errors:
            lines.append(f"  not read: {report.errors[section]}")

    if report.nodes is not None or "ray" in report.errors:
        alive = sum(n.alive for n in report.nodes or [])
        lines.append(f"nodes     {alive} alive" + (f" of {len(report.nodes)}" if report.nodes and
                                                    alive != len(report.nodes) else ""))
        unread("ray")
        lines += _table([["ALIVE" if n.alive else "DEAD", n.address, n.hostname,
                          "head" if n.head else "worker", f"{n.cpus:g} CPU",
                          _bytes(n.memory_bytes), n.node_id[:8]] for n in report.nodes or []])
    if report.shards is not None:
        alive = sum(a.state == "ALIVE" for a in report.shards)
        lines.append(f"shards    {alive} of {len(report.shards)} alive")
        lines += _table([[a.state, a.name, a.node, f"pid {a.pid}" if a.pid else "-",
                          f"restarts {a.restarts}" if a.restarts is not None else ""]
                         for a in report.shards])
    if report.gateway is not None or "gateway" in report.errors:
        g = report.gateway
        if g is not None:
            states = ", ".join(f"{n} {k}" for k, n in sorted(g.replica_states.items())) or "none"
            proxies = ", ".join(f"{n} {k}" for k, n in sorted(g.proxies.items())) or "none"
            lines.append(f"gateway   application {g.app_status}, deployment {g.deployment_status}, "
                         f"{g.running_replicas} of {g.expected_replicas} replicas running ({states}); "
                         f"proxies: {proxies}")
            if g.message:
                lines.append(f"  {g.message}")
            lines += _table([[a.state, a.name, a.node, f"pid {a.pid}" if a.pid else "-"]
                             for a in g.replicas])
        else:
            lines.append("gateway")
        unread("gateway")
    if report.lag is not None or "lag" in report.errors:
        lines.append("lag       records not yet read, per consumer group")
        unread("lag")
        lines += _table([[g.group, str(g.total), f"({g.partitions} partitions)"]
                         for g in report.lag or []])
    if report.health is not None or "health" in report.errors:
        h = report.health
        if h is not None:
            checks = ", ".join(f"{k} {v}" for k, v in h.checks.items())
            lines.append(f"health    /healthz {h.status_code} {h.status}: {checks}")
        else:
            lines.append("health")
        unread("health")
    if report.services is not None or "services" in report.errors:
        lines.append("services")
        unread("services")
        lines += _table([[v.state, v.name, "external" if v.external else
                          (f"pid {v.pid}" if v.pid else "-"), v.address, v.detail]
                         for v in report.services or []])
    for warning in report.warnings():
        lines.append(f"warning: {warning}")
    for problem in report.problems()[1:]:
        lines.append(f"also: {problem}")
    lines.append(report.reason())
    return "\n".join(lines)


__all__ = [
    "ActorInfo",
    "Gateway",
    "GroupLag",
    "Health",
    "Node",
    "ServeProcess",
    "Service",
    "StatusReport",
    "node_from_ray",
    "parse_consumer_lag",
    "pick_actors",
    "render_text",
    "replica_actors",
]
