"""Protocol 1.1 read-backs at the gateway, in-process on the in-memory feed store:
`GET /v1/following` and `GET /v1/followers` (serve/follows.py), and `liked` in feed pages over
both the `feed` frame and `GET /v1/feed`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from gateway_harness import Gateway, gateway

from bus.feeds import FeedWrites, GraphChange, LikeChange, Post
from bus.feeds_memory import MemoryFeedStore


@pytest.fixture
def gw() -> Iterator[Gateway]:
    with gateway() as g:
        g.deps.feeds = MemoryFeedStore(cap=g.cfg.feeds.cap)
        yield g


def store(gw: Gateway) -> MemoryFeedStore:
    feeds = gw.deps.feeds
    assert isinstance(feeds, MemoryFeedStore)
    return feeds


def get(gw: Gateway, path: str, caller: str | None = "me", **params: Any) -> Any:
    headers = {"Authorization": f"Bearer {gw.token(caller)}"} if caller else {}
    return gw.client.get(path, params=params, headers=headers)


def follow(gw: Gateway, *pairs: tuple[str, str]) -> None:
    gw.run(store(gw).record, [GraphChange(a, b, True) for a, b in pairs], [], [])


def test_following_defaults_to_the_caller_and_pages_by_user_id(gw: Gateway) -> None:
    follow(gw, *[("me", u) for u in ("dan", "amy", "cy", "bo", "eve")], ("zoe", "amy"))
    whole = get(gw, "/v1/following")
    assert whole.status_code == 200
    assert whole.json() == {"items": ["amy", "bo", "cy", "dan", "eve"], "next": None}
    first = get(gw, "/v1/following", limit=2).json()
    assert first == {"items": ["amy", "bo"], "next": "bo"}
    second = get(gw, "/v1/following", limit=2, before=first["next"]).json()
    assert second == {"items": ["cy", "dan"], "next": "dan"}
    assert get(gw, "/v1/following", limit=2, before="dan").json() == {"items": ["eve"],
                                                                       "next": None}
    assert get(gw, "/v1/followers", user="amy").json() == {"items": ["me", "zoe"], "next": None}
    assert get(gw, "/v1/followers", caller="amy").json() == {"items": ["me", "zoe"],
                                                              "next": None}
    assert get(gw, "/v1/following", user="zoe", limit=100).json() == {"items": ["amy"],
                                                                       "next": None}
    assert get(gw, "/v1/followers").json() == {"items": [], "next": None}
    assert get(gw, "/v1/following", user="nobody_yet").json() == {"items": [], "next": None}


@pytest.mark.parametrize("path", ["/v1/following", "/v1/followers"])
@pytest.mark.parametrize("params", [{"user": "Not A User"}, {"user": "x" * 33}, {"limit": 0},
                                    {"limit": 101}, {"limit": "x"}, {"limit": "\u00b2"},
                                    {"before": "not a cursor"}, {"before": "A"},
                                    {"before": "12:abc"}])
def test_bad_input_is_400_bad_request(gw: Gateway, path: str, params: dict[str, Any]) -> None:
    reply = get(gw, path, **params)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["code"] == "bad_request"


@pytest.mark.parametrize("path", ["/v1/following", "/v1/followers"])
def test_without_a_valid_token_is_401_and_with_redis_down_503(gw: Gateway, path: str) -> None:
    assert get(gw, path, caller=None).status_code == 401
    assert gw.client.get(path, headers={"Authorization": "Bearer forged"}).status_code == 401
    store(gw).set_down(True)
    try:
        reply = get(gw, path)
    finally:
        store(gw).set_down(False)
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "unavailable"


def test_feed_pages_say_whether_their_reader_likes_each_post(gw: Gateway) -> None:
    feeds = store(gw)
    follow(gw, ("me", "pal"), ("you", "pal"))
    posts = [Post("p1", "pal", "one", 100), Post("p2", "pal", "two", 200)]
    gw.run(feeds.record, [], [LikeChange("me", "p1", True), LikeChange("you", "p2", True)], posts)
    gw.run(feeds.write, FeedWrites(adds=[(u, p.id, p.ts) for u in ("me", "you") for p in posts]))

    def liked(items: list[dict[str, Any]]) -> list[tuple[str, int, bool]]:
        return [(i["id"], i["likes"], i["liked"]) for i in items]

    assert liked(get(gw, "/v1/feed").json()["items"]) == [("p2", 1, False), ("p1", 1, True)]
    assert liked(get(gw, "/v1/feed", caller="you").json()["items"]) == [("p2", 1, True),
                                                                         ("p1", 1, False)]
    with gw.connect("me") as (ws, _):
        page = ws.request({"t": "feed", "rid": 1})
    assert page["t"] == "feed_page"
    assert page["items"][1] == {"id": "p1", "author": "pal", "body": "one", "ts": 100,
                                "likes": 1, "liked": True}
