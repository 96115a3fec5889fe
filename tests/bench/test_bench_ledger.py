"""The accounting on synthetic event streams: loss, duplication, reorder, order disagreement,
warm-up, and presence matching."""

from __future__ import annotations

from pytest import approx

from bench.ledger import (
    Acked,
    Failed,
    PresenceSeen,
    Receipt,
    Transition,
    account,
    match_presence,
    order_mismatch,
)

CONV = "dm:a:b"
MS = 1000


def dm(k: int, sender: int = 0, to: int = 1, sched_ms: int = 0, warm: bool = False) -> Acked:
    return Acked(k, "dm", CONV, sender, (sender, to), sched_ms * MS, (sched_ms + 5) * MS, warm)


def got(k: int, recipient: int, at_ms: int) -> Receipt:
    return Receipt(k, "dm", recipient, at_ms * MS)


def both(k: int, at_ms: int) -> list[Receipt]:
    return [got(k, 0, at_ms), got(k, 1, at_ms)]


def test_everything_delivered() -> None:
    acked = [dm(k, sched_ms=10 * k) for k in range(5)]
    receipts = [r for k in range(5) for r in both(k, 10 * k + 3)]
    acc = account(acked, [], receipts)
    c = acc.total
    assert (c.acked, c.expected, c.delivered, c.lost, c.duplicated, c.reordered) == (5, 10, 10, 0, 0, 0)
    assert acc.hist("dm").count == 5 and acc.hist("dm_echo").count == 5
    assert acc.hist("dm").percentile_ms(50) == approx(3.0, rel=1e-3)
    assert acc.hist("dm_ack").percentile_ms(99) == approx(5.0, rel=1e-3)


def test_a_missing_copy_is_lost_for_that_recipient_only() -> None:
    acked = [dm(0), dm(1)]
    receipts = [*both(0, 1), got(1, 0, 2)]  # the recipient (1) never gets message 1
    acc = account(acked, [], receipts)
    assert acc.total.lost == 1
    assert acc.total.delivered == 3
    assert acc.lost_sample == [(1, 1)]


def test_a_second_copy_is_a_duplicate_timed_once() -> None:
    acked = [dm(0)]
    receipts = [*both(0, 4), got(0, 1, 9)]
    acc = account(acked, [], receipts)
    c = acc.total
    assert (c.delivered, c.duplicated, c.extra_copies, c.lost) == (2, 1, 1, 0)
    assert acc.hist("dm").count == 1 and acc.hist("dm").max_ms() == approx(4.0, rel=1e-3)


def test_a_senders_later_message_before_its_earlier_one_is_reordered() -> None:
    acked = [dm(k) for k in range(4)]
    order_at_1 = [0, 2, 1, 3]
    receipts = [got(k, 0, k) for k in range(4)] + [got(k, 1, i) for i, k in enumerate(order_at_1)]
    acc = account(acked, [], receipts)
    assert acc.total.reordered == 1
    # The two participants also disagree on the conversation's order by one message.
    assert acc.by_kind["dm"].order_mismatch == 1
    assert acc.total.lost == 0


def test_two_senders_interleaving_is_not_a_reorder_but_disagreement_is_caught() -> None:
    # a (0) sends k=0, b (1) sends k=1: each side may see them in either order...
    acked = [dm(0, sender=0, to=1), dm(1, sender=1, to=0)]
    same = [got(0, 0, 1), got(1, 0, 2), got(0, 1, 1), got(1, 1, 2)]
    acc = account(acked, [], same)
    assert acc.total.reordered == 0 and acc.by_kind["dm"].order_mismatch == 0
    # ...but both participants must see the same order.
    differ = [got(0, 0, 1), got(1, 0, 2), got(1, 1, 1), got(0, 1, 2)]
    acc = account(acked, [], differ)
    assert acc.total.reordered == 0 and acc.by_kind["dm"].order_mismatch == 1


def test_warm_up_is_accounted_not_timed() -> None:
    acked = [dm(0, warm=True), dm(1)]
    receipts = [*both(0, 1), got(1, 0, 2)]
    acc = account(acked, [], receipts)
    assert acc.total.lost == 1
    assert acc.hist("dm").count == 0  # message 1 never reached its recipient; 0 is warm-up
    assert acc.hist("dm_echo").count == 1
    assert acc.hist("dm_ack").count == 1


def test_failed_actions_unacked_arrivals_and_strangers() -> None:
    acked = [dm(0)]
    failed = [Failed(1, "dm", "timeout"), Failed(2, "dm", "timeout"), Failed(3, "post", "connection_lost")]
    receipts = [*both(0, 1), got(1, 1, 2), got(0, 7, 3)]  # k=1 was never acked; 7 is no participant
    acc = account(acked, failed, receipts)
    assert acc.by_kind["dm"].failed == 2 and acc.by_kind["post"].failed == 1
    assert acc.failed_reasons == {"timeout": 2, "connection_lost": 1}
    assert acc.by_kind["dm"].unacked_delivered == 1
    assert acc.by_kind["dm"].unexpected == 1
    assert acc.total.lost == 0


