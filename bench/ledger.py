"""Exact delivery accounting. Every acknowledged action owes one delivery to each of its
recipients; each owed delivery is classified delivered, duplicated or lost, and each
recipient's view of a conversation is checked for order.

The inputs are plain event records, so the accounting is the same for every target and can be
tested on synthetic streams.
"""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

from bench.latency import LatencyHistogram
from bench.plan import DM, GROUP

# The kinds whose every participant must see one conversation order (the protocol's promise).
ORDERED_KINDS = frozenset({DM, GROUP})
# The kinds also timed to their last recipient (`<kind>_last`): a group message is only read by
# the whole group once its slowest member has it.
TIMED_TO_LAST = frozenset({GROUP})


class Acked(NamedTuple):
    """An action the server acknowledged: a DM or post answered `ok`, a presence change performed
    (the connection welcomed, or closed). `warm` marks the warm-up: accounted, not timed."""

    k: int
    kind: str
    conv: str
    actor: int
    recipients: tuple[int, ...]
    sched_us: int
    ack_us: int
    warm: bool


class Failed(NamedTuple):
    """An action that was never acknowledged (an error reply, a timeout, a lost connection)."""

    k: int
    kind: str
    reason: str
    sched_us: int = 0


class Receipt(NamedTuple):
    """One copy of an action arriving at a recipient's connection, in arrival order."""

    k: int
    kind: str
    recipient: int
    recv_us: int


class Transition(NamedTuple):
    """A presence change as performed: `start_us` is when the connect or close began."""

    k: int
    user: int
    online: bool
    start_us: int


class PresenceSeen(NamedTuple):
    """A `presence` frame as a watcher received it."""

    watcher: int
    user: int
    online: bool
    recv_us: int


@dataclass
class Counts:
    """Counts of one kind of action (or of all). Deliveries are (action, recipient) pairs."""

    acked: int = 0
    failed: int = 0
    expected: int = 0
    delivered: int = 0
    lost: int = 0
    duplicated: int = 0
    extra_copies: int = 0
    reordered: int = 0
    order_mismatch: int = 0
    unacked_delivered: int = 0
    unexpected: int = 0

    def add(self, other: Counts) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class Accounting:
    """The classification of one phase. Latency histograms are named `<kind>` (deliveries to
    other users), `<kind>_echo` (the actor's own copy), `<kind>_ack` (scheduled time to ack) and,
    for a group message, `<kind>_last` (to the last other member's copy, one value per message
    that reached every member); all are measured from the scheduled time and exclude the
    warm-up."""

    total: Counts = field(default_factory=Counts)
    by_kind: dict[str, Counts] = field(default_factory=dict)
    latency: dict[str, LatencyHistogram] = field(default_factory=dict)
    lost_sample: list[tuple[int, int]] = field(default_factory=list)
    failed_reasons: dict[str, int] = field(default_factory=dict)

    def kind(self, name: str) -> Counts:
        return self.by_kind.setdefault(name, Counts())

    def hist(self, name: str) -> LatencyHistogram:
        return self.latency.setdefault(name, LatencyHistogram())

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total.to_dict(),
            "by_kind": {k: c.to_dict() for k, c in sorted(self.by_kind.items())},
            "latency_ms": {k: h.summary() for k, h in sorted(self.latency.items())},
            "lost_sample": [list(x) for x in self.lost_sample],
            "failed_reasons": dict(self.failed_reasons),
        }


LOST_SAMPLE = 20


