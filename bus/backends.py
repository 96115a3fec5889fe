"""The real backends of a process, opened from configuration in one place, and handed on as
their seams: what a caller may rely on is the seam's contract, not the implementation."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from bus.cache import Cache
from bus.eventlog import EventLog
from bus.feeds import Feeds
from bus.feeds_redis import feed_store
from bus.inbox import InboxCache
from bus.inbox_redis import RedisInboxCache, session_slots
from bus.kafka import KafkaEventLog, KafkaSecurity
from bus.mongo import MongoDocumentStore
from bus.presence import PresenceStore
from bus.presence_redis import RedisPresenceStore
from bus.pubsub import PubSub
from bus.pubsub_redis import RedisPubSub
from bus.redis import RedisCache, redis_client
from bus.store import DocumentStore
from peernet.config import PeerNetConfig


@dataclass
class Backends:
    log: EventLog
    cache: Cache
    pubsub: PubSub
    inbox: InboxCache
    store: DocumentStore
    feeds: Feeds
    presence: PresenceStore

    async def start(self) -> None:
        await self.log.start()
        await self.cache.start()
        await self.pubsub.start()
        await self.store.start()

    async def stop(self) -> None:
        for part in (self.pubsub, self.log, self.cache, self.store):
            with contextlib.suppress(Exception):
                await part.stop()


def backends(cfg: PeerNetConfig, *, client_id: str = "peernet", linger_ms: int = 0) -> Backends:
    """Every backend on the configured services; `linger_ms` is the event log producer's."""
    s = cfg.services
    return Backends(
        log=event_log(cfg, client_id=client_id, linger_ms=linger_ms),
        cache=RedisCache(s.redis_url),
        pubsub=RedisPubSub(s.redis_url),
        inbox=RedisInboxCache(redis_client(s.redis_url),
                              retention_items=cfg.shards.inbox_retention_items,
                              retention_ms=cfg.shards.inbox_retention_ms,
                              slots=session_slots(cfg.shards.session_shards)),
        store=MongoDocumentStore(s.mongo_url, s.mongo_db),
        feeds=feed_store(cfg),
        presence=presence_store(cfg),
    )


def event_log(cfg: PeerNetConfig, *, client_id: str = "peernet", linger_ms: int = 0) -> EventLog:
    """The event log on the configured Kafka, with its settings (TLS included)."""
    s = cfg.services
    return KafkaEventLog(s.kafka_bootstrap, client_id=client_id, linger_ms=linger_ms,
                         fail_fast_ms=s.kafka_fail_fast_ms,
                         commit_interval_ms=s.kafka_commit_interval_ms,
                         security=KafkaSecurity.of(s))


def presence_store(cfg: PeerNetConfig) -> PresenceStore:
    return RedisPresenceStore(redis_client(cfg.services.redis_url), keyspace=cfg.presence.keyspace,
                              last_seen_ttl_s=cfg.presence.last_seen_ttl_s)
