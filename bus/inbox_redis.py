"""InboxCache on Redis: one sorted set per user (score seq, member the msgpack item).

Keys, in slot groups (`InboxSlots`: on a Redis Cluster every key of a group shares one hash slot,
so that one script stores a batch's items with its checkpoints atomically):

- `inbox:{G}:u:{user}`: the user's items, G the user's group (for the session shards: the
  owning shard's, `session-I-of-N.K`, see `spread_tag`)
- `inbox:{G}:ckptv:{name}`, `inbox:{G}:ckpt:{name}`: a checkpoint's version and offsets, G the
  checkpoint's group
- `inbox:acked`: every user's acked seq (a hash)

and the conversation index's keys in the users' groups (bus/conversations_redis.py), which an
append writes with the items.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.crc import REDIS_CLUSTER_HASH_SLOTS as SLOTS
from redis.crc import key_slot
from redis.exceptions import RedisError

from bus.conversations import ConversationOp, named_users
from bus.conversations_redis import CONVERSATION_OPS_LUA, encode_ops
from bus.inbox import Bounds, CacheBehind, Item
from bus.redis import RedisClient, hash_tag
from peernet.codec import pack, pack_raw, unpack
from peernet.errors import unavailable
from peernet.ids import now_ms
from peernet.routing import session_group, shard_for


@dataclass(frozen=True, slots=True)
class InboxSlots:
    """Which keys share a hash slot: a user's group, and a checkpoint name's group. An append
    stores items only for users of its checkpoint's group (ValueError otherwise); that is what
    lets it be one atomic script on a Redis Cluster."""

    of_user: Callable[[str], str]
    of_checkpoint: Callable[[str], str]


def _everything(_name: str) -> str:
    return "all"


# Every key in one slot: any writer may append for any user (tests, tools, one Redis).
ONE_SLOT = InboxSlots(_everything, _everything)


def spread_tag(name: str, index: int, count: int) -> str:
    """A hash tag for group `index` of `count`: `name.K` with the smallest K whose slot lies near
    the middle of the group's share of the 16,384 slots. A cluster's masters own contiguous
    ranges of slots, so `count` groups at least as many as the masters land on all of them (the
    bare names may not: `session-0-of-2` and `session-1-of-2` hash to slots 5430 and 4246, both
    on the first of three masters)."""
    share = SLOTS / count
    centre, reach = (index + 0.5) * share, share / 4
    k = 0
    while abs(key_slot(f"{name}.{k}".encode()) - centre) > reach:
        k += 1
    return f"{name}.{k}"


def session_slots(count: int) -> InboxSlots:
    """The session shards' grouping: a user's keys go with the shard that owns the user
    (`shard_for(user, count)`), whose checkpoint names start `session-I-of-N@`; each shard's
    group is spread over the slot space (`spread_tag`)."""
    tags = {session_group(i, count): spread_tag(session_group(i, count), i, count)
            for i in range(count)}

    def of_user(user: str) -> str:
        return tags[session_group(shard_for(user, count), count)]

    def of_checkpoint(name: str) -> str:
        group = name.partition("@")[0]
        return tags.get(group, group)

    return InboxSlots(of_user, of_checkpoint)


# One atomic append: check the writer's version, store the items (a replayed (user, seq)
# replaces itself), trim each touched inbox, merge the checkpoints, bump the version.
# Trimming drops the oldest items while there are more than `keep` and the oldest is older than
# `cutoff` (ms); it stops at the first young item, reading the oldest 16 at a time, so it costs
# O(1) once an inbox is trimmed and one small read while the excess is younger than the cutoff.
# KEYS[1]: the version key (every key it builds shares its slot: `req.prefix`). ARGV[1] is the
# request, one msgpack argument; ARGV[2..] one channel per item (none: publish nothing), on
# which the item is published, as stored, once everything is stored.
# The conversations' ops of the batch (`req.convs`, in log order) are applied after the items,
# their receipts published as they go.
# Returns the new version, or -1 when the version differs (nothing stored, nothing published).
_APPEND = CONVERSATION_OPS_LUA + """
local req = cmsgpack.unpack(ARGV[1])
local vkey = KEYS[1]
local current = tonumber(redis.call('GET', vkey) or '0')
if req.expect ~= false and req.expect ~= nil and tonumber(req.expect) ~= current then
  return -1
