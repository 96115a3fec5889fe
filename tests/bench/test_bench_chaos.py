"""Chaos mode's logic on synthetic streams: which faults parse, how the burst changes the
schedule, how recovery is timed and a fault judged, and which processes a fault may kill."""

from __future__ import annotations

import pytest

from bench.chaos import (
    FAULTS,
    FaultEvent,
    ProcInfo,
    is_worker_raylet,
    judge,
    parse_faults,
    pick_processes,
    projections_lag,
    recovery_time,
)
from bench.client import DISCONNECTED, ConnStats, ReconnectingConnection, RequestFailed
from bench.ledger import Acked, Failed, Receipt
from bench.params import BenchParams, ParamError
from bench.plan import DM, build_plan, schedule

S = 1_000_000  # microseconds


def acked(k: int, sched_s: float, recipients: tuple[int, ...] = (1, 0)) -> Acked:
    return Acked(k, DM, "c", 0, recipients, int(sched_s * S), int(sched_s * S) + 1000, False)


def got(k: int, recipient: int, at_s: float) -> Receipt:
    return Receipt(k, DM, recipient, int(at_s * S))


def both(k: int, at_s: float) -> list[Receipt]:
    return [got(k, 1, at_s), got(k, 0, at_s)]


def test_parse_faults() -> None:
    assert parse_faults("all") == tuple(f for f in FAULTS if f != "node")
    assert parse_faults("node") == ("node",)
    assert parse_faults("kafka, burst") == ("kafka", "burst")
    for bad in ("", "kafka,nope", "all,kafka"):
        with pytest.raises(ValueError):
            parse_faults(bad)


def test_chaos_params_are_checked() -> None:
    ok = BenchParams(chaos=("kafka",), warmup=2, duration=20, fault_at=4)
    assert ok.validate() is ok
    bad = [
        dict(scenario="fanout"),
        dict(find_max=True),
        dict(fault_at=30),
        dict(chaos=("mongo",), mongo_down=30),       # 4 + 30 > 22
        dict(chaos=("burst",), burst_s=20),          # 4 + 20 > 22
        dict(burst_factor=1.0),
    ]
    for change in bad:
        with pytest.raises(ParamError):
            ok.with_(**change).validate()


def test_burst_adds_dms_in_its_window_only_and_keeps_the_rest_of_the_schedule() -> None:
    plan = build_plan(BenchParams(clients=40), "r")
    plain = list(schedule(plan, 1, 0, rate=10.0, seconds=10.0))
    burst = list(schedule(plan, 1, 0, rate=10.0, seconds=10.0, burst=(4.0, 2.0, 10.0)))
    assert len(plain) == 100
    assert len(burst) == 100 + 180                      # 9 x 10/s extra for 2 s
    inside = [e for e in burst if 4 * S <= e.at_us < 6 * S]
    assert len(inside) == 200
    assert [e.at_us for e in burst] == sorted(e.at_us for e in burst)
    assert sorted(e.k for e in burst) == list(range(len(burst)))
    # The base stream is unchanged: same times, same senders and partners.
    base = {(e.at_us, e.actor, e.target) for e in plain}
    assert base <= {(e.at_us, e.actor, e.target) for e in burst}
    # A window past the phase is cut at its end.
    late = list(schedule(plan, 1, 0, rate=10.0, seconds=10.0, burst=(9.0, 5.0, 2.0)))
    assert len(late) == 100 + 10


def test_recovery_without_disturbance_is_zero() -> None:
    a = [acked(k, 10 + k) for k in range(5)]
    r = [x for k in range(5) for x in both(k, 10 + k + 0.05)]
    assert recovery_time(a, [], r, injected_us=10 * S) == 0.0


def test_recovery_is_the_first_good_arrival_after_the_last_disturbed_action() -> None:
    a = [acked(0, 9.0), acked(1, 10.5), acked(2, 11.0), acked(4, 13.0), acked(5, 14.0)]
    r = (both(0, 9.02)                      # before the injection: ignored
         + both(1, 13.5)                    # 3 s late: disturbed
         + both(2, 11.05)                   # fine, but before a later disturbance
         + both(4, 13.6)                    # 0.6 s: fine
         + both(5, 14.1))
    failed = [Failed(3, DM, "unavailable", int(12.0 * S))]   # the last disturbed one
    assert recovery_time(a, failed, r, injected_us=10 * S) == pytest.approx(3.6)


def test_a_missing_copy_is_a_disturbance() -> None:
    a = [acked(0, 10.5), acked(1, 11.0)]
    r = [got(0, 1, 10.6), *both(1, 11.1)]   # recipient 0 never got k=0
    assert recovery_time(a, [], r, injected_us=10 * S) == pytest.approx(1.1)


def test_still_disturbed_at_the_end_is_not_recovered() -> None:
    a = [acked(0, 10.5)]
    failed = [Failed(1, DM, "timeout", int(11 * S))]
    assert recovery_time(a, failed, both(0, 10.6), injected_us=10 * S) is None


