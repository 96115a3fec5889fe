"""The Cache contract, run against Redis and the in-memory cache."""

from __future__ import annotations

import asyncio
import time

import pytest
from bus_helpers import CacheKit, eventually, eventually_equal

from peernet.errors import ErrorCode, PeerNetError

# Long enough that a key read right after its set has not expired yet on a loaded machine (with
# 0.2 s, a pause between the set and the read looked like expiry); expiry is then waited for,
# within EXPIRED_WITHIN_S, not slept on, so that a key which never expires fails the test.
TTL_S = 1.0
EXPIRED_WITHIN_S = 5.0



async def test_set_get_delete(cache_kit: CacheKit) -> None:
    cache = await cache_kit.make()
    key = f"{cache_kit.prefix}:a"
    assert await cache.get(key) is None
    await cache.set(key, b"\x00one")
    assert await cache.get(key) == b"\x00one"
    await cache.set(key, b"two")
    assert await cache.get(key) == b"two"
    # visible to another client (process) as soon as set returns
    other = await cache_kit.make()
    assert await other.get(key) == b"two"
    await other.delete(key)
    assert await cache.get(key) is None
    await cache.delete(key)  # absent: harmless


async def test_ttl_expires(cache_kit: CacheKit) -> None:
    cache = await cache_kit.make()
    short, kept = f"{cache_kit.prefix}:short", f"{cache_kit.prefix}:kept"
    await cache.set(short, b"v", ttl_s=TTL_S)
    await cache.set(kept, b"v", ttl_s=30)
    assert await cache.get(short) == b"v"
    await eventually_equal(lambda: cache.get(short), None, EXPIRED_WITHIN_S)
    assert await cache.get(kept) == b"v"
    # set without ttl clears an earlier one
    await cache.set(kept, b"w")
    assert await cache.get(kept) == b"w"
    with pytest.raises(ValueError):
        await cache.set(short, b"v", ttl_s=0)


async def test_set_if_absent_is_atomic_across_clients(cache_kit: CacheKit) -> None:
    a, b = await cache_kit.make(), await cache_kit.make()
    key = f"{cache_kit.prefix}:once"
    results = await asyncio.gather(*(
        client.set_if_absent(key, str(i).encode(), ttl_s=30)
        for i, client in enumerate([a, b] * 10)))
    assert results.count(True) == 1
    winner = results.index(True)
    assert await a.get(key) == str(winner).encode()
    assert await b.set_if_absent(key, b"late") is False


async def test_batched_claims_and_sets_behave_as_one_call_each(cache_kit: CacheKit) -> None:
    a, b = await cache_kit.make(), await cache_kit.make()
    p = cache_kit.prefix
    await a.set(f"{p}:taken", b"first", ttl_s=30)
    got = await b.set_many_if_absent(
        [(f"{p}:new1", b"1"), (f"{p}:taken", b"x"), (f"{p}:new2", b"2"), (f"{p}:new1", b"again")],
        ttl_s=30)
    assert got == [True, False, True, False]
    assert [await a.get(f"{p}:{k}") for k in ("new1", "taken", "new2")] == [b"1", b"first", b"2"]
    # Claimed across clients: every key once, whichever batch got there first.
    keys = [f"{p}:race{i}" for i in range(20)]
    first, second = await asyncio.gather(a.set_many_if_absent([(k, b"a") for k in keys], ttl_s=30),
                                         b.set_many_if_absent([(k, b"b") for k in keys], ttl_s=30))
    assert all(x != y for x, y in zip(first, second, strict=True))
    await a.set_many([(f"{p}:new1", b"done"), (f"{p}:taken", b"over")], ttl_s=TTL_S)
    assert await b.get(f"{p}:new1") == b"done" and await b.get(f"{p}:taken") == b"over"
    # The batch's ttl applies to each key.
    await eventually_equal(lambda: b.get(f"{p}:new1"), None, EXPIRED_WITHIN_S)
    await eventually_equal(lambda: b.get(f"{p}:taken"), None, EXPIRED_WITHIN_S)
    assert await a.set_many_if_absent([]) == [] and await a.set_many([]) is None
    # `first`: set outright in the same round trip, before the claims (which may then see them).
    got = await a.set_many_if_absent([(f"{p}:f2", b"claim"), (f"{p}:f3", b"claim")], ttl_s=30,
                                     first=[(f"{p}:f1", b"set"), (f"{p}:f2", b"set")])
    assert got == [False, True]
    assert [await b.get(f"{p}:{k}") for k in ("f1", "f2", "f3")] == [b"set", b"set", b"claim"]
    assert await a.set_many_if_absent([], first=[(f"{p}:f1", b"again")]) == []
    assert await b.get(f"{p}:f1") == b"again"


