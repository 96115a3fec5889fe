"""The social graph, posts, likes, notes and home feeds end to end, on the real stack (two gateway
replicas, FeedShards, SessionShards, the projector), and `peernet replay` rebuilding them.

The test server runs with PEERNET_CELEBRITY_THRESHOLD=5 and a feed keyspace of its own
(tests/conftest.py), so the celebrity test needs six followers and the replay test can wipe the
server's feed keys without touching anyone else's."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from wsclient import Client, Frame, Server, dev_token, unique_user

from bus.mongo import MongoDocumentStore
from bus.redis import hash_tag, redis_client
from peernet.config import PROJECT_ROOT

pytestmark = [pytest.mark.ray, pytest.mark.stack]

PROJECTIONS = ("users", "follows", "posts", "likes", "notes", "messages")


async def connect(server: Server, user: str) -> Client:
    return await Client.connect(server.ws_url, server.url, user)


async def ok(client: Client, frame: Frame) -> Frame:
    reply = await client.request(frame)
    assert reply["t"] == "ok", reply
    return reply


async def error_code(client: Client, frame: Frame) -> str:
    reply = await client.request(frame)
    assert reply["t"] == "error", reply
    return str(reply["code"])


async def page(client: Client, limit: int | None = None, before: str | None = None) -> Frame:
    frame: Frame = {"t": "feed"}
    if limit is not None:
        frame["limit"] = limit
    if before is not None:
        frame["before"] = before
    reply = await client.request(frame)
    assert reply["t"] == "feed_page", reply
    return reply


async def until(probe: Callable[[], Awaitable[Any]], check: Callable[[Any], bool],
                within_s: float = 20.0) -> Any:
    """Poll `probe` until `check` accepts its value (feed reads may trail a moment)."""
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        value = await probe()
        if check(value):
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not settled within {within_s}s: {value!r}")
        await asyncio.sleep(0.1)


def ids(p: Frame) -> list[str]:
    return [item["id"] for item in p["items"]]


async def http_page(server: Server, user: str, **params: Any) -> httpx.Response:
    token = await dev_token(server.url, user)
    async with httpx.AsyncClient(base_url=server.url) as http:
        return await http.get("/v1/feed", params=params,
                              headers={"Authorization": f"Bearer {token}"})


async def test_follow_post_like_notes_pushes_and_unfollow(peernet_server: Server) -> None:
    alice_name, bob_name = unique_user("alice"), unique_user("bob")
    alice = await connect(peernet_server, alice_name)
    bob = await connect(peernet_server, bob_name)

    await ok(alice, {"t": "follow", "user": bob_name})
    await ok(alice, {"t": "follow", "user": bob_name})  # idempotent: no second note
    note = await bob.next(lambda f: f.get("t") == "note")
    assert {k: note[k] for k in ("kind", "from")} == {"kind": "follow", "from": alice_name}
    assert isinstance(note["seq"], int) and "post" not in note

    posted = await bob.request({"t": "post", "body": "hello followers"})
    assert posted["t"] == "ok" and set(posted) == {"t", "rid", "id", "ts"}
    item = {"id": posted["id"], "author": bob_name, "body": "hello followers",
            "ts": posted["ts"], "likes": 0}
    assert await alice.expect("feed") == {"t": "feed", "item": item}
    assert await bob.expect("feed") == {"t": "feed", "item": item}  # the author's own too

    first = await until(lambda: page(alice), lambda p: ids(p) == [posted["id"]])
    # In a page, as not in the push, a post says whether its reader likes it (protocol 1.1).
    assert first["items"] == [{**item, "liked": False}] and first["next"] is None

    await ok(alice, {"t": "like", "post": posted["id"]})
    await ok(alice, {"t": "like", "post": posted["id"]})  # counted once, noted once
    like_note = await bob.next(lambda f: f.get("t") == "note" and f.get("kind") == "like")
    assert like_note["from"] == alice_name and like_note["post"] == posted["id"]
    liked = await until(lambda: page(alice), lambda p: p["items"][0]["likes"] == 1)
    assert (await page(bob))["items"][0]["likes"] == 1

    over_http = await http_page(peernet_server, alice_name)
    assert over_http.status_code == 200
    assert over_http.json()["items"] == liked["items"] and over_http.json()["next"] is None

    await ok(alice, {"t": "unlike", "post": posted["id"]})
    await ok(alice, {"t": "unlike", "post": posted["id"]})
    await until(lambda: page(alice), lambda p: p["items"][0]["likes"] == 0)

    await ok(alice, {"t": "unfollow", "user": bob_name})
    await ok(alice, {"t": "unfollow", "user": bob_name})
    assert ids(await page(alice)) == []  # at once: pages leave out authors no longer followed
    assert ids(await page(bob)) == [posted["id"]]
    await asyncio.sleep(1.0)
    notes = [f for f in bob.pending if f.get("t") == "note"]
    assert notes == [], notes  # one follow note and one like note, no more
    await alice.close()
    await bob.close()


async def http_list(server: Server, caller: str, side: str, **params: Any) -> Frame:
    token = await dev_token(server.url, caller)
    async with httpx.AsyncClient(base_url=server.url) as http:
        reply = await http.get(f"/v1/{side}", params=params,
                               headers={"Authorization": f"Bearer {token}"})
    assert reply.status_code == 200, reply.text
    body: Frame = reply.json()
    return body


async def test_following_and_followers_read_back_over_http(peernet_server: Server) -> None:
    fan_name, a_name, b_name = unique_user("fan"), unique_user("idol"), unique_user("idol")
    fan = await connect(peernet_server, fan_name)
    await ok(fan, {"t": "follow", "user": a_name})
    await ok(fan, {"t": "follow", "user": b_name})
    first_id, second_id = sorted([a_name, b_name])  # the lists go up by user id

    # Paged one at a time, with the cursor each page gives; `user` defaults to the caller.
    first = await http_list(peernet_server, fan_name, "following", limit=1)
    assert first == {"items": [first_id], "next": first_id}
    second = await http_list(peernet_server, fan_name, "following", limit=1, before=first["next"])
    assert second == {"items": [second_id], "next": None}
    assert await http_list(peernet_server, fan_name, "following") == {
        "items": [first_id, second_id], "next": None}
    # Anyone's lists, read by another user.
    assert await http_list(peernet_server, b_name, "followers", user=a_name) == {
        "items": [fan_name], "next": None}
    assert await http_list(peernet_server, a_name, "following", user=fan_name, limit=100) == {
        "items": [first_id, second_id], "next": None}
    assert await http_list(peernet_server, fan_name, "followers") == {"items": [], "next": None}

    await ok(fan, {"t": "unfollow", "user": a_name})
    assert await http_list(peernet_server, fan_name, "following") == {"items": [b_name],
                                                                       "next": None}
    assert await http_list(peernet_server, fan_name, "followers", user=a_name) == {
        "items": [], "next": None}
    assert await http_list(peernet_server, fan_name, "followers", user=b_name) == {
        "items": [fan_name], "next": None}

    async with httpx.AsyncClient(base_url=peernet_server.url) as http:
        assert (await http.get("/v1/following")).status_code == 401
        token = await dev_token(peernet_server.url, fan_name)
        for side in ("following", "followers"):
            for params in ({"user": "Not A User"}, {"limit": 0}, {"limit": 101},
                           {"before": "no cursor"}):
                bad = await http.get(f"/v1/{side}", params=params,
                                     headers={"Authorization": f"Bearer {token}"})
                assert bad.status_code == 400, (side, params, bad.text)
                assert bad.json()["error"]["code"] == "bad_request"
    await fan.close()


async def test_liked_is_the_readers_own_on_the_websocket_and_over_http(
        peernet_server: Server) -> None:
    author_name, liker_name, other_name = (unique_user("author"), unique_user("liker"),
                                           unique_user("other"))
    author = await connect(peernet_server, author_name)
    liker = await connect(peernet_server, liker_name)
    other = await connect(peernet_server, other_name)
    await ok(liker, {"t": "follow", "user": author_name})
    await ok(other, {"t": "follow", "user": author_name})
    post_id = (await author.request({"t": "post", "body": "like me"}))["id"]
    for reader in (liker, other):
        await until(lambda r=reader: page(r), lambda p: ids(p) == [post_id])

    async def views() -> dict[str, tuple[int, bool]]:
        """(likes, liked) of the post as each reader sees it, over both ways of reading."""
        out = {}
        for name, client in ((liker_name, liker), (other_name, other), (author_name, author)):
            (ws_item,) = (await page(client))["items"]
            reply = await http_page(peernet_server, name)
            assert reply.status_code == 200
            (http_item,) = reply.json()["items"]
            assert http_item == ws_item
            out[name] = (ws_item["likes"], ws_item["liked"])
        return out

    assert await views() == {liker_name: (0, False), other_name: (0, False),
                             author_name: (0, False)}
    # The like is claimed in Redis before its `ok`: the liker's next page says so at once.
    await ok(liker, {"t": "like", "post": post_id})
    assert await views() == {liker_name: (1, True), other_name: (1, False),
                             author_name: (1, False)}
    await ok(liker, {"t": "unlike", "post": post_id})
    assert await views() == {liker_name: (0, False), other_name: (0, False),
                             author_name: (0, False)}
    for c in (author, liker, other):
        await c.close()


async def test_pages_walk_back_with_before_and_a_follow_backfills(peernet_server: Server) -> None:
    writer_name, reader_name = unique_user("writer"), unique_user("reader")
    writer = await connect(peernet_server, writer_name)
    reader = await connect(peernet_server, reader_name)
    posted = [(await writer.request({"t": "post", "body": f"post {i}"}))["id"] for i in range(25)]
    own = (await reader.request({"t": "post", "body": "the reader's own"}))["id"]
    await ok(reader, {"t": "follow", "user": writer_name})  # after the posts: backfilled

    newest_first = [own, *reversed(posted)]
    full = await until(lambda: page(reader, 100), lambda p: len(p["items"]) == 26)
    assert ids(full) == newest_first and full["next"] is None
    assert all(a["ts"] >= b["ts"] for a, b in zip(full["items"], full["items"][1:], strict=False))

    walked: list[str] = []
    cursor = None
    sizes = []
    while True:
        p = await page(reader, 10, cursor)
        walked += ids(p)
        sizes.append(len(p["items"]))
        cursor = p["next"]
        if cursor is None:
            break
        assert isinstance(cursor, str)
    assert walked == newest_first and sizes == [10, 10, 6]

    default = await page(reader)
    assert ids(default) == newest_first[:20] and default["next"] is not None
    second = await http_page(peernet_server, reader_name, limit=7, before=default["next"])
    assert second.status_code == 200 and [i["id"] for i in second.json()["items"]] == newest_first[20:26]
    await reader.close()
    await writer.close()


async def test_a_celebritys_posts_are_merged_at_read_time(peernet_server: Server) -> None:
    star_name, pal_name = unique_user("star"), unique_user("pal")
    fan_names = [unique_user(f"fan{i}") for i in range(6)]  # more than the threshold of 5
    star = await connect(peernet_server, star_name)
    pal = await connect(peernet_server, pal_name)
    fans = [await connect(peernet_server, f) for f in fan_names]
    for fan in fans:
        await ok(fan, {"t": "follow", "user": star_name})
    await ok(fans[0], {"t": "follow", "user": pal_name})

    mixed: list[str] = []
    for i in range(3):
        mixed.append((await star.request({"t": "post", "body": f"star {i}"}))["id"])
        mixed.append((await pal.request({"t": "post", "body": f"pal {i}"}))["id"])
    newest_first = list(reversed(mixed))
    star_posts = [m for m in newest_first if m in mixed[0::2]]

    await until(lambda: page(fans[0], 100), lambda p: len(p["items"]) == 6)
    merged = await page(fans[0], 4)
    rest = await page(fans[0], 4, merged["next"])
    assert ids(merged) + ids(rest) == newest_first and rest["next"] is None
    assert ids(await until(lambda: page(fans[5]), lambda p: len(p["items"]) == 3)) == star_posts
    # Live pushes still reach every follower of a celebrity.
    push = await fans[5].next(lambda f: f.get("t") == "feed" and f["item"]["author"] == star_name)
    assert push["item"]["id"] == mixed[0]

    # Merged, not fanned out: the star's posts are in no fan's feed in Redis, and the star is
    # marked.
    ks = hash_tag(peernet_server.cfg.feeds.keyspace)
    r = redis_client(peernet_server.cfg.services.redis_url)
    try:
        assert await r.sismember(f"{ks}:celebs", star_name)
        stored = {m.decode() for m in await r.zrange(f"{ks}:feed:{fan_names[0]}", 0, -1)}
        assert stored & set(star_posts) == set()
        assert set(mixed[1::2]) <= stored
    finally:
        await r.aclose()
    for c in [star, pal, *fans]:
        await c.close()


async def test_killed_feed_shards_lose_no_post(peernet_server: Server) -> None:
    import ray

    from actors.wiring import NAMESPACE, feed_shard_name

    writer_name, reader_name = unique_user("writer"), unique_user("reader")
    writer = await connect(peernet_server, writer_name)
    reader = await connect(peernet_server, reader_name)
    await ok(reader, {"t": "follow", "user": writer_name})
    n = peernet_server.cfg.shards.feed_shards
    ray.init(address=peernet_server.gcs_address, namespace=NAMESPACE, log_to_driver=False)
    try:
        async def post_all() -> list[str]:
            posted = []
            for i in range(60):
                posted.append((await writer.request({"t": "post", "body": f"k{i}"}))["id"])
                await asyncio.sleep(0.02)
            return posted

        posting = asyncio.create_task(post_all())
        await asyncio.sleep(0.5)
        for i in range(n):
            ray.kill(ray.get_actor(feed_shard_name(i, n), namespace=NAMESPACE), no_restart=False)
        posted = await posting
    finally:
        ray.shutdown()
    full = await until(lambda: page(reader, 100), lambda p: len(p["items"]) == 60, within_s=120)
    assert ids(full) == list(reversed(posted))
    await reader.close()
    await writer.close()


async def test_bad_social_requests(peernet_server: Server) -> None:
    name = unique_user("bad")
    c = await connect(peernet_server, name)
    assert await error_code(c, {"t": "like", "post": "0000000000000000000000000z"}) == "not_found"
    assert await error_code(c, {"t": "unlike", "post": "0000000000000000000000000z"}) == "not_found"
    assert await error_code(c, {"t": "like", "post": 42}) == "bad_request"
    assert await error_code(c, {"t": "like"}) == "bad_request"
    assert await error_code(c, {"t": "follow", "user": name}) == "bad_request"
    assert await error_code(c, {"t": "unfollow", "user": name}) == "bad_request"
    assert await error_code(c, {"t": "follow", "user": "Not A User"}) == "bad_request"
    assert await error_code(c, {"t": "follow"}) == "bad_request"
    assert await error_code(c, {"t": "post", "body": ""}) == "bad_request"
    assert await error_code(c, {"t": "post", "body": "x" * 4001}) == "bad_request"
    assert await error_code(c, {"t": "post"}) == "bad_request"
    for limit in (0, 101, "10", 2.5, True):
        assert await error_code(c, {"t": "feed", "limit": limit}) == "bad_request", limit
    assert await error_code(c, {"t": "feed", "before": "not-a-cursor"}) == "bad_request"
    assert await error_code(c, {"t": "feed", "before": 12}) == "bad_request"
    assert (await page(c, 100))["items"] == []  # limits at the edges are fine
    assert (await page(c, 1))["next"] is None
    await ok(c, {"t": "post", "body": "x" * 4000})

    async with httpx.AsyncClient(base_url=peernet_server.url) as http:
        assert (await http.get("/v1/feed")).status_code == 401
        bad = await http.get("/v1/feed", headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401
    for params in ({"limit": 0}, {"limit": 101}, {"limit": "x"}, {"before": "zz"}):
        reply = await http_page(peernet_server, name, **params)
        assert reply.status_code == 400, params
        assert reply.json()["error"]["code"] == "bad_request"
    await c.close()


async def snapshot(server: Server, users: list[str]) -> dict[str, Any]:
    """Every page of `users` (posts, like counts and `liked`), their graph lists and every
    projection document."""
    pages = {}
    for user in users:
        reply = await http_page(server, user, limit=100)
        assert reply.status_code == 200
        pages[user] = reply.json()
        for side in ("following", "followers"):
            pages[f"{user} {side}"] = await http_list(server, user, side, limit=100)
    store = MongoDocumentStore(server.cfg.services.mongo_url, server.cfg.services.mongo_db)
    await store.start()
    try:
        docs = {c: await store.documents(c) for c in PROJECTIONS}
    finally:
        await store.stop()
    return {"pages": pages, "docs": docs}


async def run_replay(server: Server, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", "replay", *args, env=server.env, cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 180)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    return text


async def test_replay_rebuilds_feeds_counts_and_projections(peernet_server: Server) -> None:
    names = [unique_user(f"r{i}") for i in range(4)]
    cs = [await connect(peernet_server, n) for n in names]
    a, b, c, d = cs
    await ok(a, {"t": "follow", "user": names[1]})
    await ok(b, {"t": "follow", "user": names[0]})
    await ok(c, {"t": "follow", "user": names[0]})
    await ok(d, {"t": "follow", "user": names[1]})
    posts = []
    for i, author in enumerate([a, b, a, c, b]):
        posts.append((await author.request({"t": "post", "body": f"p{i}"}))["id"])
    await ok(b, {"t": "like", "post": posts[0]})
    await ok(c, {"t": "like", "post": posts[0]})
    await ok(a, {"t": "like", "post": posts[1]})
    await ok(d, {"t": "like", "post": posts[1]})
    await ok(d, {"t": "unlike", "post": posts[1]})
    await ok(d, {"t": "unfollow", "user": names[1]})
    await ok(c, {"t": "follow", "user": names[1]})
    assert (await a.request({"t": "dm", "to": names[1], "body": "hi"}))["t"] == "ok"

    # Settled: every post projected, every feed built, and the same snapshot twice in a row.
    previous: dict[str, Any] = {}

    async def settled_snapshot() -> dict[str, Any]:
        nonlocal previous
        await asyncio.sleep(1.0)
        now = await snapshot(peernet_server, names)
        same, previous = now == previous, now
        return {"now": now, "same": same}

    def settled(s: dict[str, Any]) -> bool:
        now = s["now"]
        projected = {doc["_id"] for doc in now["docs"]["posts"]}
        return (s["same"] and set(posts) <= projected
                and len(now["pages"][names[2]]["items"]) == 5)

    before = (await until(settled_snapshot, settled, within_s=90))["now"]
    assert [i["likes"] for i in before["pages"][names[0]]["items"] if i["id"] == posts[0]] == [2]

    # Wipe this server's feed keys and projections, then rebuild from the log.
    ks = hash_tag(peernet_server.cfg.feeds.keyspace)
    r = redis_client(peernet_server.cfg.services.redis_url)
    try:
        keys = [k async for k in r.scan_iter(match=f"{ks}:*", count=1000)]
        assert keys
        await r.delete(*keys)
    finally:
        await r.aclose()
    store = MongoDocumentStore(peernet_server.cfg.services.mongo_url,
                               peernet_server.cfg.services.mongo_db)
    await store.start()
    try:
        for collection in PROJECTIONS:
            await store.clear(collection)
    finally:
        await store.stop()
    wiped = await snapshot(peernet_server, names)
    assert all(p["items"] == [] for p in wiped["pages"].values())
    assert before["pages"][f"{names[1]} followers"]["items"] == sorted([names[0], names[2]])
    assert all(docs == [] for docs in wiped["docs"].values())

    out = await run_replay(peernet_server)
    assert "replay [" in out and "(100%)" in out
    assert await snapshot(peernet_server, names) == before
    await run_replay(peernet_server)  # safe to run twice
    assert await snapshot(peernet_server, names) == before
    await run_replay(peernet_server, "--wipe")  # and into empty stores by itself
    assert await snapshot(peernet_server, names) == before
    for client in cs:
        await client.close()
