"""The plan and the open-loop schedule: deterministic, constant-rate, fair, protocol-valid."""

from __future__ import annotations

import itertools
import re
from collections import Counter

import pytest

from bench.__main__ import main
from bench.params import BenchParams, ParamError, parse_mix, parse_ports
from bench.plan import (
    CHURN,
    DM,
    GROUP,
    POST,
    build_plan,
    churn_interval_s,
    dm_conv,
    encode_body,
    group_from_title,
    group_title,
    parse_body,
    per_sender_rate,
    schedule,
)
from bench.runner import rate_ladder

USER_RE = re.compile(r"^[a-z0-9_]{1,32}$")


def test_users_are_valid_protocol_ids_unique_per_run() -> None:
    p = BenchParams(clients=1000)
    a, b = build_plan(p, "abc123"), build_plan(p, "zz9zz9")
    assert all(USER_RE.match(u) for u in a.users)
    assert len(set(a.users)) == 1000
    assert not set(a.users) & set(b.users)


def test_schedule_is_deterministic_and_constant_rate() -> None:
    plan = build_plan(BenchParams(clients=50, seed=3), "r")
    evs = list(schedule(plan, 3, 0, rate=200.0, seconds=2.0))
    assert evs == list(schedule(plan, 3, 0, rate=200.0, seconds=2.0))
    assert len(evs) == 400
    assert [e.k for e in evs] == list(range(400))
    assert [e.at_us for e in evs] == [j * 5000 for j in range(400)]  # exactly every 5 ms
    assert evs != list(schedule(plan, 3, 1, rate=200.0, seconds=2.0))  # phases differ


def test_dm_senders_cycle_evenly_and_write_to_their_group() -> None:
    plan = build_plan(BenchParams(clients=30, group_size=3), "r")
    evs = list(schedule(plan, 1, 0, rate=300.0, seconds=1.0))
    per_sender = Counter(e.actor for e in evs)
    assert set(per_sender.values()) == {10}  # 300 DMs over 30 senders, one per cycle each
    for e in evs:
        assert e.kind == DM and e.target in plan.partners[e.actor] and e.target != e.actor
    sizes = Counter(len(v) + 1 for v in plan.partners.values())
    assert set(sizes) == {3}


def test_a_lone_last_member_joins_the_previous_group() -> None:
    plan = build_plan(BenchParams(clients=5, group_size=2), "r")
    assert sorted(len(v) + 1 for v in plan.partners.values()) == [2, 2, 3, 3, 3]


def test_groups_are_consecutive_users_owner_first_and_a_lone_rest_joins_the_last() -> None:
    plan = build_plan(BenchParams(scenario="group", clients=25, group_size=10), "r")
    assert plan.groups == (tuple(range(10)), tuple(range(10, 20)), tuple(range(20, 25)))
    assert plan.group_of == {u: u // 10 for u in range(25)}
    assert plan.dm_users == () and plan.shares == {GROUP: 1.0}
    lone = build_plan(BenchParams(scenario="group", clients=21, group_size=10), "r")
    assert [len(g) for g in lone.groups] == [10, 11]


def test_every_member_sends_in_turn_to_its_own_group_owed_to_every_member() -> None:
    plan = build_plan(BenchParams(scenario="group", clients=30, group_size=10), "r")
    evs = list(schedule(plan, 1, 0, rate=60.0, seconds=2.0))
    assert len(evs) == 120
    assert set(Counter(e.actor for e in evs).values()) == {4}  # 120 messages over 30 members
    for e in evs:
        assert e.kind == GROUP and e.target == plan.group_of[e.actor]
        assert plan.recipients(e) == plan.groups[e.target]  # the sender's own copy too
    assert len({plan.conv(e) for e in evs}) == 3
    assert per_sender_rate(plan, 60.0) == 2.0


def test_group_titles_name_the_run_and_the_group_only() -> None:
    assert group_from_title("ab12", group_title("ab12", 7)) == 7
    for other in (group_title("ab1", 7), group_title("ab12x", 7), "bench ab12 g", "bench ab12 g7x", None, 7):
        assert group_from_title("ab12", other) is None


def test_fanout_plan() -> None:
    plan = build_plan(BenchParams(scenario="fanout", clients=100, followers=20), "r")
    assert len(plan.authors) == 10
    for a in plan.authors:
        assert len(plan.followers[a]) == 20 and a not in plan.followers[a]
    ev = next(schedule(plan, 1, 0, 10.0, 1.0))
    assert ev.kind == POST
    assert plan.recipients(ev) == (ev.actor, *plan.followers[ev.actor])
    assert plan.conv(ev) == f"feed:{plan.users[ev.actor]}"


def test_presence_churn_alternates_from_offline_at_a_fixed_interval() -> None:
    plan = build_plan(BenchParams(scenario="presence", clients=40, churners=10, watch=3), "r")
    assert len(plan.churners) == 10 and len(plan.watching) == 30
    assert all(len(w) == 3 for w in plan.watching.values())
    evs = list(schedule(plan, 1, 0, rate=20.0, seconds=3.0))
    by_user: dict[int, list[tuple[int, int]]] = {}
    for e in evs:
        assert e.kind == CHURN
        by_user.setdefault(e.actor, []).append((e.at_us, e.target))
    for changes in by_user.values():
        assert [t for _, t in changes] == [1, 0, 1, 0, 1, 0]
        gaps = {b[0] - a[0] for a, b in itertools.pairwise(changes)}
        assert gaps == {500_000}
    assert churn_interval_s(plan, 20.0) == 0.5
    some = evs[0]
    assert set(plan.recipients(some)) == {w for w, ws in plan.watching.items() if some.actor in ws}


def test_mixed_splits_clients_and_rate_by_share() -> None:
    plan = build_plan(BenchParams(scenario="mixed", clients=100, mix={"dm": 0.5, "fanout": 0.25,
                                                                       "presence": 0.25}), "r")
    assert len(plan.dm_users) == 50
    assert plan.shares == {DM: 0.5, POST: 0.25, CHURN: 0.25}
    kinds = Counter(e.kind for e in schedule(plan, 1, 0, rate=100.0, seconds=2.0))
    assert kinds == {DM: 100, POST: 50, CHURN: 50}
    groups = [set(plan.dm_users), set(plan.authors) | {f for fs in plan.followers.values() for f in fs},
              set(plan.churners) | set(plan.watching)]
    assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])