def test_judge_passes_only_with_no_loss_no_silence_and_recovery() -> None:
    ev = FaultEvent("kafka", injected_us=10 * S, repaired_us=15 * S, detail="pid 1 SIGKILLed")
    a = [acked(0, 10.5), acked(1, 16.0)]
    r = both(0, 10.6) + both(1, 16.1)
    unavailable = [Failed(2, DM, "unavailable", int(12 * S))]
    good = judge(ev, a, unavailable, r, expected=4, delivered=4, lost=0, duplicated=0)
    assert good.ok and good.recovery_s == pytest.approx(6.1)
    assert good.failed == {"unavailable": 1} and ev.repair_s == 5.0
    assert good.to_dict()["verdict"].startswith("ok: 0 lost")

    silent = [Failed(2, DM, "timeout", int(12 * S))]
    quiet = judge(ev, a, silent, r, expected=4, delivered=4, lost=0, duplicated=0)
    assert not quiet.ok and "never answered" in quiet.verdict

    cut_off = [Failed(2, DM, DISCONNECTED, int(12 * S))]
    alone = judge(ev, a, cut_off, r, expected=4, delivered=4, lost=0, duplicated=0)
    assert not alone.ok and "found no server" in alone.verdict

    lossy = judge(ev, a, [], r, expected=4, delivered=3, lost=1, duplicated=0)
    assert not lossy.ok and "1 lost" in lossy.verdict

    broken = judge(FaultEvent("kafka", error="StackError: not running"), a, [], r,
                   expected=4, delivered=4, lost=0, duplicated=0)
    assert not broken.ok and "injection failed" in broken.verdict


def test_pick_processes_takes_the_targets_cluster_and_title_only() -> None:
    mine = "/x/raylet --gcs-address=10.0.0.1:6000 --node-manager-port=1"
    other = "/x/raylet --gcs-address=10.0.0.1:7000"
    procs = [
        ProcInfo(30, "ray::SessionShardActor", mine),
        ProcInfo(20, "ray::SessionShardActor.process", mine),
        ProcInfo(40, "ray::SessionShardActor", other),
        ProcInfo(50, "ray::SessionShardActorX", mine),
        ProcInfo(60, "ray::ServeReplica:peernet:Gateway", mine),
        ProcInfo(70, "ray::IDLE", mine),
    ]
    assert pick_processes(procs, "ray::SessionShardActor", "10.0.0.1:6000") == [20, 30]
    assert pick_processes(procs, "ray::ServeReplica:peernet:Gateway", "10.0.0.1:6000") == [60]
    assert pick_processes(procs, "ray::SessionShardActor", "10.0.0.1:60") == []


def test_projections_lag_sums_the_projector_group_only() -> None:
    text = "\n".join([
        "# HELP peernet_kafka_consumer_lag records behind",
        'peernet_kafka_consumer_lag{group="peernet.projections@peernet.events",partition="0",topic="t"} 4.0',
        'peernet_kafka_consumer_lag{group="peernet.projections@peernet.events",partition="1",topic="t"} 6.0',
        'peernet_kafka_consumer_lag{group="peernet.sessions.0-of-2@e",partition="0",topic="t"} 99.0',
    ])
    assert projections_lag(text) == 10.0
    assert projections_lag("peernet_up 1") is None


def test_a_projection_that_never_caught_up_fails_the_fault() -> None:
    ev = FaultEvent("mongo", injected_us=10 * S, repaired_us=40 * S,
                    catch_up_note="projections not caught up within 180 s")
    a = [acked(0, 10.5)]
    out = judge(ev, a, [], both(0, 10.6), expected=2, delivered=2, lost=0, duplicated=0)
    assert not out.ok and "not caught up" in out.verdict
    ev.catch_up_note, ev.caught_up_us = "", 45 * S
    out = judge(ev, a, [], both(0, 10.6), expected=2, delivered=2, lost=0, duplicated=0)
    assert out.ok and out.to_dict()["projections_caught_up_after_s"] == 35.0


def test_worker_raylets_are_the_clusters_non_head_raylets() -> None:
    gcs = "10.0.0.1:6390"
    worker = ["/x/ray/core/src/ray/raylet/raylet", "--gcs-address=10.0.0.1:6390", "--node_name=b"]
    head = [*worker, "--head"]
    assert is_worker_raylet(worker, gcs)
    assert not is_worker_raylet(head, gcs)
    assert not is_worker_raylet(worker, "10.0.0.1:639")
    assert not is_worker_raylet(["/x/gcs_server", "--gcs-address=10.0.0.1:6390"], gcs)
    assert not is_worker_raylet([], gcs)


async def test_a_request_with_no_connection_to_send_it_on_fails_as_disconnected() -> None:
    """Apart from silence on an open connection: the client never had a server to ask."""
    conn = ReconnectingConnection(0, "u0", lambda index, frame, at_us: None, ConnStats(), 0.05)
    with pytest.raises(RequestFailed) as failed:
        await conn.request({"t": "dm", "to": "u1", "body": "x"}, idempotent=True)
    assert failed.value.reason == DISCONNECTED