def test_kinds_are_counted_apart_and_summed() -> None:
    post = Acked(5, "post", "feed:a", 0, (0, 1, 2), 0, 1000, False)
    acc = account([dm(0), post], [], [*both(0, 1), Receipt(5, "post", 1, 3000), Receipt(5, "post", 0, 2000)])
    assert acc.by_kind["post"].lost == 1 and acc.by_kind["dm"].lost == 0
    assert acc.total.expected == 5 and acc.total.lost == 1
    assert acc.hist("post").count == 1 and acc.hist("post_echo").count == 1
    d = acc.to_dict()
    assert d["total"]["lost"] == 1 and "post" in d["by_kind"]
    assert d["latency_ms"]["post"]["p50"] == approx(3.0, rel=1e-3)


def test_order_mismatch_counts_moves() -> None:
    assert order_mismatch([[1, 2, 3], [1, 2, 3]]) == 0
    assert order_mismatch([[1, 2, 3, 4], [4, 1, 2, 3]]) == 1
    assert order_mismatch([[1, 2, 3], [3, 2, 1], [1, 3]]) == 2
    assert order_mismatch([[1, 2], [3, 4]]) == 0  # nothing in common, nothing to compare
    assert order_mismatch([[1]]) == 0


def test_presence_frames_match_the_latest_change_before_them() -> None:
    transitions = [
        Transition(0, 5, True, 100 * MS),
        Transition(3, 5, False, 600 * MS),
        Transition(7, 5, True, 1100 * MS),
    ]
    seen = [
        PresenceSeen(9, 5, True, 150 * MS),  # -> k 0
        PresenceSeen(9, 5, False, 640 * MS),  # -> k 3
        PresenceSeen(9, 5, False, 650 * MS),  # -> k 3 again: a duplicate
        PresenceSeen(9, 5, True, 90 * MS),  # before any change online: unexplained
        PresenceSeen(9, 6, True, 150 * MS),  # a user nobody changed: unexplained
    ]
    receipts, unexplained = match_presence(transitions, seen)
    assert [r.k for r in receipts] == [0, 3, 3]
    assert unexplained == 2
    acked = [Acked(t.k, "presence", "presence:u5", 5, (9,), t.start_us, t.start_us + 1, False)
             for t in transitions]
    acc = account(acked, [], receipts)
    c = acc.by_kind["presence"]
    assert (c.delivered, c.duplicated, c.lost) == (2, 1, 1)  # the last change never reached 9
    assert acc.hist("presence").percentile_ms(100) == approx(50.0, rel=1e-3)


GROUP_CONV = "group:g0"
MEMBERS = (0, 1, 2, 3)


def group_msg(k: int, sender: int = 0, sched_ms: int = 0, warm: bool = False) -> Acked:
    return Acked(k, "group", GROUP_CONV, sender, MEMBERS, sched_ms * MS, (sched_ms + 5) * MS, warm)


def member_got(k: int, member: int, at_ms: int) -> Receipt:
    return Receipt(k, "group", member, at_ms * MS)


def test_a_group_message_is_owed_to_every_member_and_timed_to_each_and_to_the_last() -> None:
    acked = [group_msg(0, sender=1, sched_ms=0)]
    receipts = [member_got(0, 1, 2), member_got(0, 0, 10), member_got(0, 2, 20), member_got(0, 3, 40)]
    acc = account(acked, [], receipts)
    c = acc.by_kind["group"]
    assert (c.acked, c.expected, c.delivered, c.lost) == (1, 4, 4, 0)
    assert acc.hist("group").count == 3  # the three other members
    assert acc.hist("group_echo").count == 1 and acc.hist("group_echo").max_ms() == approx(2.0, rel=1e-3)
    assert acc.hist("group").percentile_ms(50) == approx(20.0, rel=1e-3)
    assert acc.hist("group_last").count == 1
    assert acc.hist("group_last").max_ms() == approx(40.0, rel=1e-3)  # the slowest member


def test_a_member_missing_a_group_message_is_one_loss_and_the_message_not_timed_to_the_last() -> None:
    acked = [group_msg(0), group_msg(1, sched_ms=10)]
    receipts = [member_got(0, m, 5) for m in MEMBERS] + [member_got(1, m, 15) for m in (0, 1, 2)]
    receipts.append(member_got(1, 2, 16))  # and member 2 gets message 1 twice
    acc = account(acked, [], receipts)
    c = acc.by_kind["group"]
    assert (c.expected, c.delivered, c.lost, c.duplicated) == (8, 7, 1, 1)
    assert acc.lost_sample == [(1, 3)]
    assert acc.hist("group_last").count == 1  # message 0 only
    assert acc.hist("group").count == 5


def test_group_members_who_disagree_on_the_order_are_counted_for_groups() -> None:
    acked = [group_msg(0, sender=0), group_msg(1, sender=1)]
    same = [member_got(k, m, k) for m in MEMBERS for k in (0, 1)]
    assert account(acked, [], same).by_kind["group"].order_mismatch == 0
    differ = [member_got(k, m, k) for m in (0, 1, 2) for k in (0, 1)] + [member_got(1, 3, 0),
                                                                         member_got(0, 3, 1)]
    acc = account(acked, [], differ)
    assert acc.by_kind["group"].order_mismatch == 1 and acc.by_kind["group"].reordered == 0
    assert "dm" not in acc.by_kind


def test_a_non_member_receiving_a_group_message_is_unexpected() -> None:
    acc = account([group_msg(0)], [], [*(member_got(0, m, 1) for m in MEMBERS), member_got(0, 9, 1)])
    assert acc.by_kind["group"].unexpected == 1 and acc.total.delivered == 4