end
local touched = {}
for _, it in ipairs(req.items) do
  local key = req.prefix .. 'u:' .. it[1]
  redis.call('ZREMRANGEBYSCORE', key, it[2], it[2])
  redis.call('ZADD', key, it[2], it[3])
  touched[key] = true
end
for key, _ in pairs(touched) do
  local excess = redis.call('ZCARD', key) - req.keep
  local removed = 0
  while removed < excess do
    -- The oldest few at a time: trimming stops at the first young item, so an inbox over its
    -- count but within its age reads one small chunk, not its whole excess.
    local chunk = redis.call('ZRANGE', key, removed, math.min(removed + 15, excess - 1))
    local old = 0
    for _, m in ipairs(chunk) do
      if tonumber(cmsgpack.unpack(m)['ts']) < req.cutoff then old = old + 1 else break end
    end
    removed = removed + old
    if old < #chunk or #chunk == 0 then break end
  end
  if removed > 0 then redis.call('ZREMRANGEBYRANK', key, 0, removed - 1) end
end
if #req.convs > 0 then conversation_ops(req.prefix, req.convs, req.keep_conv) end
for name, ckpt in pairs(req.ckpts) do
  -- One HSET per checkpoint with all its partitions.
  local args = {}
  for p, o in pairs(ckpt) do args[#args + 1] = tostring(p); args[#args + 1] = o end
  if #args > 0 then redis.call('HSET', req.prefix .. 'ckpt:' .. name, unpack(args)) end
end
local version = redis.call('INCR', vkey)
-- Pushes go once everything is stored. PUBLISH names a channel, not a key: a cluster node
-- runs it from a script and every node's subscribers get it.
if #ARGV > 1 then
  for i, it in ipairs(req.items) do redis.call('PUBLISH', ARGV[i + 1], it[3]) end
end
return version
"""

# Cumulative ack: keep the larger of the stored and the given seq.
# ARGV: user, seq, user, seq, ...; returns the seq in force for each, in order.
_ACK = """
local out = {}
for i = 1, #ARGV, 2 do
  local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  local new = tonumber(ARGV[i + 1])
  if new > cur then redis.call('HSET', KEYS[1], ARGV[i], new); cur = new end
  out[#out + 1] = cur
end
return out
"""


_ACKED = "inbox:acked"


class RedisInboxCache:
    """InboxCache on Redis (see bus/inbox.py for the contract)."""

    def __init__(self, client: RedisClient, *, retention_items: int, retention_ms: int,
                 slots: InboxSlots = ONE_SLOT, conversation_keep: int = 1_000) -> None:
        """`conversation_keep`: the message ids the conversation index keeps per conversation
        (bus/conversations.py)."""
        self._r = client
        self._conversation_keep = conversation_keep
        self._retention_items = retention_items
        self._retention_ms = retention_ms
        self._slots = slots
        self._append = client.register_script(_APPEND)
        self._ack = client.register_script(_ACK)

    @staticmethod
    def _prefix(group: str) -> str:
        return f"inbox:{hash_tag(group)}:"

    def user_key(self, user: str) -> str:
        return f"{self.user_prefix(user)}u:{user}"

    def user_prefix(self, user: str) -> str:
        """The prefix of every key of `user`'s group."""
        return self._prefix(self._slots.of_user(user))

    def user_group(self, user: str) -> str:
        return self._slots.of_user(user)

    def checkpoint_keys(self, name: str) -> tuple[str, str]:
        """The version key and the offsets key of checkpoint `name`."""
        prefix = self._prefix(self._slots.of_checkpoint(name))
        return f"{prefix}ckptv:{name}", f"{prefix}ckpt:{name}"

    @property
    def publishes(self) -> bool:
        # The deployment's PubSub is on the same Redis (bus/backends.py builds both from one URL).
        return True

    async def append(self, items: Sequence[tuple[str, Item]], *, checkpoint_name: str,
                     checkpoint: Mapping[int, int],
                     also: Mapping[str, Mapping[int, int]] | None = None,
                     expect_version: int | None = None,
                     publish: Sequence[str] = (),
                     conversations: Sequence[ConversationOp] = ()) -> int:
        if publish and len(publish) != len(items):
            raise ValueError(f"{len(publish)} channels for {len(items)} items")
        group = self._slots.of_checkpoint(checkpoint_name)
        ckpts = {checkpoint_name: {int(p): int(o) for p, o in checkpoint.items()}}
        for name, extra in (also or {}).items():
            ckpts[name] = {int(p): int(o) for p, o in extra.items()}
        strays = sorted({n for n in ckpts if self._slots.of_checkpoint(n) != group}
                        | {u for u, _ in items if self._slots.of_user(u) != group}
                        | {u for op in conversations for u in named_users(op)
                           if self._slots.of_user(u) != group})
        if strays:
            raise ValueError(f"inbox append under {checkpoint_name!r} (group {group!r}) names "
                             f"users or checkpoints of another group: {strays[:5]}")
        # Redis's Lua cmsgpack reads no msgpack `bin`: the members travel as raw strings.
        request = pack_raw({
            "prefix": self._prefix(group),
            "expect": False if expect_version is None else expect_version,
            "items": [[user, int(item["seq"]), pack(item)] for user, item in items],
            "keep": self._retention_items,
            "cutoff": now_ms() - self._retention_ms,
            "ckpts": ckpts,
            "convs": encode_ops(conversations),
            "keep_conv": self._conversation_keep,
        })
        try:
            version = int(await self._append(keys=[self.checkpoint_keys(checkpoint_name)[0]],
                                             args=[request, *publish]))
        except (RedisError, OSError, TimeoutError) as exc:
            raise unavailable(f"inbox cache: {exc}") from exc
        if version < 0:
            raise CacheBehind(f"inbox cache checkpoint {checkpoint_name!r} is not at version "
                              f"{expect_version}")
        return version

    async def version(self, name: str) -> int:
        try:
            return int(await self._r.get(self.checkpoint_keys(name)[0]) or 0)
        except (RedisError, OSError, TimeoutError) as exc:
            raise unavailable(f"inbox cache: {exc}") from exc

    async def read(self, user: str, after: int, limit: int) -> list[Item]:
        try:
            raw: Any = await self._r.zrangebyscore(self.user_key(user), f"({after}", "+inf",
                                                   start=0, num=limit)
        except (RedisError, OSError, TimeoutError) as exc:
            raise unavailable(f"inbox cache: {exc}") from exc
        return [unpack(bytes(m)) for m in raw]

    async def bounds(self, user: str) -> Bounds:
        try:
            async with self._r.pipeline(transaction=False) as pipe:
                key = self.user_key(user)
                pipe.zrange(key, 0, 0, withscores=True)
                pipe.zrange(key, -1, -1, withscores=True)
                first, last = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            raise unavailable(f"inbox cache: {exc}") from exc
        if not last:
            return Bounds(0, 0)
        return Bounds(int(first[0][1]), int(last[0][1]))

    async def recent(self, user: str, count: int) -> list[Item]:
        if count <= 0:
            return []
        try:
            raw: Any = await self._r.zrange(self.user_key(user), -count, -1)
        except (RedisError, OSError, TimeoutError) as exc:
            raise unavailable(f"inbox cache: {exc}") from exc
        return [unpack(bytes(m)) for m in raw]

    async def checkpoint(self, name: str) -> dict[int, int] | None:
        try:
            raw = await self._r.hgetall(self.checkpoint_keys(name)[1])
        except (RedisError, OSError, TimeoutError) as exc:
            raise unavailable(f"inbox cache: {exc}") from exc
        if not raw:
            return None
        return {int(p): int(o) for p, o in raw.items()}

    async def ack_many(self, acks: Mapping[str, int]) -> dict[str, int]:
        if not acks:
            return {}
        users = list(acks)
        try:
            in_force = await self._ack(keys=[_ACKED],
                                       args=[a for u in users for a in (u, int(acks[u]))])
        except (RedisError, OSError, TimeoutError) as exc:
            raise unavailable(f"inbox cache: {exc}") from exc
        return {u: int(s) for u, s in zip(users, in_force, strict=True)}

    async def acked(self, user: str) -> int:
        try:
            raw = await self._r.hget(_ACKED, user)
        except (RedisError, OSError, TimeoutError) as exc:
            raise unavailable(f"inbox cache: {exc}") from exc
        return int(raw or 0)