async def test_set_if_absent_after_expiry(cache_kit: CacheKit) -> None:
    cache = await cache_kit.make()
    key = f"{cache_kit.prefix}:lease"
    assert await cache.set_if_absent(key, b"first", ttl_s=TTL_S) is True
    assert await cache.set_if_absent(key, b"second", ttl_s=TTL_S) is False
    assert await cache.get(key) == b"first"  # the refused one changed nothing
    await eventually(lambda: cache.set_if_absent(key, b"third"), EXPIRED_WITHIN_S)
    assert await cache.get(key) == b"third"


async def test_a_groups_members_are_seen_by_every_client_until_removed(
        cache_kit: CacheKit) -> None:
    a, b = await cache_kit.make(), await cache_kit.make()
    group = f"{cache_kit.prefix}:group"
    assert await a.members(group) == {}
    await a.put_member(group, "r1", b"\x00one", ttl_s=30)
    await b.put_member(group, "r2", b"two", ttl_s=30)
    assert await a.members(group) == {"r1": b"\x00one", "r2": b"two"}
    await b.put_member(group, "r1", b"again", ttl_s=30)  # the latest value
    assert await a.members(group) == {"r1": b"again", "r2": b"two"}
    await a.remove_member(group, "r1")
    await a.remove_member(group, "absent")  # harmless
    assert await b.members(group) == {"r2": b"two"}
    # Groups and plain keys keep apart.
    assert await a.members(f"{cache_kit.prefix}:other") == {}
    assert await a.get(group) is None


async def test_each_member_expires_by_itself(cache_kit: CacheKit) -> None:
    cache = await cache_kit.make()
    group = f"{cache_kit.prefix}:leases"
    await cache.put_member(group, "short", b"v", ttl_s=TTL_S)
    await cache.put_member(group, "kept", b"v", ttl_s=30)
    assert set(await cache.members(group)) == {"short", "kept"}
    await eventually_equal(lambda: cache.members(group), {"kept": b"v"}, EXPIRED_WITHIN_S)
    # A member put again after it expired is back.
    await cache.put_member(group, "short", b"w", ttl_s=30)
    assert await cache.members(group) == {"kept": b"v", "short": b"w"}
    with pytest.raises(ValueError):
        await cache.put_member(group, "short", b"v", ttl_s=0)


async def test_ping(cache_kit: CacheKit) -> None:
    cache = await cache_kit.make()
    await cache.ping()


async def test_unreachable_cache_is_unavailable(cache_kit: CacheKit) -> None:
    cache = cache_kit.unreachable()
    await cache.start()
    try:
        t0 = time.monotonic()
        for call in (cache.ping(), cache.get("k"), cache.set("k", b"v"),
                     cache.set_if_absent("k", b"v"), cache.delete("k"),
                     cache.put_member("g", "m", b"v", ttl_s=1), cache.members("g"),
                     cache.remove_member("g", "m")):
            with pytest.raises(PeerNetError) as caught:
                await call
            assert caught.value.code is ErrorCode.UNAVAILABLE and caught.value.retriable
        assert time.monotonic() - t0 < 10
    finally:
        await cache.stop()

