"""The load plan: who the simulated users are, who talks to, follows and watches whom, and the
open-loop schedule of what they do and when.

Everything here is a pure function of the parameters, the seed and the run tag, so every load
process computes the same plan and the same schedule and picks out its own users' actions.
"""

from __future__ import annotations

import heapq
import random
import string
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from bench.params import BenchParams

# Action kinds. A `dm`, a `post` and a `group` message carry a body; a `presence` change connects
# (target 1) or closes (target 0) the actor's connection. A `group` message's target is the index
# of the actor's group in `Plan.groups`.
DM = "dm"
POST = "post"
CHURN = "presence"
GROUP = "group"
KINDS = (DM, POST, CHURN, GROUP)

# The kinds each scenario's rate is spent on, by share.
_SCENARIO_SHARES: dict[str, dict[str, float]] = {
    "dm": {DM: 1.0},
    "fanout": {POST: 1.0},
    "presence": {CHURN: 1.0},
    # Every connection of `connections` may take part in its DMs after the hold.
    "connections": {DM: 1.0},
    "group": {GROUP: 1.0},
}
_MIX_KIND = {"dm": DM, "fanout": POST, "presence": CHURN}

US = 1_000_000

# (offset us, kind, actor, target) before the merged schedule numbers it
_Action = tuple[int, str, int, int]


class Event(NamedTuple):
    """One scheduled action. `k` is its index in the phase's schedule and the identity of the
    message (or presence change) it produces; `at_us` is its offset from the phase's start."""

    k: int
    at_us: int
    kind: str
    actor: int
    target: int


class BodyTag(NamedTuple):
    """What a message body tells its receiver: whose run and phase it belongs to, which scheduled
    action made it, and when that action was scheduled (epoch microseconds)."""

    run: str
    phase: int
    k: int
    sched_us: int


@dataclass(frozen=True)
class Plan:
    """The simulated population of one run and its relations. Users are named by index."""

    run: str
    users: tuple[str, ...]
    dm_users: tuple[int, ...]
    partners: dict[int, tuple[int, ...]]
    authors: tuple[int, ...]
    followers: dict[int, tuple[int, ...]]
    churners: tuple[int, ...]
    watching: dict[int, tuple[int, ...]]
    watchers: dict[int, tuple[int, ...]]
    shares: dict[str, float]
    # `group`: each group's members (its owner first), and each member's group index.
    groups: tuple[tuple[int, ...], ...] = ()
    group_of: dict[int, int] = field(default_factory=dict)

    @property
    def always_connected(self) -> tuple[int, ...]:
        """Users connected for the whole run (everyone but the presence churners)."""
        churning = set(self.churners)
        return tuple(i for i in range(len(self.users)) if i not in churning)

    def recipients(self, ev: Event) -> tuple[int, ...]:
        """Whose connections must see the event: a DM's both participants (the sender's own inbox
        too), a post's author and followers, a group message's every member (the sender too), a
        presence change's watchers."""
        if ev.kind == DM:
            return (ev.actor, ev.target)
        if ev.kind == POST:
            return (ev.actor, *self.followers.get(ev.actor, ()))
        if ev.kind == GROUP:
            return self.groups[ev.target]
        return self.watchers.get(ev.actor, ())

    def conv(self, ev: Event) -> str:
        """The stream within which order is judged: the DM conversation (`dm:a:b`, as the protocol
        names it), the group (by its index: the server names it `g:ID` only when it is made), the
        author's posts, or the user's presence."""
        if ev.kind == DM:
            return dm_conv(self.users[ev.actor], self.users[ev.target])
        if ev.kind == GROUP:
            return f"group:g{ev.target}"
        if ev.kind == POST:
            return f"feed:{self.users[ev.actor]}"
        return f"presence:{self.users[ev.actor]}"

    def user_index(self) -> dict[str, int]:
        return {u: i for i, u in enumerate(self.users)}


def dm_conv(a: str, b: str) -> str:
    lo, hi = sorted((a, b))
    return f"dm:{lo}:{hi}"


def group_title(run: str, g: int) -> str:
    """The title of the run's group `g`: how every load process recognises the group's `note`."""
    return f"bench {run} g{g}"


def group_from_title(run: str, title: object) -> int | None:
    """The index of the run's group that `title` names, or None for any other title."""
    prefix = f"bench {run} g"
    if not isinstance(title, str) or not title.startswith(prefix):
        return None
    digits = title[len(prefix):]
    return int(digits) if digits.isdigit() else None


def chunk_groups(members: list[int], size: int) -> list[list[int]]:
    """`members` in consecutive groups of `size`; a shorter rest is a group of its own, except a
    lone last member, who joins the group before it (nobody chats alone)."""
    groups = [members[i:i + size] for i in range(0, len(members), size)]
    if len(groups) > 1 and len(groups[-1]) < 2:
        groups[-2].extend(groups.pop())
    return groups


