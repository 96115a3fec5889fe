"""The home feed of test_bus_feed_page_cost.py, and, run as a script, what reading its first page
of 20 costs: round trips, Redis commands, Redis's time in the page script and the client's CPU,
for this tree's bus/feeds_redis.py and for those of other git revisions, interleaved:

    PYTHONPATH=. python tests/bus/feed_page_cost.py --redis-url redis://127.0.0.1:6391/0 \\
        --rev 51f59c4 --rev HEAD

Redis's time is INFO commandstats' EVALSHA time over the pages read, so give it a Redis nothing
else uses (its keys are written under a keyspace of their own and deleted afterwards)."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import subprocess
import tempfile
import time
import uuid
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from bus.feeds import FeedPage, FeedWrites, GraphChange, LikeChange, Post

READER = "reader"
PAGE = 20
FOLLOWED = [f"pal{i}" for i in range(10)]
CELEBRITIES = ["star0", "star1"]


async def fill(store: Any) -> None:
    """A reader who follows 10 authors (5 posts each in the home feed), 2 celebrities (10 posts
    each, never fanned out) and no longer follows an author whose posts are still in the feed
    (the newest entries); a third of the posts have likes, and the reader likes every fifth
    post. Its first page of 20 holds 14 posts of the feed and 6 of the celebrities."""
    posts = [Post(f"{a}-{k}", a, f"post {k} of {a}", 1000 + 37 * i + 3 * k)
             for i, a in enumerate([*FOLLOWED, "gone"]) for k in range(5)]
    stars = [Post(f"{c}-{k}", c, f"post {k} of {c}", 1010 + 41 * k + j)
             for j, c in enumerate(CELEBRITIES) for k in range(10)]
    likes = [LikeChange(f"fan{u}", p.id, True) for p in (posts + stars)[::3] for u in range(3)]
    likes += [LikeChange(READER, p.id, True) for p in (posts + stars)[::5]]
    await store.record([GraphChange(READER, a, True) for a in [*FOLLOWED, *CELEBRITIES, "gone"]],
                       likes, posts + stars)
    await store.write(FeedWrites(celebrities=CELEBRITIES,
                                 adds=[(READER, p.id, p.ts) for p in posts]))
    await store.record([GraphChange(READER, "gone", False)], [], [])


def _unread(page: FeedPage) -> FeedPage:
    """`page` without `liked`, which revisions before it do not read: pages compare across them."""
    return FeedPage([replace(p, liked=None) for p in page.items], page.next)


def _feeds_module(rev: str | None, tmp: Path) -> Any:
    """bus/feeds_redis.py of this tree (None) or of git revision `rev`, as a module."""
    root = Path(__file__).resolve().parents[2]
    path = root / "bus" / "feeds_redis.py"
    if rev is not None:
        path = tmp / f"feeds_redis_{uuid.uuid4().hex}.py"
        path.write_text(subprocess.run(["git", "show", f"{rev}:bus/feeds_redis.py"], cwd=root,
                                       check=True, capture_output=True, text=True).stdout)
    spec = importlib.util.spec_from_file_location(f"feeds_redis_{uuid.uuid4().hex}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def _measure(url: str, revs: list[str | None], rounds: int, pages: int) -> None:
    from redis_cost import redis_cost

    from bus.redis import redis_client

    admin = redis_client(url)
    keyspace = f"page-cost-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        stores = {rev or "this tree": _feeds_module(rev, Path(tmp)).RedisFeedStore(
            redis_client(url), keyspace=keyspace, cap=800) for rev in revs}
    first = next(iter(stores.values()))
    await fill(first)
    expected = await first.page(READER, PAGE, None)
    redis_us: dict[str, list[float]] = {name: [] for name in stores}
    cpu_us: dict[str, list[float]] = {name: [] for name in stores}
    latency: dict[str, list[float]] = {name: [] for name in stores}
    try:
        for name, store in stores.items():
            assert _unread(await store.page(READER, PAGE, None)) == _unread(expected), name
            _, cost = await redis_cost(partial(store.page, READER, PAGE, None), [url],
                                       store.prefix)
            print(f"{name}: {cost.round_trips} round trip(s), {len(cost.commands)} Redis commands: "
                  + ", ".join(f"{n} {c}" for c, n in cost.by_name().items()))
        for _ in range(rounds):
            for name, store in stores.items():
                before = (await admin.info("commandstats"))["cmdstat_evalsha"]
                cpu = time.process_time()
                for _ in range(pages):
                    t = time.perf_counter()
                    await store.page(READER, PAGE, None)
                    latency[name].append(time.perf_counter() - t)
                cpu_us[name].append(1e6 * (time.process_time() - cpu) / pages)
                after = (await admin.info("commandstats"))["cmdstat_evalsha"]
                redis_us[name].append((after["usec"] - before["usec"])
                                      / max(1, after["calls"] - before["calls"]))
        for name in stores:
            lat = sorted(latency[name])
            print(f"{name}: {rounds} rounds of {pages} pages: Redis per page script median "
                  f"{statistics.median(redis_us[name]):.0f} us (min {min(redis_us[name]):.0f}); "
                  f"client CPU per page median {statistics.median(cpu_us[name]):.0f} us; latency "
                  f"p50 {1e6 * lat[len(lat) // 2]:.0f} us, p99 {1e6 * lat[int(0.99 * len(lat))]:.0f} us")
    finally:
        await first.clear()
        for store in stores.values():
            await store.close()
        await admin.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", required=True, help="a single Redis nothing else uses")
    parser.add_argument("--rev", action="append", default=[],
                        help="a git revision whose page script to measure (repeatable); "
                             "default: this tree's")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--pages", type=int, default=500, help="pages per round")
    args = parser.parse_args()
    asyncio.run(_measure(args.redis_url, args.rev or [None], args.rounds, args.pages))


if __name__ == "__main__":
    main()
