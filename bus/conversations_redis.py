"""ConversationIndex on Redis, beside the inbox cache and in its slot groups (bus/inbox_redis.py):
the keys of a user and of the conversations its shard writes share the user's group G, so the
session shard's one inbox script writes them with the items, and a page is one script.

Keys, `P` = `inbox:{G}:` (a conversation's keys exist once per group that holds a member):
- `P cv:{user}`: the user's conversations (sorted set, score the last activity's ts)
- `P un:{conv}:{user}`: the user's unread messages from others (sorted set of their pos)
- `P cm:{conv}`: the conversation's newest message ids (sorted set, score pos), `keep` of them
  and at most a few more
- `P rd:{conv}`: every member's marker (hash, user -> "pos:id") and, under `~` (no user id
  has it), the newest message as history gives it ("pos:" and its msgpack)
- `P gm:{conv}`: a group's state (hash, v: version, d: msgpack state)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from redis.exceptions import RedisError

from bus.conversations import (
    ChangeOp,
    Conversation,
    ConversationOp,
    ConversationPage,
    Cursor,
    Located,
    MessageOp,
    ReadOp,
    named_users,
)
from bus.redis import RedisClient, run_script
from peernet.codec import pack, pack_raw, unpack
from peernet.errors import unavailable
from peernet.wire import user_channel

# The ops of bus/conversations.py, in Lua: `conversation_ops(P, ops, keep)`, where each op is
# encoded by `encode_ops` (below). Defined as a chunk that the inbox append script includes, so
# that a shard's batch writes its items and its conversations in one step. Numbers stay under
# 10^14 (offsets, ms), which Lua turns into strings without an exponent.
CONVERSATION_OPS_LUA = """
local LAST = '~'
local function marker_pos(m)
  if not m then return -1 end
  return tonumber(string.match(m, '^(%d+)'))