def new_run_tag(rng: random.Random | None = None) -> str:
    """A fresh tag that keeps this run's users, inboxes and idempotency keys apart from every
    earlier run against the same server."""
    r = rng or random.SystemRandom()
    return "".join(r.choice(string.ascii_lowercase + string.digits) for _ in range(6))


def user_name(run: str, i: int) -> str:
    # Matches the protocol's ^[a-z0-9_]{1,32}$: "b" + tag (<= 8) + "_" + index.
    return f"b{run}_{i}"


def _split(n: int, shares: dict[str, float]) -> dict[str, int]:
    """Split n users over the nonzero shares, at least 2 each, the rest by share."""
    live = {k: v for k, v in shares.items() if v > 0}
    if n < 2 * len(live):
        raise ValueError(f"{n} clients cannot be split over {len(live)} workloads (2 each at least)")
    total = sum(live.values())
    counts = {k: max(2, int(n * v / total)) for k, v in live.items()}
    # Hand out (or take back) the rounding remainder, largest share first.
    order = sorted(live, key=lambda k: -live[k])
    i = 0
    while sum(counts.values()) != n:
        k = order[i % len(order)]
        if sum(counts.values()) < n:
            counts[k] += 1
        elif counts[k] > 2:
            counts[k] -= 1
        i += 1
    return counts


