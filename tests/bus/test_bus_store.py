"""The DocumentStore contract, run against MongoDB (here SecantusDB) and the in-memory store."""

from __future__ import annotations

import datetime
import time
from typing import Any

import pytest
from bus_helpers import StoreKit

from bus.store import DuplicateKeyError
from peernet.errors import ErrorCode, PeerNetError


async def test_round_trip_keeps_types(store_kit: StoreKit) -> None:
    """(done when) what is written is read back, with the types MongoDB gives back."""
    store = await store_kit.make()
    when = datetime.datetime(2025, 5, 17, 12, 30, 15, 123456)
    doc: dict[str, Any] = {
        "_id": "evt-1", "s": "héllo", "i": 7, "big": 2**40, "f": 1.5, "b": True, "n": None,
        "bytes": b"\x00\xff", "list": [1, "two", {"three": 3}], "nested": {"a": {"b": [1, 2]}},
        "when": when,
    }
    await store.insert("events", doc)
    (got,) = await store.find("events", {"_id": "evt-1"})
    assert list(got) == list(doc)  # field order kept, _id first
    # datetimes come back naive UTC with millisecond precision
    assert got["when"] == when.replace(microsecond=123000)
    assert {k: v for k, v in got.items() if k != "when"} == {
        k: v for k, v in doc.items() if k != "when"}
    # documents are copies both ways
    got["list"].append("changed")
    doc["nested"]["a"]["b"].append(3)
    (again,) = await store.find("events", {"_id": "evt-1"})
    assert again["list"] == [1, "two", {"three": 3}]
    assert again["nested"] == {"a": {"b": [1, 2]}}


async def test_insert_without_id_does_not_touch_the_callers_dict(store_kit: StoreKit) -> None:
    store = await store_kit.make()
    doc = {"name": "no-id"}
    await store.insert("things", doc)
    assert doc == {"name": "no-id"}
    (got,) = await store.find("things", {"name": "no-id"})
    assert got["_id"] is not None


async def test_unique_index_is_enforced(store_kit: StoreKit) -> None:
    """(done when) a unique index refuses a second document with the same key."""
    store = await store_kit.make()
    await store.ensure_index("users", [("handle", 1)], unique=True)
    await store.ensure_index("users", [("handle", 1)], unique=True)  # again: harmless
    await store.ensure_index("users", [("org", 1), ("n", -1)])
    await store.insert("users", {"_id": "u1", "handle": "ada"})
    with pytest.raises(DuplicateKeyError):
        await store.insert("users", {"_id": "u2", "handle": "ada"})
    with pytest.raises(DuplicateKeyError):
        await store.insert("users", {"_id": "u1", "handle": "grace"})  # _id is unique too
    await store.insert("users", {"_id": 1})
    with pytest.raises(DuplicateKeyError):
        await store.insert("users", {"_id": 1.0})  # 1 and 1.0 are the same _id to MongoDB
    # an upsert may not break the index either
    with pytest.raises(DuplicateKeyError):
        await store.upsert_many("users", [{"_id": "u3", "handle": "ada"}])
    # ...but replacing the owner of the key is fine
    await store.upsert_many("users", [{"_id": "u1", "handle": "ada", "v": 2}])
    assert [d["_id"] for d in await store.find("users", {"handle": "ada"})] == ["u1"]


async def test_unique_index_over_duplicates_is_refused(store_kit: StoreKit) -> None:
    store = await store_kit.make()
    await store.insert("dups", {"_id": 1, "k": "same"})
    await store.insert("dups", {"_id": 2, "k": "same"})
    with pytest.raises(DuplicateKeyError):
        await store.ensure_index("dups", [("k", 1)], unique=True)
    with pytest.raises(ValueError):
        # the same keys with other options
        await store.ensure_index("dups2", [("k", 1)], unique=True)
        await store.ensure_index("dups2", [("k", 1)], unique=False)


async def test_upsert_many_is_idempotent(store_kit: StoreKit) -> None:
    store = await store_kit.make()
    docs = [{"_id": f"e{i}", "seq": i, "body": f"b{i}"} for i in range(5)]
    await store.upsert_many("feed", docs)
    await store.upsert_many("feed", docs)  # the same log records applied twice
    await store.upsert_many("feed", [])
    assert await store.find("feed", {}, sort=[("seq", 1)]) == docs
    # a replay with newer content replaces whole documents
    await store.upsert_many("feed", [{"_id": "e1", "seq": 1}])
    assert await store.find("feed", {"_id": "e1"}) == [{"_id": "e1", "seq": 1}]
    with pytest.raises(ValueError):
        await store.upsert_many("feed", [{"seq": 9}])