def test_per_sender_rate() -> None:
    plan = build_plan(BenchParams(clients=10), "r")
    assert per_sender_rate(plan, 100.0) == 10.0


def test_body_round_trip_padding_and_garbage() -> None:
    body = encode_body("run1", 2, 345, 1_700_000_000_000_000, 100)
    assert len(body) == 100
    tag = parse_body(body)
    assert tag == ("run1", 2, 345, 1_700_000_000_000_000)
    assert parse_body(encode_body("r", 0, 1, 5, 1)) == ("r", 0, 1, 5)  # never shorter than its header
    for junk in ("hello", "a.b.c.d.", 42, None, "r.x.1.2."):
        assert parse_body(junk) is None


def test_dm_conv_is_the_protocols_name() -> None:
    assert dm_conv("bob", "alice") == dm_conv("alice", "bob") == "dm:alice:bob"


def test_rate_ladder() -> None:
    assert rate_ladder(BenchParams(rate=50)) == [50.0]
    assert rate_ladder(BenchParams(rate=100, find_max=True, step_factor=2, max_rate=1000)) == [
        100.0, 200.0, 400.0, 800.0]
    assert len(rate_ladder(BenchParams(rate=1, find_max=True, max_steps=4))) == 4


@pytest.mark.parametrize("changes, message", [
    ({"scenario": "chat"}, "scenario"),
    ({"clients": 1}, "--clients"),
    ({"size": 5000}, "--size"),
    ({"target": "socketio", "scenario": "fanout"}, "dm scenario only"),
    ({"step_factor": 1.0}, "--step-factor"),
    ({"run_tag": "Bad-Tag"}, "--run-tag"),
    ({"scenario": "mixed", "mix": {"chat": 1.0}}, "--mix"),
    ({"scenario": "group", "clients": 600, "group_size": 501}, "at most 500 members"),
    ({"scenario": "group", "group_size": 1}, "--group-size must be at least 2"),
    ({"scenario": "group", "clients": 9, "group_size": 10}, "cannot fill one group"),
    ({"scenario": "group", "clients": 1001, "group_size": 500}, "leaves one user over"),
    ({"scenario": "group", "target": "socketio"}, "dm scenario only"),
    ({"scenario": "group", "driver": "go"}, "dm scenario only"),
])
def test_params_validation(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ParamError, match=message):
        BenchParams().with_(**changes).validate()


def test_a_group_over_the_protocols_cap_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["group", "--clients", "600", "--group-size", "600", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage:") and "a group holds at most 500 members" in err
    # The benchmark is a valid invocation.
    BenchParams(scenario="group", clients=500, group_size=500, rate=5, duration=60).validate()


def test_params_round_trip_and_parsers() -> None:
    p = BenchParams(urls=("http://a", "http://b"), mix={"dm": 1.0})
    assert BenchParams.from_dict(p.to_dict()) == p
    assert parse_mix("dm=0.5, fanout=0.5") == {"dm": 0.5, "fanout": 0.5}
    assert parse_ports("redis=6380,kafka=9093") == {"redis": 6380, "kafka": 9093}
    with pytest.raises(ParamError):
        parse_mix("dm")
    with pytest.raises(ParamError):
        parse_ports("redis=70000")