def account(acked: Iterable[Acked], failed: Iterable[Failed], receipts: Iterable[Receipt]) -> Accounting:
    """Classify every owed delivery. `receipts` must be in arrival order for each recipient."""
    result = Accounting()
    by_k: dict[int, Acked] = {}
    for a in acked:
        by_k[a.k] = a
        c = result.kind(a.kind)
        c.acked += 1
        c.expected += len(a.recipients)
        if not a.warm:
            result.hist(f"{a.kind}_ack").record_us(a.ack_us - a.sched_us)
    reasons: Counter[str] = Counter()
    for f in failed:
        result.kind(f.kind).failed += 1
        reasons[f.reason] += 1
    result.failed_reasons = dict(reasons)

    copies: Counter[tuple[int, int]] = Counter()
    # (recipient, conv, actor) -> highest k seen so far: a lower k after it is a reorder.
    highest: dict[tuple[int, str, int], int] = {}
    views: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    view_kind: dict[str, str] = {}
    # A group message has up to 500 recipients: membership by set, not by scanning the tuple.
    members: dict[int, frozenset[int]] = {}
    # k -> the latest first copy at a recipient other than the actor (TIMED_TO_LAST kinds).
    last_us: dict[int, int] = {}
    for r in receipts:
        found = by_k.get(r.k)
        if found is None:
            result.kind(r.kind).unacked_delivered += 1
            continue
        a = found
        owed = members.get(a.k)
        if owed is None:
            owed = members[a.k] = frozenset(a.recipients)
        if r.recipient not in owed:
            result.kind(a.kind).unexpected += 1
            continue
        key = (r.k, r.recipient)
        copies[key] += 1
        if copies[key] > 1:
            continue
        if not a.warm:
            suffix = "_echo" if r.recipient == a.actor else ""
            result.hist(f"{a.kind}{suffix}").record_us(r.recv_us - a.sched_us)
            if a.kind in TIMED_TO_LAST and r.recipient != a.actor:
                last_us[a.k] = max(last_us.get(a.k, 0), r.recv_us)
        hk = (r.recipient, a.conv, a.actor)
        top = highest.get(hk)
        if top is not None and r.k < top:
            result.kind(a.kind).reordered += 1
        else:
            highest[hk] = r.k
        if a.kind in ORDERED_KINDS:
            views[a.conv][r.recipient].append(r.k)
            view_kind[a.conv] = a.kind

    for a in by_k.values():
        c = result.kind(a.kind)
        missing = 0
        for rcp in a.recipients:
            n = copies.get((a.k, rcp), 0)
            if n == 0:
                c.lost += 1
                missing += 1
                if len(result.lost_sample) < LOST_SAMPLE:
                    result.lost_sample.append((a.k, rcp))
            else:
                c.delivered += 1
                if n > 1:
                    c.duplicated += 1
                    c.extra_copies += n - 1
        # Timed to the last member only when every member has it: a loss is counted, not timed.
        if not missing and a.k in last_us:
            result.hist(f"{a.kind}_last").record_us(last_us[a.k] - a.sched_us)

    for conv, per_recipient in views.items():
        result.kind(view_kind[conv]).order_mismatch += order_mismatch(list(per_recipient.values()))

    for c in result.by_kind.values():
        result.total.add(c)
    return result


def order_mismatch(views: Sequence[Sequence[int]]) -> int:
    """How many messages each participant would have to move to see the conversation in the
    first participant's order (summed over participants; 0 when all agree)."""
    if len(views) < 2:
        return 0
    ref = {k: i for i, k in enumerate(views[0])}
    total = 0
    for view in views[1:]:
        positions = [ref[k] for k in view if k in ref]
        total += len(positions) - _longest_increasing(positions)
    return total


def _longest_increasing(xs: Sequence[int]) -> int:
    tails: list[int] = []
    for x in xs:
        i = bisect.bisect_left(tails, x)
        if i == len(tails):
            tails.append(x)
        else:
            tails[i] = x
    return len(tails)


def match_presence(
    transitions: Iterable[Transition], seen: Iterable[PresenceSeen]
) -> tuple[list[Receipt], int]:
    """Key each received `presence` frame to the change that caused it: the latest change of that
    user to that status begun before the frame arrived. Returns the receipts (a second frame for
    the same change is a duplicate, as for messages) and the count of frames no change explains.

    This needs changes of one user to be further apart than the presence latency (the harness
    warns when the schedule makes them closer than a second).
    """
    starts: dict[tuple[int, bool], list[tuple[int, int]]] = defaultdict(list)
    for t in transitions:
        starts[(t.user, t.online)].append((t.start_us, t.k))
    for lst in starts.values():
        lst.sort()
    receipts: list[Receipt] = []
    unexplained = 0
    for s in seen:
        changes = starts.get((s.user, s.online))
        if not changes:
            unexplained += 1
            continue
        i = bisect.bisect_right(changes, (s.recv_us, 1 << 62)) - 1
        if i < 0:
            unexplained += 1
            continue
        receipts.append(Receipt(changes[i][1], "presence", s.watcher, s.recv_us))
    return receipts, unexplained
