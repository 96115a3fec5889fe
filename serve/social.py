"""The social graph, posts, likes and home-feed reads at the gateway: the `follow`, `unfollow`,
`post`, `like`, `unlike` and `feed` handlers (merged into the one handler table) and
`GET /v1/feed`.

Writes are claimed in Redis first (so a repeated follow or like is acknowledged without a second
event, note or count), then appended to the log durably before `ok`; when the append fails the
claim is undone and the client gets `unavailable`. The FeedShards apply every event again in log
order, so Redis converges to the log whatever the interleaving of claims.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bus.feeds import Cursor, FeedPage, FeedStore, Post
from peernet.codec import Frame
from peernet.envelope import Event
from peernet.errors import ErrorCode, PeerNetError, bad_request, unavailable
from serve import metrics
from serve.messaging import Messenger
from serve.routes import request_error_reply
from serve.routes.tokens import caller_or_reply
from serve.validate import int_field, text_field, user_field

if TYPE_CHECKING:
    from serve.connection import Connection
    from serve.deps import GatewayDeps
    from serve.handlers import HandlerTable

log = logging.getLogger("peernet.social")

_POST_ID = re.compile(r"^[0-9a-z]{1,64}$")
MAX_LIMIT = 100
DEFAULT_LIMIT = 20

FEED_READ_LATENCY = Histogram(
    "peernet_feed_read_seconds", "Home-feed page reads (one Redis round trip)",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5), registry=metrics.REGISTRY)
SOCIAL_WRITES = Counter(
    "peernet_social_writes_total", "Social requests, by type and whether they appended an event",
    ["type", "appended"], registry=metrics.REGISTRY)


def feeds_of(deps: GatewayDeps) -> FeedStore:
    feeds = deps.feeds
    if feeds is None:
        raise unavailable("feeds are not configured on this gateway")
    return feeds


def post_id_field(frame: Frame, name: str = "post") -> str:
    value = frame.get(name)
    if not isinstance(value, str) or _POST_ID.fullmatch(value) is None:
        raise bad_request(f"'{name}' must be a post id")
    return value


def parse_before(value: object) -> Cursor | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise bad_request("'before' must be a cursor string from an earlier page")
    try:
        return Cursor.parse(value)
    except ValueError:
        raise bad_request("'before' is not a feed cursor") from None


def page_body(page: FeedPage) -> Frame:
    return {"items": [p.frame() for p in page.items],
            "next": page.next.encode() if page.next else None}


async def read_page(feeds: FeedStore, user: str, limit: int, before: Cursor | None) -> FeedPage:
    start = time.perf_counter()
    page = await feeds.page(user, limit, before)
    FEED_READ_LATENCY.observe(time.perf_counter() - start)
    return page


def social_handlers(messenger: Messenger) -> HandlerTable:
    """The handlers of the social frames, to be merged into the one handler table."""

    async def follow_or_unfollow(conn: Connection, frame: Frame, follow: bool) -> Frame:
        kind = "follow" if follow else "unfollow"
        target = user_field(frame, "user")
        if target == conn.user:
            raise bad_request(f"{kind}ing oneself is not allowed")
        feeds = feeds_of(conn.deps)
        if not await feeds.claim_follow(conn.user, target, follow):
            SOCIAL_WRITES.labels(kind, "no").inc()
            return {"t": "ok"}  # already so: idempotent, nothing to append
        event = Event(kind, conn.user, {"user": target})
        try:
            # Keyed by the follower: one user's graph changes keep their order.
            await messenger.append(event, key=conn.user, recipients=[target] if follow else [])
        except BaseException:
            await _undo(feeds.claim_follow(conn.user, target, not follow))
            raise
        SOCIAL_WRITES.labels(kind, "yes").inc()
        return {"t": "ok"}

    async def follow(conn: Connection, frame: Frame) -> Frame | None:
        return await follow_or_unfollow(conn, frame, True)

    async def unfollow(conn: Connection, frame: Frame) -> Frame | None:
        return await follow_or_unfollow(conn, frame, False)

    async def post(conn: Connection, frame: Frame) -> Frame | None:
        body = text_field(frame, "body", conn.cfg.max_body_chars)
        feeds = feeds_of(conn.deps)
        event = Event("post", conn.user, {"body": body})
        await messenger.append(event, key=conn.user, recipients=[])
        SOCIAL_WRITES.labels("post", "yes").inc()
        try:
            # Right away, so that a like of the acknowledged post finds it; the FeedShard
            # writes the same again (and fans out) from the log.
            await feeds.put_post(Post(event.id, conn.user, body, event.ts))
        except PeerNetError as exc:
            log.warning("post %s is durable but not yet in the feed store: %s", event.id, exc)
        return {"t": "ok", "id": event.id, "ts": event.ts}

    async def like_or_unlike(conn: Connection, frame: Frame, like: bool) -> Frame:
        kind = "like" if like else "unlike"
        post_id = post_id_field(frame)
        feeds = feeds_of(conn.deps)
        claim = await feeds.claim_like(conn.user, post_id, like)
        if claim is None:
            raise PeerNetError(ErrorCode.NOT_FOUND, f"no post {post_id}")
        if not claim.changed:
            SOCIAL_WRITES.labels(kind, "no").inc()
            return {"t": "ok"}
        event = Event(kind, conn.user, {"post": post_id, "author": claim.author})
        # A like notes the author, unless the author likes their own post.
        notify = [claim.author] if like and claim.author != conn.user else []
        try:
            # Keyed by the post: one post's likes and unlikes keep their order.
            await messenger.append(event, key=post_id, recipients=notify)
        except BaseException:
            await _undo(feeds.claim_like(conn.user, post_id, not like))
            raise
        SOCIAL_WRITES.labels(kind, "yes").inc()
        return {"t": "ok"}

    async def like(conn: Connection, frame: Frame) -> Frame | None:
        return await like_or_unlike(conn, frame, True)

    async def unlike(conn: Connection, frame: Frame) -> Frame | None:
        return await like_or_unlike(conn, frame, False)

    async def feed(conn: Connection, frame: Frame) -> Frame | None:
        limit = int_field(frame, "limit", lo=1, hi=MAX_LIMIT, default=DEFAULT_LIMIT)
        before = parse_before(frame.get("before"))
        page = await read_page(feeds_of(conn.deps), conn.user, limit, before)
        return {"t": "feed_page", **page_body(page)}

    return {"follow": follow, "unfollow": unfollow, "post": post, "like": like,
            "unlike": unlike, "feed": feed}


async def _undo(claim: Awaitable[object]) -> None:
    """Best effort: a claim whose event never reached the log is taken back. If this fails too,
    Redis holds a follow or like the log lacks until the next event for the pair, or a replay."""
    try:
        await claim
    except PeerNetError as exc:
        log.warning("could not undo a claim after a failed append: %s", exc)


def limit_param(request: Request) -> int:
    """The `limit` of a paged HTTP route: 1 to MAX_LIMIT, DEFAULT_LIMIT when absent."""
    raw_limit = request.query_params.get("limit") or str(DEFAULT_LIMIT)
    # isdecimal, not isdigit: superscripts are digits that int() refuses.
    if not raw_limit.isdecimal() or not 1 <= int(raw_limit) <= MAX_LIMIT:
        raise bad_request(f"limit must be an integer from 1 to {MAX_LIMIT}")
    return int(raw_limit)


def social_routes(deps: GatewayDeps) -> list[Route]:
    """`GET /v1/feed?limit=&before=` with a bearer token: the same page as the `feed` frame."""

    async def feed(request: Request) -> Response:
        user = caller_or_reply(request, deps.cfg.gateway)
        if isinstance(user, Response):
            return user
        try:
            limit = limit_param(request)
            before = parse_before(request.query_params.get("before"))
            page = await read_page(feeds_of(deps), user, limit, before)
        except PeerNetError as exc:
            return request_error_reply(exc)
        return JSONResponse({"t": "feed_page", **page_body(page)})

    return [Route("/v1/feed", feed)]