def build_plan(params: BenchParams, run: str) -> Plan:
    """The population for `params`: deterministic given the seed (the run tag only names it)."""
    n = params.clients
    users = tuple(user_name(run, i) for i in range(n))
    rng = random.Random(f"plan:{params.seed}")
    if params.scenario == "mixed":
        kind_shares = {_MIX_KIND[k]: v for k, v in params.mix.items() if v > 0}
    else:
        kind_shares = dict(_SCENARIO_SHARES[params.scenario])
    counts = _split(n, kind_shares)
    pools: dict[str, list[int]] = {}
    start = 0
    for kind in KINDS:
        if kind in counts:
            pools[kind] = list(range(start, start + counts[kind]))
            start += counts[kind]

    partners: dict[int, tuple[int, ...]] = {}
    dm_users = pools.get(DM, [])
    if dm_users:
        shuffled = dm_users[:]
        rng.shuffle(shuffled)
        for group in chunk_groups(shuffled, params.group_size):
            for member in group:
                partners[member] = tuple(m for m in group if m != member)

    # Consecutive users, not shuffled: with users split over load processes by index modulo the
    # count, every group then spans every process evenly.
    groups = chunk_groups(pools.get(GROUP, []), params.group_size)

    authors: list[int] = []
    followers: dict[int, tuple[int, ...]] = {}
    fan_pool = pools.get(POST, [])
    if fan_pool:
        n_authors = params.authors or max(1, len(fan_pool) // 10)
        n_authors = min(n_authors, len(fan_pool) - 1)
        n_follow = min(params.followers, len(fan_pool) - 1)
        shuffled = fan_pool[:]
        rng.shuffle(shuffled)
        authors = sorted(shuffled[:n_authors])
        for a in authors:
            others = [u for u in fan_pool if u != a]
            followers[a] = tuple(sorted(rng.sample(others, n_follow)))

    churners: list[int] = []
    watching: dict[int, tuple[int, ...]] = {}
    watchers: dict[int, list[int]] = {}
    pres_pool = pools.get(CHURN, [])
    if pres_pool:
        n_churn = params.churners or max(1, len(pres_pool) // 2)
        n_churn = min(n_churn, len(pres_pool) - 1)
        shuffled = pres_pool[:]
        rng.shuffle(shuffled)
        churners = sorted(shuffled[:n_churn])
        n_watch = min(params.watch, len(churners), 1000)
        for w in sorted(shuffled[n_churn:]):
            watched = tuple(sorted(rng.sample(churners, n_watch)))
            watching[w] = watched
            for c in watched:
                watchers.setdefault(c, []).append(w)

    total = sum(kind_shares.values())
    return Plan(
        run=run,
        users=users,
        dm_users=tuple(dm_users),
        partners=partners,
        authors=tuple(authors),
        followers=followers,
        churners=tuple(churners),
        watching=watching,
        watchers={c: tuple(ws) for c, ws in watchers.items()},
        shares={k: v / total for k, v in kind_shares.items()},
        groups=tuple(tuple(g) for g in groups),
        group_of={m: g for g, members in enumerate(groups) for m in members},
    )


def _constant_rate(rate: float, seconds: float) -> Iterator[int]:
    """Offsets (us) of a constant-rate arrival process: the j-th action at j / rate."""
    count = int(rate * seconds + 1e-9)
    for j in range(count):
        yield round(j * US / rate)


def _cycles(users: tuple[int, ...], rng: random.Random) -> Iterator[int]:
    """Every user once per cycle, in a fresh random order each cycle: each acts at the same mean
    rate, with no bursts beyond two actions back to back at a cycle boundary."""
    order = list(users)
    while True:
        rng.shuffle(order)
        yield from order


def _dm_stream(plan: Plan, rate: float, seconds: float, rng: random.Random) -> Iterator[_Action]:
    senders = _cycles(plan.dm_users, rng)
    for at in _constant_rate(rate, seconds):
        s = next(senders)
        yield at, DM, s, rng.choice(plan.partners[s])


def _group_stream(plan: Plan, rate: float, seconds: float, rng: random.Random) -> Iterator[_Action]:
    # Every member of every group takes its turn, so each group gets messages in proportion to
    # its size and every member sends at the same rate.
    senders = _cycles(tuple(plan.group_of), rng)
    for at in _constant_rate(rate, seconds):
        s = next(senders)
        yield at, GROUP, s, plan.group_of[s]


def _post_stream(plan: Plan, rate: float, seconds: float, rng: random.Random) -> Iterator[_Action]:
    authors = _cycles(plan.authors, rng)
    for at in _constant_rate(rate, seconds):
        yield at, POST, next(authors), -1


def _churn_stream(plan: Plan, rate: float, seconds: float, rng: random.Random) -> Iterator[_Action]:
    # A fixed order, so each churner toggles exactly every len(churners) / rate seconds; every
    # churner starts the phase offline, so its first action connects.
    order = list(plan.churners)
    rng.shuffle(order)
    online = dict.fromkeys(order, False)
    for j, at in enumerate(_constant_rate(rate, seconds)):
        c = order[j % len(order)]
        online[c] = not online[c]
        yield at, CHURN, c, int(online[c])


def _shifted(stream: Iterator[_Action], by_us: int) -> Iterator[_Action]:
    for at, kind, actor, target in stream:
        yield at + by_us, kind, actor, target


def schedule(plan: Plan, seed: int, phase: int, rate: float, seconds: float,
             burst: tuple[float, float, float] | None = None) -> Iterator[Event]:
    """The phase's actions in time order, `rate` per second in total over `seconds`.

    `burst` (start s, length s, factor) raises the DM rate to `factor` times `rate` for that
    window (chaos mode's burst): the extra DMs come from their own stream, so the rest of the
    schedule is the same as without it.
    """
    streams = []
    makers = {DM: _dm_stream, POST: _post_stream, CHURN: _churn_stream, GROUP: _group_stream}
    for kind in KINDS:
        share = plan.shares.get(kind, 0.0)
        if share > 0:
            rng = random.Random(f"schedule:{seed}:{phase}:{kind}")
            streams.append(makers[kind](plan, rate * share, seconds, rng))
    if burst is not None and plan.shares.get(DM, 0.0) > 0:
        start_s, length_s, factor = burst
        length_s = max(0.0, min(length_s, seconds - start_s))
        if factor > 1 and length_s > 0:
            rng = random.Random(f"schedule:{seed}:{phase}:burst")
            extra = rate * plan.shares[DM] * (factor - 1)
            streams.append(_shifted(_dm_stream(plan, extra, length_s, rng), round(start_s * US)))
    for k, (at, kind, actor, target) in enumerate(heapq.merge(*streams, key=lambda e: e[0])):
        yield Event(k, at, kind, actor, target)


def churn_interval_s(plan: Plan, rate: float) -> float:
    """Seconds between two changes of the same churner (inf when there is no churn)."""
    churn_rate = rate * plan.shares.get(CHURN, 0.0)
    if churn_rate <= 0 or not plan.churners:
        return float("inf")
    return len(plan.churners) / churn_rate


def per_sender_rate(plan: Plan, rate: float) -> float:
    """Frames per second each DM sender, group member or author sends (the server limits each
    connection)."""
    rates = []
    if plan.dm_users:
        rates.append(rate * plan.shares.get(DM, 0.0) / len(plan.dm_users))
    if plan.group_of:
        rates.append(rate * plan.shares.get(GROUP, 0.0) / len(plan.group_of))
    if plan.authors:
        rates.append(rate * plan.shares.get(POST, 0.0) / len(plan.authors))
    return max(rates, default=0.0)


_SEP = "."


def encode_body(run: str, phase: int, k: int, sched_us: int, size: int) -> str:
    """A message body that names its action and carries its scheduled time, padded to `size`
    characters (the header alone when it is longer than `size`)."""
    head = f"{run}{_SEP}{phase}{_SEP}{k}{_SEP}{sched_us}{_SEP}"
    return head + "x" * max(0, size - len(head))


def parse_body(body: object) -> BodyTag | None:
    """The tag of a body made by `encode_body`, or None for anything else."""
    if not isinstance(body, str):
        return None
    parts = body.split(_SEP, 4)
    if len(parts) != 5:
        return None
    try:
        return BodyTag(parts[0], int(parts[1]), int(parts[2]), int(parts[3]))
    except ValueError:
        return None
