"""FeedStore and FeedFanout: the social graph, posts, likes and precomputed home feeds (Redis).

Everything here is derived from the event log and can be rebuilt from it (`peernet replay`):
the gateway writes optimistic claims (a follow, a like) before it appends the event, and the
FeedShards apply every event again in log order, so the store converges to what the log says.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

_CURSOR = re.compile(r"^(\d{1,16}):([0-9a-z]{1,64})$")


@dataclass(frozen=True, slots=True)
class Post:
    """A post as clients see it (`likes` is the count when it was read; `liked` whether the
    reader of a page likes it, None where there is no reader, as in a push)."""

    id: str
    author: str
    body: str
    ts: int
    likes: int = 0
    liked: bool | None = None

    def frame(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "author": self.author, "body": self.body,
                               "ts": self.ts, "likes": self.likes}
        if self.liked is not None:
            out["liked"] = self.liked
        return out


@dataclass(frozen=True, slots=True, order=True)
class Cursor:
    """A position in a home feed: items strictly older than (ts, id) come next."""

    ts: int
    id: str

    def encode(self) -> str:
        return f"{self.ts}:{self.id}"

    @classmethod
    def parse(cls, raw: str) -> Cursor:
        """ValueError unless `raw` is a cursor this module encoded."""
        m = _CURSOR.fullmatch(raw)
        if m is None:
            raise ValueError("not a feed cursor")
        return cls(int(m.group(1)), m.group(2))


@dataclass(frozen=True, slots=True)
class FeedPage:
    items: list[Post]
    next: Cursor | None


# Which side of the graph a list reads: whom a user follows, or who follows the user.
GraphSide = Literal["following", "followers"]


@dataclass(frozen=True, slots=True)
class GraphPage:
    """A page of one side of a user's graph, in user id order (ascending); `next` is the last
    id of the page, from which the next page starts (None at the end)."""

    items: list[str]
    next: str | None


@dataclass(frozen=True, slots=True)
class LikeClaim:
    """A like or unlike claimed at the gateway: the post's author, and whether it changed
    anything (False: the user had already liked, or had not liked, the post)."""

    author: str
    changed: bool


@dataclass(frozen=True, slots=True)
class GraphChange:
    follower: str
    followee: str
    following: bool  # True: follow, False: unfollow


@dataclass(frozen=True, slots=True)
class LikeChange:
    user: str
    post: str
    liked: bool


@dataclass
class Lookup:
    """What a FeedShard reads to plan a batch's writes."""

    followers: dict[str, list[str]] = field(default_factory=dict)  # author -> followers
    celebrities: set[str] = field(default_factory=set)  # those asked about that are marked
    posts: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # (id, ts), newest first


@dataclass
class FeedWrites:
    """A batch of home-feed writes, applied in this order: pushes, removals, additions (each feed
    then capped to its newest entries), celebrity marks."""

    removes: list[tuple[str, list[str]]] = field(default_factory=list)  # (user, post ids)
    adds: list[tuple[str, str, int]] = field(default_factory=list)  # (user, post id, ts)
    celebrities: list[str] = field(default_factory=list)
    pushes: list[tuple[list[str], bytes]] = field(default_factory=list)  # (channels, payload)

    def __bool__(self) -> bool:
        return bool(self.removes or self.adds or self.celebrities or self.pushes)


class FeedStore(Protocol):
    """What the gateway reads and claims. Each call is one round trip and atomic on its own;
    failures to reach the store raise PeerNetError(unavailable) and change nothing the caller
    may rely on."""

    async def claim_follow(self, user: str, target: str, follow: bool) -> bool:
        """Add (or remove) `user` -> `target` in the graph; True when that changed the graph."""

    async def claim_like(self, user: str, post: str, like: bool) -> LikeClaim | None:
        """Like (or unlike) `post`; None when no such post is known."""

    async def put_post(self, post: Post) -> None:
        """Store a new post, index it under its author and put it in the author's own feed."""

    async def page(self, user: str, limit: int, before: Cursor | None) -> FeedPage:
        """`user`'s home feed, newest first: up to `limit` posts older than `before`, with
        their like counts and whether `user` likes each (`liked`), and the cursor of the next
        page (None at the end). Posts of authors the user no longer follows are left out, and
        the recent posts of the celebrities the user follows (never fanned out) are merged in,
        in one round trip."""

    async def graph(self, user: str, side: GraphSide, limit: int,
                    after: str | None) -> GraphPage:
        """Whom `user` follows, or who follows `user`: up to `limit` user ids greater than
        `after`, ascending, as the graph is now (a follow or unfollow claimed shows at once);
        a user id comes once, and a page walk sees every id that stays in the list throughout."""


class FeedFanout(Protocol):
    """What a FeedShard (and `peernet replay`) writes. Every write is idempotent: applying the
    same events again leaves the same state."""

    async def record(self, graph: Sequence[GraphChange], likes: Sequence[LikeChange],
                     posts: Sequence[Post]) -> None:
        """Apply graph and like changes in the given order, and store posts as `put_post`."""

    async def lookup(self, authors: Sequence[str], followees: Sequence[str]) -> Lookup:
        """The followers of `authors`, which of `authors` and `followees` are celebrities, and
        the recent posts (at most the feed cap) of `followees`."""

    async def write(self, writes: FeedWrites) -> None:
        """Apply `writes` (see FeedWrites for the order); pushes are published at most once, to
        whoever is subscribed to each channel at that moment (feed reads may trail them)."""

    async def clear(self) -> int:
        """Delete everything this store holds (its keyspace); the number of keys deleted."""


class Feeds(FeedStore, FeedFanout, Protocol):
    """Both sides of the feeds, as one backend holds them (the gateway reads and claims, the
    FeedShards and `peernet replay` write), on a connection of its own that `close` releases."""

    async def close(self) -> None: ...
