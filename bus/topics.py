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
        # The messages of conversations, keyed by conversation (one order each), kept for ever.
        TopicSpec(t.messages, t.messages_partitions, rf,
                  (("retention.ms", "-1"), ("min.insync.replicas", isr))),
        # Each user's durable inbox, keyed by user (one partition holds a user's items in seq
        # order). Kept for ever like the event log: never compacted, since compaction would keep
        # only each user's newest item. The Redis cache applies the retention of the protocol.
        TopicSpec(t.inbox, t.inbox_partitions, rf,
                  (("retention.ms", "-1"), ("min.insync.replicas", isr))),
    ]