end
local function conversation_ops(P, ops, keep)
  for _, op in ipairs(ops) do
    local kind, conv = op[1], op[2]
    if kind == 'm' then
      -- m, conv, pos, id, from, ts, message, users
      local pos, id, cm = op[3], op[4], P .. 'cm:' .. conv
      local fresh = redis.call('ZADD', cm, 'NX', pos, id) == 1
      -- Another record of a message already indexed (a producer's retry) changes nothing.
      if fresh or tonumber(redis.call('ZSCORE', cm, id)) == pos then
        -- Trimmed at about one message in 16 (an id's last character is random), a command
        -- saved on the others: the index holds `keep` ids and at most a few more.
        if fresh and string.byte(id, -1) % 16 == 0 then
          redis.call('ZREMRANGEBYRANK', cm, 0, -(keep + 1))
        end
        -- The newest message and the recipients' markers are one hash: one read for both.
        local rd, fields = P .. 'rd:' .. conv, {LAST}
        for _, u in ipairs(op[8]) do
          if u ~= op[5] then fields[#fields + 1] = u end
        end
        local got = redis.call('HMGET', rd, unpack(fields))
        if marker_pos(got[1]) < pos then redis.call('HSET', rd, LAST, pos .. ':' .. op[7]) end
        for i = 2, #fields do
          if marker_pos(got[i]) < pos then
            redis.call('ZADD', P .. 'un:' .. conv .. ':' .. fields[i], pos, pos)
          end
        end
        for _, u in ipairs(op[8]) do redis.call('ZADD', P .. 'cv:' .. u, 'GT', op[6], conv) end
      end
    elseif kind == 'r' then
      -- r, conv, pos, id, user, users, channels, receipt
      local pos, rd, reader = op[3], P .. 'rd:' .. conv, op[5]
      if marker_pos(redis.call('HGET', rd, reader)) < pos then
        redis.call('HSET', rd, reader, pos .. ':' .. op[4])
        for _, u in ipairs(op[6]) do
          if u == reader then
            redis.call('ZREMRANGEBYSCORE', P .. 'un:' .. conv .. ':' .. u, '-inf', pos)
          end
        end
        for _, channel in ipairs(op[7]) do redis.call('PUBLISH', channel, op[8]) end
      end
    elseif kind == 'g' then
      -- g, conv, ts, version, state, users, removed
      local gm = P .. 'gm:' .. conv
      local v = redis.call('HGET', gm, 'v')
      if (not v) or tonumber(v) <= op[4] then redis.call('HSET', gm, 'v', op[4], 'd', op[5]) end
      for _, u in ipairs(op[6]) do redis.call('ZADD', P .. 'cv:' .. u, 'GT', op[3], conv) end
      for _, u in ipairs(op[7]) do
        redis.call('ZREM', P .. 'cv:' .. u, conv)
        redis.call('DEL', P .. 'un:' .. conv .. ':' .. u)
        redis.call('HDEL', P .. 'rd:' .. conv, u)
      end
    end
  end
end
"""

# ARGV[1]: {prefix, keep, ops} (msgpack). KEYS[1]: a key of the group, for a cluster's routing.
_APPLY = CONVERSATION_OPS_LUA + """
local req = cmsgpack.unpack(ARGV[1])
conversation_ops(req.prefix, req.ops, req.keep)
return 1
"""

# One page of a user's list. KEYS[1]: `P cv:{user}`. ARGV: P, user, limit, cursor ts ('' none),
# cursor conv. Returns {conv, ts, unread, markers and the newest message (flat), group state
# ('' none)}
# for up to limit + 1 conversations (one more than asked: whether there is a next page).
_PAGE = """
local key, P, user, limit = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
local rows = {}
local function take(got)
  for i = 1, #got, 2 do
    if #rows > limit then return end
    rows[#rows + 1] = {got[i], got[i + 1]}
  end
end
if ARGV[4] == '' then
  take(redis.call('ZREVRANGEBYSCORE', key, '+inf', '-inf', 'WITHSCORES', 'LIMIT', 0, limit + 1))
else
  -- Equal activity is ordered by id, from the highest: those of the cursor's ts below its id.
  local ties = redis.call('ZREVRANGEBYSCORE', key, ARGV[4], ARGV[4], 'WITHSCORES')
  local below = {}
  for i = 1, #ties, 2 do
    if ties[i] < ARGV[5] then below[#below + 1] = ties[i]; below[#below + 1] = ties[i + 1] end
  end
  take(below)
  if #rows <= limit then
    take(redis.call('ZREVRANGEBYSCORE', key, '(' .. ARGV[4], '-inf', 'WITHSCORES',
                    'LIMIT', 0, limit + 1 - #rows))
  end
end
local out = {}
for i, row in ipairs(rows) do
  local conv = row[1]
  -- The one past the page only says that there is a next page.
  if i > limit then out[#out + 1] = {conv, row[2], 0, {}, ''}; break end
  local unread = redis.call('ZCARD', P .. 'un:' .. conv .. ':' .. user)
  local markers = redis.call('HGETALL', P .. 'rd:' .. conv)
  local state = ''
  if string.sub(conv, 1, 2) == 'g:' then state = redis.call('HGET', P .. 'gm:' .. conv, 'd') or '' end
  out[#out + 1] = {conv, row[2], unread, markers, state}
end
return out
"""

_ERRORS = (RedisError, OSError, TimeoutError)

# The field of a conversation's markers hash that holds its newest message (CONVERSATION_OPS_LUA).
LAST_FIELD = "~"


def encode_ops(ops: Sequence[ConversationOp]) -> list[list[Any]]:
    """`ops` as CONVERSATION_OPS_LUA reads them (inside a pack_raw request)."""
    out: list[list[Any]] = []
    for op in ops:
        if isinstance(op, MessageOp):
            out.append(["m", op.conv, op.pos, str(op.msg["id"]), str(op.msg["from"]),
                        int(op.msg["ts"]), pack(op.msg), list(op.users)])
        elif isinstance(op, ReadOp):
            out.append(["r", op.conv, op.pos, op.id, op.user, list(op.users),
                        [user_channel(u) for u in op.notify], op.receipt])
        else:
            out.append(["g", op.conv, op.ts, int(op.state["version"]), pack(op.state),
                        list(op.users), list(op.removed)])
    return out


def ops_for(ops: Sequence[ConversationOp], keep: Callable[[str], bool]) -> list[ConversationOp]:
    """The part of `ops` that concerns the users `keep` accepts (those of one group): an op
    with none of them is left out, one with some names only those."""
    out: list[ConversationOp] = []
    for op in ops:
        users = tuple(u for u in op.users if keep(u))
        if isinstance(op, MessageOp):
            if users:
                out.append(MessageOp(op.conv, op.pos, op.msg, users))
        elif isinstance(op, ReadOp):
            if users:
                out.append(ReadOp(op.conv, op.pos, op.id, op.user, op.ts, users,
                                  tuple(u for u in op.notify if keep(u)), op.receipt))
        else:
            removed = tuple(u for u in op.removed if keep(u))
            if users or removed:
                out.append(ChangeOp(op.conv, op.ts, op.state, users, removed))
    return out


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisConversations:
    """ConversationIndex on Redis (see bus/conversations.py for the contract). `prefix_of`
    gives the key prefix of a user's group (RedisInboxCache.user_prefix), `group_of` its
    name."""

    def __init__(self, client: RedisClient, *, prefix_of: Callable[[str], str],
                 group_of: Callable[[str], str], keep: int) -> None:
        self._r = client
        self._prefix_of = prefix_of
        self._group_of = group_of
        self.keep = keep
        self._apply = client.register_script(_APPLY)
        self._page = client.register_script(_PAGE)

    async def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return await run_script(self._r, script, keys, args)
        except _ERRORS as exc:
            raise unavailable(f"conversations: {type(exc).__name__}: {exc}") from exc

    async def page(self, user: str, limit: int, before: Cursor | None) -> ConversationPage:
        prefix = self._prefix_of(user)
        rows = await self._run(self._page, [f"{prefix}cv:{user}"], [
            prefix, user, limit, "" if before is None else before.ts,
            "" if before is None else before.conv])
        items = []
        for conv, ts, unread, markers, state in rows:
            read, last = {}, None
            for i in range(0, len(markers), 2):
                field, value = _s(markers[i]), bytes(markers[i + 1])
                if field == LAST_FIELD:
                    last = unpack(value.partition(b":")[2])
                else:
                    read[field] = value.decode().partition(":")[2]
            items.append(Conversation(
                conv=_s(conv), ts=int(float(_s(ts))), last=last, unread=int(unread), read=read,
                group=unpack(state) if state else None))
        nxt = None
        if len(items) > limit:
            items = items[:limit]
            nxt = Cursor(items[-1].ts, items[-1].conv)
        return ConversationPage(items, nxt)

    async def locate(self, user: str, conv: str, msg_id: str) -> Located:
        prefix = self._prefix_of(user)
        try:
            async with self._r.pipeline(transaction=False) as pipe:
                pipe.zscore(f"{prefix}cm:{conv}", msg_id)
                pipe.hget(f"{prefix}rd:{conv}", user)
                pos, marker = await pipe.execute()
        except _ERRORS as exc:
            raise unavailable(f"conversations: {type(exc).__name__}: {exc}") from exc
        return Located(None if pos is None else int(pos),
                       int(_s(marker).partition(":")[0]) if marker else -1)

    async def apply(self, ops: Sequence[ConversationOp]) -> None:
        # A script per group of users: on a Redis Cluster a group is a slot.
        by_group = {self._group_of(u): u for op in ops for u in named_users(op)}
        for group, someone in sorted(by_group.items()):
            mine = ops_for(ops, lambda u, g=group: self._group_of(u) == g)  # type: ignore[misc]
            if not mine:
                continue
            prefix = self._prefix_of(someone)
            request = pack_raw({"prefix": prefix, "keep": self.keep, "ops": encode_ops(mine)})
            await self._run(self._apply, [f"{prefix}cm:"], [request])
