"""The parameters of one benchmark invocation: one frozen dataclass, validated once, recorded
verbatim in the results."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

SCENARIOS = ("dm", "fanout", "presence", "mixed", "connections", "group")
TARGETS = ("peernet", "socketio", "centrifugo")
# How an idle connection keeps alive: `ping` frames of the protocol, or WebSocket pings (RFC 6455
# control frames, which the contract counts as traffic too).
KEEPALIVES = ("frame", "ws-ping")
# What `--storm` cuts: every connection of one gateway replica (bench/chaos.py's `replica` fault).
STORMS = ("replica",)
# Sockets one load process may hold by default (`connections` without --procs): well inside a
# 20,000 open-files limit, and few enough that one process keeps up with its share of connects.
CONNECTIONS_PER_PROC = 5000
# Files a load process needs beside its sockets (Python, pipes, the token fetch's HTTP pool).
FD_HEADROOM = 200
# The load processes: bench/worker.py's, or the Go driver (bench/go/dmdriver; dm on PeerNet).
DRIVERS = ("python", "go")
# The most members a group may have, its creator included (docs/protocol.md, Groups).
MAX_GROUP_MEMBERS = 500
# The scenarios each peer implements (PeerNet implements them all).
PEER_SCENARIOS: dict[str, tuple[str, ...]] = {"socketio": ("dm",), "centrifugo": ("dm", "fanout")}

# Rate shares of the `mixed` scenario when --mix is not given (clients split in the same shares).
DEFAULT_MIX: dict[str, float] = {"dm": 0.7, "fanout": 0.1, "presence": 0.2}
# Where PeerNet's services listen by default; the probe counts only the instances on these ports.
DEFAULT_SERVICE_PORTS: dict[str, int] = {"kafka": 9092, "redis": 6379, "mongo": 27017}


class ParamError(ValueError):
    """A parameter is out of range or inconsistent with another."""


@dataclass(frozen=True)
class BenchParams:
    """Everything that determines what the load generator does.

    `rate` is the total arrival rate of the scenario's actions per second (DMs, posts, or presence
    changes); each phase sends for `warmup + duration` seconds and then drains.
    """

    scenario: str = "dm"
    target: str = "peernet"
    urls: tuple[str, ...] = ("http://127.0.0.1:8000",)
    clients: int = 100
    rate: float = 100.0
    duration: float = 20.0
    warmup: float = 5.0
    drain: float = 10.0
    size: int = 100
    group_size: int = 2
    authors: int = 0
    followers: int = 10
    churners: int = 0
    watch: int = 10
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    seed: int = 1
    procs: int = 1
    driver: str = "python"
    request_timeout: float = 15.0
    connect_concurrency: int = 64
    binary: bool = True
    run_tag: str = ""
    service_ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_SERVICE_PORTS))
    # --find-max
    find_max: bool = False
    bound_ms: float = 100.0
    step_factor: float = 1.5
    max_rate: float = 100_000.0
    max_steps: int = 12
    # --chaos (bench/chaos.py): one phase per fault, at `rate`
    chaos: tuple[str, ...] = ()
    fault_at: float = 10.0
    mongo_down: float = 30.0
    burst_factor: float = 10.0
    burst_s: float = 30.0
    fault_gap: float = 5.0
    ray_address: str = ""
    # `connections` (bench/runner.py, Coordinator.run_connections): open `clients` connections
    # at `connect_rate` a second, sample the idle stack `idle_baseline` s first, hold them idle
    # `hold` s with `keepalive`, then DMs at `rate` when it is above 0, then the `storm`.
    connect_rate: float = 100.0
    hold: float = 30.0
    keepalive: str = "frame"
    idle_baseline: float = 10.0
    storm: str = ""
    # The HMAC secret of the Centrifugo nodes the harness started (tokens are signed in the load
    # processes); a throwaway per run, left out of the written results.
    token_secret: str = ""

    def validate(self) -> BenchParams:
        """Return self, or raise ParamError naming the first bad parameter."""
        if self.scenario not in SCENARIOS:
            raise ParamError(f"scenario must be one of {', '.join(SCENARIOS)}")
        if self.target not in TARGETS:
            raise ParamError(f"target must be one of {', '.join(TARGETS)}")
        peer = PEER_SCENARIOS.get(self.target)
        if peer is not None and self.scenario not in peer:
            raise ParamError(f"the {self.target} target implements {scenarios_phrase(peer)} only")
        if not self.urls:
            raise ParamError("at least one --url is needed")
        checks: list[tuple[bool, str]] = [
            (self.clients >= 2, "--clients must be at least 2"),
            (self.rate > 0 or (self.scenario == "connections" and self.rate == 0),
             "--rate must be positive"),
            (self.duration > 0, "--duration must be positive"),
            (self.warmup >= 0, "--warmup must not be negative"),
            (self.drain >= 0, "--drain must not be negative"),
            (1 <= self.size <= 4000, "--size must be 1 to 4000 characters"),
            (self.group_size >= 2, "--group-size must be at least 2"),
            (self.authors >= 0, "--authors must not be negative"),
            (self.followers >= 1, "--followers must be at least 1"),
            (self.churners >= 0, "--churners must not be negative"),
            (self.watch >= 1, "--watch must be at least 1"),
            (self.procs >= 1, "--procs must be at least 1"),
            (self.request_timeout > 0, "--request-timeout must be positive"),
            (self.connect_concurrency >= 1, "--connect-concurrency must be at least 1"),
            (self.bound_ms > 0, "--bound-ms must be positive"),
            (self.step_factor > 1.0, "--step-factor must be greater than 1"),
            (self.max_steps >= 1, "--max-steps must be at least 1"),
            (len(self.run_tag) <= 8 and (self.run_tag.isalnum() or not self.run_tag)
             and self.run_tag == self.run_tag.lower(), "--run-tag: at most 8 of [a-z0-9]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ParamError(message)
        if self.keepalive not in KEEPALIVES:
            raise ParamError(f"--keepalive must be one of {', '.join(KEEPALIVES)}")
        if self.scenario == "connections":
            self._validate_connections()
        if self.scenario == "group":
            self._validate_group()
        if self.driver not in DRIVERS:
            raise ParamError(f"driver must be one of {', '.join(DRIVERS)}")
        if self.driver == "go":
            self._validate_go()
        if self.chaos:
            self._validate_chaos()
        if self.scenario == "mixed":
            if set(self.mix) - {"dm", "fanout", "presence"}:
                raise ParamError("--mix takes the shares dm, fanout and presence")
            if any(v < 0 for v in self.mix.values()) or sum(self.mix.values()) <= 0:
                raise ParamError("--mix shares must be non-negative and not all zero")
        return self

    def _validate_connections(self) -> None:
        checks: list[tuple[bool, str]] = [
            (self.target == "peernet", "the connections scenario drives PeerNet"),
            (self.driver == "python", "the connections scenario runs with the Python load processes"),
            (not self.find_max and not self.chaos, "the connections scenario takes --storm, not "
                                                   "--find-max or --chaos"),
            (self.connect_rate > 0, "--connect-rate must be positive"),
            (self.hold >= 0, "--hold must not be negative"),
            (self.idle_baseline >= 0, "--idle-baseline must not be negative"),
            (self.storm in ("", *STORMS), f"--storm takes {', '.join(STORMS)}"),
            (not self.storm or self.rate > 0,
             "--storm needs --rate: the DMs sent across the cut are what the resume accounting checks"),
            (not self.storm or 0 <= self.fault_at < self.warmup + self.duration,
             "--storm: --fault-at must fall inside warm-up + duration"),
        ]
        for ok, message in checks:
            if not ok:
                raise ParamError(message)

    def _validate_group(self) -> None:
        n, g = self.clients, self.group_size
        checks: list[tuple[bool, str]] = [
            (g <= MAX_GROUP_MEMBERS, f"--group-size: a group holds at most {MAX_GROUP_MEMBERS} "
                                     "members (the protocol's limit)"),
            (n >= g, f"--clients {n} cannot fill one group of --group-size {g}"),
            # The lone last user would join the last group (bench/plan.py), one over the cap.
            (g < MAX_GROUP_MEMBERS or n % g != 1,
             f"--clients {n} leaves one user over groups of {g}, who would make the last group "
             f"{g + 1}, over the limit of {MAX_GROUP_MEMBERS}: use --clients {n - 1} or {n + 1}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ParamError(message)

    def _validate_go(self) -> None:
        checks: list[tuple[bool, str]] = [
            (self.scenario == "dm", "--driver go runs the dm scenario only"),
            (self.target == "peernet",
             "--driver go drives PeerNet (a --vs peer runs with the Python driver)"),
            (self.binary, "--driver go speaks MessagePack frames only: drop --json-frames"),
            (self.procs == 1, "--driver go is one process on every core: leave --procs at 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ParamError(message)

    def _validate_chaos(self) -> None:
        phase = self.warmup + self.duration
        checks: list[tuple[bool, str]] = [
            (self.scenario == "dm" and self.target == "peernet", "--chaos runs the dm scenario on PeerNet"),
            (not self.find_max, "--chaos and --find-max do not mix: chaos runs at one --rate"),
            (0 <= self.fault_at < phase, "--fault-at must fall inside warm-up + duration"),
            (self.mongo_down > 0, "--mongo-down must be positive"),
            (self.burst_factor > 1, "--burst-factor must be greater than 1"),
            (self.burst_s > 0, "--burst-s must be positive"),
            (self.fault_gap >= 0, "--fault-gap must not be negative"),
            ("mongo" not in self.chaos or self.fault_at + self.mongo_down < phase,
             "--chaos mongo: --fault-at + --mongo-down must end before the phase does "
             "(raise --duration)"),
            ("burst" not in self.chaos or self.fault_at + self.burst_s < phase,
             "--chaos burst: --fault-at + --burst-s must end before the phase does (raise --duration)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ParamError(message)

    def with_(self, **changes: Any) -> BenchParams:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["urls"] = list(self.urls)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchParams:
        d = dict(d)
        d["urls"] = tuple(d.get("urls", ()))
        d["chaos"] = tuple(d.get("chaos", ()))
        return cls(**d)


def open_files_limit() -> int:
    """This process's soft open-files limit (inherited by the load processes it spawns)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def default_procs(clients: int, limit: int) -> int:
    """Load processes for `clients` sockets: CONNECTIONS_PER_PROC each, more when the
    open-files limit holds fewer."""
    per_proc = max(1, min(CONNECTIONS_PER_PROC, limit - FD_HEADROOM))
    return max(1, -(-clients // per_proc))


def check_open_files(params: BenchParams, limit: int) -> None:
    """Raise ParamError when one load process would run out of file descriptors before it held
    its share of the connections (its connects would fail in the generator, not the server)."""
    per_proc = -(-params.clients // params.procs)
    if per_proc + FD_HEADROOM > limit:
        need = default_procs(params.clients, limit)
        raise ParamError(f"{params.clients:,} connections over {params.procs} load process(es) is "
                         f"{per_proc:,} sockets each, but the open-files limit is {limit:,}: "
                         f"use --procs {need} or more (or leave --procs out)")


def scenarios_phrase(names: tuple[str, ...]) -> str:
    """`the dm scenario`, `the dm and fanout scenarios`."""
    return f"the {' and '.join(names)} scenario" + ("s" if len(names) > 1 else "")


def parse_ports(text: str) -> dict[str, int]:
    """Parse `kafka=9092,redis=6379,mongo=27017`."""
    out: dict[str, int] = {}
    for name, share in parse_mix(text).items():
        if share != int(share) or not 0 < share < 65536:
            raise ParamError(f"--service-ports: {name}={share:g} is not a port")
        out[name] = int(share)
    return out


def parse_mix(text: str) -> dict[str, float]:
    """Parse `dm=0.7,fanout=0.1,presence=0.2` into shares."""
    mix: dict[str, float] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        if not sep:
            raise ParamError(f"--mix: expected NAME=SHARE, got {part!r}")
        try:
            mix[name.strip()] = float(value)
        except ValueError:
            raise ParamError(f"--mix: {value!r} is not a number") from None
    return mix
