"""FeedStore and FeedFanout on Redis.

Keys, all under the keyspace `ks` (so deployments and test runs sharing one Redis keep apart),
written `{ks}`: a hash tag, so that on a Redis Cluster they share one slot (the page script reads
a user's feed, whom they follow and the posts' hashes and likes in one call):
  {ks}:feed:USER       zset  home feed: post id, score ts (equal scores order by id)
  {ks}:posts:AUTHOR    zset  the author's recent posts, same scores (capped like feeds)
  {ks}:following:USER  set   whom the user follows
  {ks}:followers:USER  set   who follows the user
  {ks}:following_by_id:USER, {ks}:followers_by_id:USER
                       zset  the same two sets, every score 0 (so ordered by user id), for
                             reading them a page at a time (written with the sets; a list read
                             rebuilds its zset from the set when their sizes differ, as for
                             follows stored before these existed)
  {ks}:post:ID         hash  a: author, b: body, ts
  {ks}:likes:ID        set   users who like the post; its size is the like count, and the page
                             script asks it whether the reader is one (`liked`)
  {ks}:celebs          set   authors never fanned out (sticky once marked)

The scripts build their keys from the tagged keyspace and name `{ks}:celebs` as their key, which
routes them to the slot's node on a cluster.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from bus.feeds import (
    Cursor,
    FeedPage,
    FeedWrites,
    GraphChange,
    GraphPage,
    GraphSide,
    LikeChange,
    LikeClaim,
    Lookup,
    Post,
)
from bus.redis import RedisClient, hash_tag, redis_client, run_script
from peernet.config import PeerNetConfig
from peernet.errors import unavailable

T = TypeVar("T")

# Feed entries one page read may examine (entries of unfollowed authors are skipped): the
# script stops at MAX_SCAN + limit + 17 entries of each list it reads, as bus/feeds_memory.py.
MAX_SCAN = 2_000
# Commands sent in one pipeline round trip; bigger batches are split.
PIPELINE_CHUNK = 10_000
# Channels published per push script call, and feed entries per add script call: bounds how long
# one script holds Redis (a few milliseconds).
PUSH_CHUNK = 1_000
ADD_CHUNK = 2_000

# ARGV: keyspace, user, limit, cursor ts ('' for none), cursor id, max scan.
# Returns {next_ts|'', next_id|'', id, author, body, ts, likes, liked (1|0), id, ...}.
#
# One call, so one round trip, whatever the page holds; what it costs Redis is its calls, so it
# makes as few as the page needs: the celebrities' recent ids are read first (no hashes), then
# the home feed and those lists are merged newest first and a post's hash is read only when the
# merge reaches it, so a celebrity post that makes the page spares a feed entry's reads; and
# whether the reader follows an author is asked once per author, not once per entry.
_PAGE = """
local ks, user, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
local has_cursor = ARGV[4] ~= ''
local cts = has_cursor and tonumber(ARGV[4]) or 0
local cid = ARGV[5]
local max_scan = tonumber(ARGV[6])
local top = has_cursor and ARGV[4] or '+inf'
local following = ks .. ':following:' .. user
local want = limit + 1
-- Entries a stream examines at most (bus/feeds_memory.py examines as many).
local scan_bound = max_scan + want + 16

-- A zset's entries older than the cursor, newest first, read as the merge asks (at most
-- `scan_bound` examined): a stream with a head {id, ts, raw score}. The first read is
-- `want` entries, as many as a page can take; each later one (entries skipped: authors no longer
-- followed) four times bigger. Every entry read costs Redis (its score is formatted), so a read
-- of more than the page can use is not free.
local function stream(key, author)
  return {key = key, author = author, buf = {}, pos = 1, offset = 0, chunk = want, done = false}
end

