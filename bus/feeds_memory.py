"""FeedStore and FeedFanout in memory, for unit tests: the same semantics as bus/feeds_redis.py
(the contract suite runs against both), values copied in and out, pushes delivered to a
PubSub when one is given, and `set_down` to exercise the unavailable paths."""

from __future__ import annotations

from collections.abc import Sequence

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
from bus.feeds_redis import MAX_SCAN
from bus.pubsub import PubSub
from peernet.errors import unavailable


class _ZSet:
    """A sorted set ordered like Redis's: by score, then by member."""

    def __init__(self) -> None:
        self.scores: dict[str, int] = {}

    def add(self, member: str, score: int) -> None:
        self.scores[member] = score

    def trim(self, cap: int) -> None:
        if len(self.scores) > cap:
            keep = self.newest()[:cap]
            self.scores = {m: self.scores[m] for m in keep}

    def newest(self) -> list[str]:
        return sorted(self.scores, key=lambda m: (self.scores[m], m), reverse=True)


class MemoryFeedStore:
    """FeedStore and FeedFanout in memory (see bus/feeds.py)."""

    def __init__(self, *, cap: int, pubsub: PubSub | None = None) -> None:
        self.cap = cap
        self.pubsub = pubsub
        self.feeds: dict[str, _ZSet] = {}
        self.posts_by: dict[str, _ZSet] = {}
        self.following: dict[str, set[str]] = {}
        self.followers: dict[str, set[str]] = {}
        self.posts: dict[str, tuple[str, str, int]] = {}  # id -> (author, body, ts)
        self.likes: dict[str, set[str]] = {}
        self.celebrities: set[str] = set()
        self.pushed: list[tuple[str, bytes]] = []  # (channel, payload), in publish order
        self.down = False

    def set_down(self, down: bool) -> None:
        self.down = down

    def _check(self) -> None:
        if self.down:
            raise unavailable("memory feed store is down")

    def feed_ids(self, user: str) -> list[str]:
        """The entries of a home feed, newest first (what Redis holds, before any filtering)."""
        return self.feeds[user].newest() if user in self.feeds else []

    # -- FeedStore ---------------------------------------------------------------------------

    def _graph(self, user: str, target: str, follow: bool) -> bool:
        mine = self.following.setdefault(user, set())
        theirs = self.followers.setdefault(target, set())
        changed = (target not in mine) if follow else (target in mine)
        if follow:
            mine.add(target)
            theirs.add(user)
        else:
            mine.discard(target)
            theirs.discard(user)
        return changed

    async def claim_follow(self, user: str, target: str, follow: bool) -> bool:
        self._check()
        return self._graph(user, target, follow)

    def _like(self, user: str, post: str, like: bool) -> bool:
        users = self.likes.setdefault(post, set())
        changed = (user not in users) if like else (user in users)
        if like:
            users.add(user)
        else:
            users.discard(user)
        return changed

    async def claim_like(self, user: str, post: str, like: bool) -> LikeClaim | None:
        self._check()
        meta = self.posts.get(post)
        if meta is None:
            return None
        return LikeClaim(meta[0], self._like(user, post, like))

    def _put_post(self, post: Post) -> None:
        self.posts[post.id] = (post.author, post.body, post.ts)
        for zsets in (self.posts_by, self.feeds):
            z = zsets.setdefault(post.author, _ZSet())
            z.add(post.id, post.ts)
            z.trim(self.cap)

    async def put_post(self, post: Post) -> None:
        self._check()
        self._put_post(post)

    def _collect(self, user: str, ids: list[str], scores: dict[str, int], want: int,
                 before: Cursor | None, filter_: bool) -> list[Post]:
        out: list[Post] = []
        following = self.following.get(user, set())
        for pid in ids[:MAX_SCAN + want + 16]:
            if len(out) >= want:
                break
            ts = scores[pid]
            if before is not None and (ts, pid) >= (before.ts, before.id):
                continue
            meta = self.posts.get(pid)
            if meta is None:
                continue
            author, body, _ = meta
            if filter_ and author != user and author not in following:
                continue
            out.append(Post(pid, author, body, ts))
        return out

    async def page(self, user: str, limit: int, before: Cursor | None) -> FeedPage:
        self._check()
        want = limit + 1
        feed = self.feeds.get(user, _ZSet())
        items = self._collect(user, feed.newest(), feed.scores, want, before, True)
        celebs = sorted(self.following.get(user, set()) & self.celebrities)
        if celebs:
            for c in celebs:
                z = self.posts_by.get(c, _ZSet())
                items += self._collect(user, z.newest(), z.scores, want, before, False)
            items.sort(key=lambda p: (p.ts, p.id), reverse=True)
            seen: set[str] = set()
            items = [p for p in items if not (p.id in seen or seen.add(p.id))]  # type: ignore[func-returns-value]
        nxt = Cursor(items[limit - 1].ts, items[limit - 1].id) if len(items) > limit else None
        return FeedPage([Post(p.id, p.author, p.body, p.ts, len(self.likes.get(p.id, ())),
                              user in self.likes.get(p.id, ()))
                         for p in items[:limit]], nxt)

    async def graph(self, user: str, side: GraphSide, limit: int,
                    after: str | None) -> GraphPage:
        self._check()
        sets = self.following if side == "following" else self.followers
        ids = sorted(u for u in sets.get(user, ()) if after is None or u > after)[:limit + 1]
        return GraphPage(ids[:limit], ids[limit - 1] if len(ids) > limit else None)

    # -- FeedFanout --------------------------------------------------------------------------

    async def record(self, graph: Sequence[GraphChange], likes: Sequence[LikeChange],
                     posts: Sequence[Post]) -> None:
        self._check()
        for g in graph:
            self._graph(g.follower, g.followee, g.following)
        for like in likes:
            self._like(like.user, like.post, like.liked)
        for post in posts:
            self._put_post(post)

    async def lookup(self, authors: Sequence[str], followees: Sequence[str]) -> Lookup:
        self._check()
        out = Lookup()
        for a in authors:
            out.followers[a] = sorted(self.followers.get(a, ()))
        for b in followees:
            z = self.posts_by.get(b, _ZSet())
            out.posts[b] = [(pid, z.scores[pid]) for pid in z.newest()[:self.cap]]
        out.celebrities = {n for n in [*authors, *followees] if n in self.celebrities}
        return out

    async def write(self, writes: FeedWrites) -> None:
        self._check()
        for user, ids in writes.removes:
            z = self.feeds.get(user)
            if z is not None:
                for pid in ids:
                    z.scores.pop(pid, None)
        touched: set[str] = set()
        for user, pid, ts in writes.adds:
            self.feeds.setdefault(user, _ZSet()).add(pid, ts)
            touched.add(user)
        for user in touched:
            self.feeds[user].trim(self.cap)
        self.celebrities.update(writes.celebrities)
        for channels, payload in writes.pushes:
            for channel in channels:
                self.pushed.append((channel, bytes(payload)))
                if self.pubsub is not None:
                    await self.pubsub.publish(channel, payload)

    async def clear(self) -> int:
        self._check()
        n = (len(self.feeds) + len(self.posts_by) + len(self.following) + len(self.followers)
             + len(self.posts) + len(self.likes) + (1 if self.celebrities else 0))
        self.__init__(cap=self.cap, pubsub=self.pubsub)  # type: ignore[misc]
        return n

    async def close(self) -> None:
        return None  # no connection to release
