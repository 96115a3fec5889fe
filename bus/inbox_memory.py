"""InboxCache in memory for unit tests, behaving like RedisInboxCache on the wire: items
round-trip through msgpack, an append with its checkpoint is one atomic step, and the whole
cache can be lost (`wipe`) or taken down (`set_down`) like a Redis restart or outage.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from bus.conversations import ConversationOp
from bus.conversations_memory import ConversationState, MemoryConversations
from bus.inbox import Bounds, CacheBehind, Item
from bus.pubsub import PubSub
from peernet.codec import pack, unpack
from peernet.errors import unavailable
from peernet.ids import now_ms


@dataclass
class _InboxServer:
    # user -> seq -> the packed item (Redis: one sorted set per user, score seq)
    inboxes: dict[str, dict[int, bytes]] = field(default_factory=dict)
    checkpoints: dict[str, dict[int, int]] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    acked: dict[str, int] = field(default_factory=dict)
    conversations: ConversationState = field(default_factory=ConversationState)
    down: bool = False


class MemoryInboxCache:
    """InboxCache in memory (see bus/inbox.py for the contract, bus/inbox_redis.py for the
    behaviour copied here).

    `clock` gives "now" in ms for retention (peernet.ids.now_ms unless given). `client()`
    returns another client of the same data (another process).
    """

    def __init__(self, *, retention_items: int, retention_ms: int,
                 clock: Callable[[], int] = now_ms, pubsub: PubSub | None = None,
                 conversation_keep: int = 1_000, _server: _InboxServer | None = None) -> None:
        """`pubsub`: where `append` publishes (as the Redis cache publishes on its own
        server); without it the cache does not publish. `conversation_keep`: as
        RedisInboxCache's."""
        self._retention_items = retention_items
        self._retention_ms = retention_ms
        self._clock = clock
        self._pubsub = pubsub
        if _server is None:
            _server = _InboxServer(conversations=ConversationState(keep=conversation_keep))
        self._server = _server

    @property
    def publishes(self) -> bool:
        return self._pubsub is not None

    def client(self) -> MemoryInboxCache:
        return MemoryInboxCache(retention_items=self._retention_items,
                                retention_ms=self._retention_ms, clock=self._clock,
                                pubsub=self._pubsub, _server=self._server)

    def wipe(self) -> None:
        """Lose everything, as a Redis restart without persistence (or FLUSHALL) would."""
        self._server.inboxes.clear()
        self._server.checkpoints.clear()
        self._server.versions.clear()
        self._server.acked.clear()
        self._server.conversations.clear()

    def set_down(self, down: bool) -> None:
        """Make every call (of every client) raise PeerNetError(unavailable), or stop that."""
        self._server.down = down

    def _check(self) -> None:
        if self._server.down:
            raise unavailable("memory inbox cache is down")

    async def append(self, items: Sequence[tuple[str, Item]], *, checkpoint_name: str,
                     checkpoint: Mapping[int, int],
                     also: Mapping[str, Mapping[int, int]] | None = None,
                     expect_version: int | None = None,
                     publish: Sequence[str] = (),
                     conversations: Sequence[ConversationOp] = ()) -> int:
        self._check()
        if publish and self._pubsub is None:
            raise ValueError("this inbox cache has no pub/sub to publish on")
        if publish and len(publish) != len(items):
            raise ValueError(f"{len(publish)} channels for {len(items)} items")
        cutoff = self._clock() - self._retention_ms
        # Everything is prepared before anything is stored: the append is all or nothing.
        staged: list[tuple[str, int, bytes]] = [(user, int(item["seq"]), pack(item))
                                                for user, item in items]
        ckpts = {checkpoint_name: {int(p): int(o) for p, o in checkpoint.items()}}
        for name, extra in (also or {}).items():
            ckpts[name] = {int(p): int(o) for p, o in extra.items()}
        current = self._server.versions.get(checkpoint_name, 0)
        if expect_version is not None and expect_version != current:
            raise CacheBehind(f"checkpoint {checkpoint_name!r} is at {current}, "
                              f"not {expect_version}")
        inboxes = self._server.inboxes
        for user, seq, raw in staged:
            # A replayed (user, seq) replaces itself, never doubles.
            inboxes.setdefault(user, {})[seq] = raw
        for user in dict.fromkeys(user for user, _, _ in staged):
            self._trim(inboxes[user], cutoff)
        for name, ckpt in ckpts.items():
            if ckpt:
                # Redis HSET: partitions not named keep their stored offsets.
                self._server.checkpoints.setdefault(name, {}).update(ckpt)
        receipts = self._server.conversations.apply(conversations)
        self._server.versions[checkpoint_name] = current + 1
        if receipts and self._pubsub is not None:
            await self._pubsub.publish_many(receipts)
        if publish and self._pubsub is not None:
            await self._pubsub.publish_many([(channel, raw) for channel, (_, _, raw)
                                             in zip(publish, staged, strict=True)])
        return current + 1

    async def version(self, name: str) -> int:
        self._check()
        return self._server.versions.get(name, 0)

    def _trim(self, inbox: dict[int, bytes], cutoff: int) -> None:
        """Drop the oldest items while there are more than retention_items and the oldest is
        older than the cutoff; stop at the first young one."""
        excess = len(inbox) - self._retention_items
        for seq in sorted(inbox)[:max(0, excess)]:
            if int(unpack(inbox[seq])["ts"]) < cutoff:
                del inbox[seq]
            else:
                break

    async def read(self, user: str, after: int, limit: int) -> list[Item]:
        self._check()
        inbox = self._server.inboxes.get(user, {})
        seqs = [s for s in sorted(inbox) if s > after]
        if limit >= 0:  # Redis LIMIT 0 -1: a negative count means all
            seqs = seqs[:limit]
        return [unpack(inbox[s]) for s in seqs]

    async def bounds(self, user: str) -> Bounds:
        self._check()
        inbox = self._server.inboxes.get(user)
        if not inbox:
            return Bounds(0, 0)
        return Bounds(min(inbox), max(inbox))

    async def recent(self, user: str, count: int) -> list[Item]:
        self._check()
        if count <= 0:
            return []
        inbox = self._server.inboxes.get(user, {})
        return [unpack(inbox[s]) for s in sorted(inbox)[-count:]]

    async def checkpoint(self, name: str) -> dict[int, int] | None:
        self._check()
        stored = self._server.checkpoints.get(name)
        return dict(stored) if stored else None

    async def ack_many(self, acks: Mapping[str, int]) -> dict[str, int]:
        self._check()
        out = {}
        for user, seq in acks.items():
            current = self._server.acked.get(user, 0)
            if seq > current:
                self._server.acked[user] = current = int(seq)
            out[user] = current
        return out

    async def acked(self, user: str) -> int:
        self._check()
        return self._server.acked.get(user, 0)

    def conversations(self) -> MemoryConversations:
        """The conversation index this cache's appends write (bus/conversations.py)."""
        return MemoryConversations(self._server.conversations, down=lambda: self._server.down)

    # -- for assertions in tests -------------------------------------------------------------

    def users(self) -> list[str]:
        return sorted(u for u, inbox in self._server.inboxes.items() if inbox)


__all__ = ["MemoryInboxCache"]