local function head(s)
  while s.buf[s.pos] == nil do
    if s.done then return nil end
    s.buf, s.pos = {}, 1
    local chunk = math.min(s.chunk, scan_bound - s.offset)
    s.chunk = math.min(4 * s.chunk, 1024)
    local batch = redis.call('ZREVRANGEBYSCORE', s.key, top, '-inf', 'WITHSCORES', 'LIMIT',
                             s.offset, chunk)
    local n = #batch / 2
    for i = 1, #batch, 2 do
      local id, ts = batch[i], tonumber(batch[i + 1])
      if (not has_cursor) or ts < cts or id < cid then
        s.buf[#s.buf + 1] = {id, ts, batch[i + 1]}
      end
    end
    s.offset = s.offset + n
    if n < chunk or s.offset >= scan_bound then s.done = true end
  end
  return s.buf[s.pos]
end

local followed = {}
local function follows(author)
  if author == user then return true end
  local f = followed[author]
  if f == nil then
    f = redis.call('SISMEMBER', following, author) == 1
    followed[author] = f
  end
  return f
end

local streams = {stream(ks .. ':feed:' .. user, false)}
for _, c in ipairs(redis.call('SINTER', following, ks .. ':celebs')) do
  local s = stream(ks .. ':posts:' .. c, c)
  -- A celebrity's list stops at `want` entries, as many as can make the page.
  local first = {}
  while #first < want and head(s) do
    first[#first + 1] = s.buf[s.pos]
    s.pos = s.pos + 1
  end
  s.buf, s.pos, s.done = first, 1, true
  streams[#streams + 1] = s
end

-- Merge newest first (ts, then id, as the zsets order equal scores), without duplicates.
local items, seen = {}, {}
while #items < want do
  local best, from = nil, nil
  for _, s in ipairs(streams) do
    local h = head(s)
    if h and (best == nil or h[2] > best[2] or (h[2] == best[2] and h[1] > best[1])) then
      best, from = h, s
    end
  end
  if best == nil then break end
  from.pos = from.pos + 1
  local id = best[1]
  if not seen[id] then
    if from.author then
      local body = redis.call('HGET', ks .. ':post:' .. id, 'b')
      if body then
        seen[id] = true
        items[#items + 1] = {id, best[2], from.author, body, best[3]}
      end
    else
      local meta = redis.call('HMGET', ks .. ':post:' .. id, 'a', 'b')
      local a = meta[1]
      if a and follows(a) then
        seen[id] = true
        items[#items + 1] = {id, best[2], a, meta[2], best[3]}
      end
    end
  end
end

local out = {'', ''}
local n = math.min(#items, limit)
if #items > limit then out[1] = items[limit][5]; out[2] = items[limit][1] end
for i = 1, n do
  local it = items[i]
  out[#out + 1] = it[1]
  out[#out + 1] = it[3]
  out[#out + 1] = it[4]
  out[#out + 1] = it[2]
  local likes = ks .. ':likes:' .. it[1]
  out[#out + 1] = redis.call('SCARD', likes)
  out[#out + 1] = redis.call('SISMEMBER', likes, user)
end
return out
"""

# KEYS: a graph set, its zset by id. ARGV: after ('' for none), limit.
# Returns up to limit + 1 user ids greater than `after`, ascending (one more than the page: it
# tells whether there is a next one). The zset is rebuilt from the set when their sizes differ
# (follows stored before the zsets existed, or a FeedShard's pipeline cut off between the two):
# O(1) to check, O(N) once to rebuild; the set is the truth.
_GRAPH = """
local set, byid = KEYS[1], KEYS[2]
if redis.call('SCARD', set) ~= redis.call('ZCARD', byid) then
  redis.call('DEL', byid)
  local members = redis.call('SMEMBERS', set)
  for i = 1, #members, 1000 do
    local args = {}
    for j = i, math.min(i + 999, #members) do
      args[#args + 1] = 0
      args[#args + 1] = members[j]
    end
    redis.call('ZADD', byid, unpack(args))
  end
end
local from = ARGV[1] == '' and '-' or '(' .. ARGV[1]
return redis.call('ZRANGEBYLEX', byid, from, '+', 'LIMIT', 0, tonumber(ARGV[2]) + 1)
"""

# KEYS: post hash, likes set. ARGV: user, '1' like | '0' unlike. nil when the post is unknown.
_CLAIM_LIKE = """
local author = redis.call('HGET', KEYS[1], 'a')
if not author then return false end
local changed
if ARGV[2] == '1' then changed = redis.call('SADD', KEYS[2], ARGV[1])
else changed = redis.call('SREM', KEYS[2], ARGV[1]) end
return {author, changed}
"""

# ARGV: keyspace, cap, then (user, post id, ts) triples: add each entry to the user's home feed,
# then trim each feed touched to its newest `cap` entries. One command carries thousands of
# entries: far less client CPU than a ZADD and a ZREMRANGEBYRANK per follower.
_ADD = """
local ks, cap = ARGV[1], tonumber(ARGV[2])
local byfeed, order = {}, {}
for i = 3, #ARGV, 3 do
  local key = ks .. ':feed:' .. ARGV[i]
  local entries = byfeed[key]
  if not entries then entries = {}; byfeed[key] = entries; order[#order + 1] = key end
  entries[#entries + 1] = ARGV[i + 2]
  entries[#entries + 1] = ARGV[i + 1]
end
for _, key in ipairs(order) do
  redis.call('ZADD', key, unpack(byfeed[key]))
  redis.call('ZREMRANGEBYRANK', key, 0, -(cap + 1))
end
return #order
"""

# ARGV: payload, channel, channel, ... : one payload sent once, published on many channels.
_PUSH = """
for i = 2, #ARGV do redis.call('PUBLISH', ARGV[i], ARGV[1]) end
return #ARGV - 1
"""

_ERRORS = (RedisError, OSError, TimeoutError)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisFeedStore:
    """FeedStore and FeedFanout on Redis (see bus/feeds.py for the contracts)."""

    def __init__(self, client: RedisClient, *, keyspace: str, cap: int) -> None:
        if cap < 1:
            raise ValueError("the feed cap must be positive")
        self._r = client
        self.keyspace = keyspace
        # What every key starts with (the scripts' `ks`).
        self.prefix = hash_tag(keyspace)
        self._cluster = isinstance(client, RedisCluster)
        self.cap = cap
        self._page = client.register_script(_PAGE)
        self._claim_like = client.register_script(_CLAIM_LIKE)
        self._graph = client.register_script(_GRAPH)
        self._push = client.register_script(_PUSH)
        self._add = client.register_script(_ADD)

    # -- keys --------------------------------------------------------------------------------

    def _k(self, kind: str, name: str) -> str:
        return f"{self.prefix}:{kind}:{name}"

    @property
    def _celebs(self) -> str:
        return f"{self.prefix}:celebs"

    async def _guard(self, what: str, action: Callable[[], Awaitable[T]]) -> T:
        try:
            return await action()
        except _ERRORS as exc:
            raise unavailable(f"feeds: {what}: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        await self._r.aclose()

    # -- FeedStore ---------------------------------------------------------------------------

    async def claim_follow(self, user: str, target: str, follow: bool) -> bool:
        async def run() -> bool:
            async with self._r.pipeline(transaction=True) as pipe:
                self._follow(pipe, user, target, follow)
                changed, *_ = await pipe.execute()
            return bool(changed)

        return await self._guard("claim follow", run)

    async def claim_like(self, user: str, post: str, like: bool) -> LikeClaim | None:
        async def run() -> LikeClaim | None:
            reply = await self._claim_like(keys=[self._k("post", post), self._k("likes", post)],
                                           args=[user, "1" if like else "0"])
            if reply is None:
                return None
            return LikeClaim(_s(reply[0]), bool(int(reply[1])))

        return await self._guard("claim like", run)

    def _follow(self, pipe: Any, user: str, target: str, follow: bool) -> None:
        """Queue `user` -> `target` (or its removal) on the sets, then on the zsets by id (the
        first reply says whether the graph changed)."""
        if follow:
            pipe.sadd(self._k("following", user), target)
            pipe.sadd(self._k("followers", target), user)
            pipe.zadd(self._k("following_by_id", user), {target: 0})
            pipe.zadd(self._k("followers_by_id", target), {user: 0})
        else:
            pipe.srem(self._k("following", user), target)
            pipe.srem(self._k("followers", target), user)
            pipe.zrem(self._k("following_by_id", user), target)
            pipe.zrem(self._k("followers_by_id", target), user)

    async def put_post(self, post: Post) -> None:
        async def run() -> None:
            async with self._r.pipeline(transaction=False) as pipe:
                self._put_post(pipe, post)
                await pipe.execute()

        await self._guard("put post", run)

    def _put_post(self, pipe: Any, post: Post) -> None:
        pipe.hset(self._k("post", post.id), mapping={"a": post.author, "b": post.body, "ts": post.ts})
        for key in (self._k("posts", post.author), self._k("feed", post.author)):
            pipe.zadd(key, {post.id: post.ts})
            pipe.zremrangebyrank(key, 0, -(self.cap + 1))

    async def page(self, user: str, limit: int, before: Cursor | None) -> FeedPage:
        async def run() -> FeedPage:
            reply = await self._run(self._page, [self._celebs], [
                self.prefix, user, limit, "" if before is None else before.ts,
                "" if before is None else before.id, MAX_SCAN])
            nxt = Cursor(int(reply[0]), _s(reply[1])) if reply[0] not in (b"", "") else None
            items = [Post(_s(reply[i]), _s(reply[i + 1]), _s(reply[i + 2]), int(reply[i + 3]),
                          int(reply[i + 4]), reply[i + 5] == 1) for i in range(2, len(reply), 6)]
            return FeedPage(items, nxt)

        return await self._guard("page", run)

    async def graph(self, user: str, side: GraphSide, limit: int,
                    after: str | None) -> GraphPage:
        async def run() -> GraphPage:
            reply = await self._run(self._graph, [self._k(side, user),
                                                  self._k(f"{side}_by_id", user)],
                                    ["" if after is None else after, limit])
            ids = [_s(m) for m in reply]
            return GraphPage(ids[:limit], ids[limit - 1] if len(ids) > limit else None)

        return await self._guard("graph", run)

    async def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        return await run_script(self._r, script, keys, args)

    # -- FeedFanout --------------------------------------------------------------------------

    async def record(self, graph: Sequence[GraphChange], likes: Sequence[LikeChange],
                     posts: Sequence[Post]) -> None:
        async def run() -> None:
            async with self._r.pipeline(transaction=False) as pipe:
                for g in graph:
                    self._follow(pipe, g.follower, g.followee, g.following)
                for like in likes:
                    (pipe.sadd if like.liked else pipe.srem)(self._k("likes", like.post), like.user)
                for post in posts:
                    self._put_post(pipe, post)
                await self._flush(pipe, force=True)

        await self._guard("record", run)

    async def lookup(self, authors: Sequence[str], followees: Sequence[str]) -> Lookup:
        authors, followees = list(dict.fromkeys(authors)), list(dict.fromkeys(followees))
        names = list(dict.fromkeys([*authors, *followees]))

        async def run() -> Lookup:
            async with self._r.pipeline(transaction=False) as pipe:
                for a in authors:
                    pipe.smembers(self._k("followers", a))
                for b in followees:
                    pipe.zrevrange(self._k("posts", b), 0, self.cap - 1, withscores=True)
                if names:
                    pipe.smismember(self._celebs, names)
                replies = await pipe.execute()
            out = Lookup()
            for a, members in zip(authors, replies, strict=False):
                out.followers[a] = sorted(_s(m) for m in members)
            for b, posts in zip(followees, replies[len(authors):], strict=False):
                out.posts[b] = [(_s(m), int(score)) for m, score in posts]
            if names:
                out.celebrities = {n for n, flag in zip(names, replies[-1], strict=True) if flag}
            return out

        return await self._guard("lookup", run)

    async def write(self, writes: FeedWrites) -> None:
        async def run() -> None:
            pipe: Any  # redis-py types a script's client as a client, though it takes a pipeline
            async with self._r.pipeline(transaction=False) as pipe:
                # Pushes first: the contract lets feed reads trail the push, and a push should
                # not wait for thousands of feed writes.
                for channels, payload in writes.pushes:
                    for i in range(0, len(channels), PUSH_CHUNK):
                        await self._script(pipe, self._push, [],
                                           [payload, *channels[i:i + PUSH_CHUNK]])
                for user, ids in writes.removes:
                    if ids:
                        pipe.zrem(self._k("feed", user), *ids)
                    await self._flush(pipe)
                for i in range(0, len(writes.adds), ADD_CHUNK):
                    args: list[str | int] = [self.prefix, self.cap]
                    for user, post_id, ts in writes.adds[i:i + ADD_CHUNK]:
                        args += (user, post_id, ts)
                    await self._script(pipe, self._add, [self._celebs], args)
                if writes.celebrities:
                    pipe.sadd(self._celebs, *writes.celebrities)
                await self._flush(pipe, force=True)

        await self._guard("write", run)

    async def _script(self, pipe: Any, script: Any, keys: list[str], args: list[Any]) -> None:
        """Run `script` in order with what `pipe` holds: queued on it, or, on a Redis Cluster
        (whose pipelines refuse scripts), right after sending what it holds."""
        if self._cluster:
            await self._flush(pipe, force=True)
            await script(keys=keys, args=args)
            return
        await script(keys=keys, args=args, client=pipe)
        await self._flush(pipe)

    @staticmethod
    async def _flush(pipe: Any, *, force: bool = False) -> None:
        if len(pipe) >= PIPELINE_CHUNK or (force and len(pipe)):
            await pipe.execute()

    async def clear(self) -> int:
        async def run() -> int:
            deleted = 0
            batch: list[bytes] = []
            async for key in self._r.scan_iter(match=f"{self.prefix}:*", count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    deleted += int(await self._r.unlink(*batch))
                    batch = []
            if batch:
                deleted += int(await self._r.unlink(*batch))
            return deleted

        return await self._guard("clear", run)


def feed_store(cfg: PeerNetConfig) -> RedisFeedStore:
    """The feed store of a process, from configuration."""
    return RedisFeedStore(redis_client(cfg.services.redis_url), keyspace=cfg.feeds.keyspace,
                          cap=cfg.feeds.cap)
