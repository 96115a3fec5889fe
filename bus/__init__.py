"""The seams between PeerNet and its backing services, with their real implementations.

Kafka records, Redis replies and MongoDB documents never leave this package: callers see the
types defined in the seam modules (`eventlog`, `pubsub`, `cache`, `store`, `inbox`, `presence`).

The seam types are imported here; the implementations (`bus.kafka`, `bus.redis`, `bus.mongo`,
and the in-memory ones, one module each: `bus.eventlog_memory`, `bus.pubsub_memory`, ...) are
imported on first use, so that importing `bus` does not load aiokafka, redis, motor or bson.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from bus.cache import Cache
from bus.eventlog import Appended, EventLog, Headers, LogConsumer, Record, TopicSpec
from bus.presence import Change, PresenceState, PresenceStore
from bus.pubsub import Handler, PubSub, Subscription
from bus.store import Document, DocumentStore, DuplicateKeyError

if TYPE_CHECKING:
    from bus.cache_memory import MemoryCache
    from bus.eventlog_memory import MemoryEventLog, MemoryLogConsumer
    from bus.kafka import KafkaEventLog
    from bus.kafka_consumer import KafkaLogConsumer
    from bus.mongo import MongoDocumentStore
    from bus.presence_memory import MemoryPresenceStore
    from bus.presence_redis import RedisPresenceStore
    from bus.pubsub_memory import MemoryPubSub
    from bus.pubsub_redis import RedisPubSub
    from bus.redis import RedisCache, redis_client
    from bus.store_memory import MemoryDocumentStore

_LAZY = {
    "KafkaEventLog": "bus.kafka",
    "KafkaLogConsumer": "bus.kafka_consumer",
    "RedisCache": "bus.redis",
    "RedisPubSub": "bus.pubsub_redis",
    "redis_client": "bus.redis",
    "MongoDocumentStore": "bus.mongo",
    "RedisPresenceStore": "bus.presence_redis",
    "MemoryEventLog": "bus.eventlog_memory",
    "MemoryLogConsumer": "bus.eventlog_memory",
    "MemoryPubSub": "bus.pubsub_memory",
    "MemoryCache": "bus.cache_memory",
    "MemoryDocumentStore": "bus.store_memory",
    "MemoryPresenceStore": "bus.presence_memory",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bus' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [  # noqa: RUF022 - grouped by seam, not sorted
    # EventLog seam
    "Appended",
    "EventLog",
    "Headers",
    "LogConsumer",
    "Record",
    "TopicSpec",
    # PubSub seam
    "Handler",
    "PubSub",
    "Subscription",
    # Cache seam
    "Cache",
    # DocumentStore seam
    "Document",
    "DocumentStore",
    "DuplicateKeyError",
    # PresenceStore seam
    "Change",
    "PresenceState",
    "PresenceStore",
    # real implementations
    "KafkaEventLog",
    "KafkaLogConsumer",
    "MongoDocumentStore",
    "RedisCache",
    "RedisPresenceStore",
    "RedisPubSub",
    "redis_client",
    # in-memory implementations (unit tests)
    "MemoryCache",
    "MemoryDocumentStore",
    "MemoryEventLog",
    "MemoryLogConsumer",
    "MemoryPresenceStore",
    "MemoryPubSub",
]