async def test_insert_new_twice_changes_nothing_and_raises_nothing(store_kit: StoreKit) -> None:
    """(done when) a document whose `_id` exists is left as it is, without an error."""
    store = await store_kit.make()
    docs = [{"_id": f"m{i}", "seq": i, "body": f"b{i}"} for i in range(5)]
    await store.insert_new("messages", docs)
    await store.insert_new("messages", docs)  # the same log records applied twice
    await store.insert_new("messages", [])
    assert await store.find("messages", {}, sort=[("seq", 1)]) == docs
    # a later document with an existing _id does not replace the first
    await store.insert_new("messages", [{"_id": "m1", "seq": 1, "body": "changed"}])
    assert await store.find("messages", {"_id": "m1"}) == [docs[1]]
    with pytest.raises(ValueError):
        await store.insert_new("messages", [{"seq": 9}])


async def test_insert_new_writes_the_new_documents_of_a_mixed_batch(store_kit: StoreKit) -> None:
    """(done when) a batch that mixes new and existing ids inserts the new ones, including those
    after an existing one (unordered)."""
    store = await store_kit.make()
    await store.insert_new("users", [{"_id": "b"}, {"_id": "d", "v": 1}])
    await store.insert_new("users", [{"_id": "a"}, {"_id": "b", "v": 2}, {"_id": "c"},
                                     {"_id": "d", "v": 2}, {"_id": "e"}])
    assert await store.find("users", {}, sort=[("_id", 1)]) == [
        {"_id": "a"}, {"_id": "b"}, {"_id": "c"}, {"_id": "d", "v": 1}, {"_id": "e"}]


async def test_insert_new_refuses_a_duplicate_on_another_unique_index(
        store_kit: StoreKit) -> None:
    """Only an existing `_id` is passed over: a unique index on another key still raises, once
    the rest of the batch is written."""
    store = await store_kit.make()
    await store.ensure_index("handles", [("handle", 1)], unique=True)
    await store.insert_new("handles", [{"_id": "u1", "handle": "ada"}])
    with pytest.raises(DuplicateKeyError):
        await store.insert_new("handles", [{"_id": "u2", "handle": "ada"},
                                           {"_id": "u3", "handle": "grace"}])
    assert [d["_id"] for d in await store.find("handles", {}, sort=[("_id", 1)])] == ["u1", "u3"]


async def test_find_queries_sort_limit_and_delete(store_kit: StoreKit) -> None:
    store = await store_kit.make()
    await store.upsert_many("msgs", [
        {"_id": 1, "conv": "c1", "seq": 3, "tags": ["a", "b"], "meta": {"pinned": True}},
        {"_id": 2, "conv": "c1", "seq": 1, "tags": ["b"]},
        {"_id": 3, "conv": "c2", "seq": 2, "tags": []},
        {"_id": 4, "conv": "c1", "seq": 2},
    ])

    async def ids(query: dict[str, Any], **kw: Any) -> list[Any]:
        return [d["_id"] for d in await store.find("msgs", query, **kw)]

    assert await ids({"conv": "c1"}, sort=[("seq", 1)]) == [2, 4, 1]
    assert await ids({"conv": "c1"}, sort=[("seq", -1)], limit=2) == [1, 4]
    assert await ids({}, sort=[("conv", 1), ("seq", -1)]) == [1, 4, 2, 3]
    assert await ids({"seq": {"$gte": 2, "$lt": 3}}, sort=[("_id", 1)]) == [3, 4]
    assert await ids({"conv": {"$in": ["c2", "c9"]}}) == [3]
    assert await ids({"tags": "b"}, sort=[("_id", 1)]) == [1, 2]
    assert await ids({"meta.pinned": True}) == [1]
    assert await ids({"tags": {"$exists": False}}) == [4]
    assert await ids({"conv": {"$ne": "c1"}}) == [3]
    assert await ids({"$or": [{"seq": 1}, {"conv": "c2"}]}, sort=[("_id", 1)]) == [2, 3]
    assert await store.delete_many("msgs", {"conv": "c1", "seq": {"$gt": 1}}) == 2
    assert await ids({}, sort=[("_id", 1)]) == [2, 3]
    assert await store.delete_many("msgs", {"conv": "nobody"}) == 0
    assert await store.find("never-written", {}) == []


async def test_ping(store_kit: StoreKit) -> None:
    store = await store_kit.make()
    await store.ping()


async def test_unreachable_store_is_unavailable(store_kit: StoreKit) -> None:
    store = store_kit.unreachable()
    await store.start()
    try:
        t0 = time.monotonic()
        for call in (store.ping(), store.insert("c", {"x": 1}), store.find("c", {}),
                     store.upsert_many("c", [{"_id": 1}]), store.insert_new("c", [{"_id": 1}]),
                     store.delete_many("c", {})):
            with pytest.raises(PeerNetError) as caught:
                await call
            assert caught.value.code is ErrorCode.UNAVAILABLE and caught.value.retriable
        assert time.monotonic() - t0 < 15
    finally:
        await store.stop()
