"""The topics PeerNet creates, with explicit partition counts and settings."""

from __future__ import annotations

from bus.eventlog import TopicSpec
from peernet.config import PeerNetConfig


def peernet_topics(cfg: PeerNetConfig) -> list[TopicSpec]:
    t = cfg.topics
    rf = t.replication_factor
    # min.insync.replicas: with acks=all, a write needs this many replicas; 1 on a one-node stack.
    isr = str(max(1, min(2, rf - 1))) if rf > 1 else "1"
    return [
        # The event log: kept for ever, so that any state can be rebuilt by replaying it.
        TopicSpec(t.events, t.events_partitions, rf,
                  (("retention.ms", "-1"), ("min.insync.replicas", isr))),
        # Each user's inbox, keyed by user/slot and compacted: the newest `inbox_slots` items of
        # every user stay for ever (see actors/session.py).
        TopicSpec(t.inbox, t.inbox_partitions, rf,
                  (("cleanup.policy", "compact"), ("min.insync.replicas", isr))),
    ]
