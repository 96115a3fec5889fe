"""The DocumentStore contract, run against MongoDB (here SecantusDB) and the in-memory store."""

from __future__ import annotations

import datetime
import time
from typing import Any

import pytest
from bus_helpers import StoreKit

from bus.store import MESSAGES, DuplicateKeyError
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
    (got,) = await store.documents("events", ["evt-1"])
    assert list(got) == list(doc)  # field order kept, _id first
    # datetimes come back naive UTC with millisecond precision
    assert got["when"] == when.replace(microsecond=123000)
    assert {k: v for k, v in got.items() if k != "when"} == {
        k: v for k, v in doc.items() if k != "when"}
    # documents are copies both ways
    got["list"].append("changed")
    doc["nested"]["a"]["b"].append(3)
    (again,) = await store.documents("events", ["evt-1"])
    assert again["list"] == [1, "two", {"three": 3}]
    assert again["nested"] == {"a": {"b": [1, 2]}}


async def test_insert_without_id_does_not_touch_the_callers_dict(store_kit: StoreKit) -> None:
    store = await store_kit.make()
    doc = {"name": "no-id"}
    await store.insert("things", doc)
    assert doc == {"name": "no-id"}
    (got,) = await store.documents("things")
    assert got["name"] == "no-id" and got["_id"] is not None


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
    assert [d["_id"] for d in await store.documents("users") if d.get("handle") == "ada"] == ["u1"]


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
    assert await store.documents("feed") == docs  # e0..e4: `_id` order is `seq` order
    # a replay with newer content replaces whole documents
    await store.upsert_many("feed", [{"_id": "e1", "seq": 1}])
    assert await store.documents("feed", ["e1"]) == [{"_id": "e1", "seq": 1}]
    with pytest.raises(ValueError):
        await store.upsert_many("feed", [{"seq": 9}])


async def test_insert_new_twice_changes_nothing_and_raises_nothing(store_kit: StoreKit) -> None:
    """(done when) a document whose `_id` exists is left as it is, without an error."""
    store = await store_kit.make()
    docs = [{"_id": f"m{i}", "seq": i, "body": f"b{i}"} for i in range(5)]
    await store.insert_new("messages", docs)
    await store.insert_new("messages", docs)  # the same log records applied twice
    await store.insert_new("messages", [])
    assert await store.documents("messages") == docs  # m0..m4: `_id` order is `seq` order
    # a later document with an existing _id does not replace the first
    await store.insert_new("messages", [{"_id": "m1", "seq": 1, "body": "changed"}])
    assert await store.documents("messages", ["m1"]) == [docs[1]]
    with pytest.raises(ValueError):
        await store.insert_new("messages", [{"seq": 9}])


async def test_insert_new_writes_the_new_documents_of_a_mixed_batch(store_kit: StoreKit) -> None:
    """(done when) a batch that mixes new and existing ids inserts the new ones, including those
    after an existing one (unordered)."""
    store = await store_kit.make()
    await store.insert_new("users", [{"_id": "b"}, {"_id": "d", "v": 1}])
    await store.insert_new("users", [{"_id": "a"}, {"_id": "b", "v": 2}, {"_id": "c"},
                                     {"_id": "d", "v": 2}, {"_id": "e"}])
    assert await store.documents("users") == [
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
    assert [d["_id"] for d in await store.documents("handles")] == ["u1", "u3"]


async def test_documents_by_id_in_id_order(store_kit: StoreKit) -> None:
    """(done when) documents are read by `_id`, in ascending `_id` order, the missing ones left
    out; `_id`s compare as MongoDB's (1 and 1.0 are one)."""
    store = await store_kit.make()
    await store.upsert_many("docs", [{"_id": i, "n": i} for i in (5, 2, 9, 1)])
    await store.upsert_many("docs", [{"_id": "a"}])
    assert [d["_id"] for d in await store.documents("docs")] == [1, 2, 5, 9, "a"]
    assert await store.documents("docs", [9, 2, 404, 2.0]) == [{"_id": 2, "n": 2},
                                                                {"_id": 9, "n": 9}]
    assert await store.documents("docs", []) == []
    assert await store.documents("never-written") == []


async def test_delete_by_id_and_clear(store_kit: StoreKit) -> None:
    """(done when) `delete` removes the given `_id`s and counts those that were there, so a
    replayed deletion is harmless; `clear` empties one collection and no other."""
    store = await store_kit.make()
    await store.upsert_many("follows", [{"_id": f"a:{u}"} for u in "bcde"])
    await store.upsert_many("likes", [{"_id": "p1:a"}])
    assert await store.delete("follows", ["a:b", "a:d", "a:zz"]) == 2
    assert await store.delete("follows", ["a:b", "a:d"]) == 0  # the same deletion replayed
    assert await store.delete("follows", []) == 0
    assert [d["_id"] for d in await store.documents("follows")] == ["a:c", "a:e"]
    assert await store.clear("follows") == 2
    assert await store.documents("follows") == []
    assert await store.clear("follows") == 0
    assert await store.documents("likes") == [{"_id": "p1:a"}]


def _dm(i: int, conv: str, pos: int) -> dict[str, Any]:
    return {"_id": f"{conv}-{i}", "conv": conv, "from": "a", "to": "b", "body": f"m{i}",
            "ts": 1_700_000_000_000 + i, "pos": pos}


async def test_history_pages_newest_first_by_position(store_kit: StoreKit) -> None:
    """(done when) a history page holds one conversation's messages, the highest `pos` below
    the cursor first, at most `limit` of them, and paging by the last `pos` reaches every
    message once."""
    store = await store_kit.make()
    conv, other = "dm:a:b", "dm:a:c"
    # Written out of order, and interleaved with another conversation's.
    positions = [7, 3, 12, 0, 9, 4]
    mine = [_dm(i, conv, pos) for i, pos in enumerate(positions)]
    await store.insert_new(MESSAGES, mine + [_dm(i, other, 100 + i) for i in range(4)])
    newest_first = sorted(mine, key=lambda d: d["pos"], reverse=True)

    assert await store.history_page(conv, limit=100) == newest_first
    assert await store.history_page(conv, limit=2) == newest_first[:2]
    assert await store.history_page(conv, before=9, limit=3) == newest_first[2:5]
    assert await store.history_page(conv, before=0, limit=3) == []
    assert await store.history_page("dm:x:y", limit=3) == []

    pages, before = [], None
    while True:
        page = await store.history_page(conv, before=before, limit=4)
        pages.append([d["pos"] for d in page])
        if len(page) < 4:
            break
        before = page[-1]["pos"]
    assert pages == [[12, 9, 7, 4], [3, 0]]

    for bad in (0, -1):
        with pytest.raises(ValueError):
            await store.history_page(conv, limit=bad)
    with pytest.raises(OverflowError):  # no log position is past 8 bytes, and BSON says so
        await store.history_page(conv, before=2**63, limit=1)


async def test_ping(store_kit: StoreKit) -> None:
    store = await store_kit.make()
    await store.ping()


async def test_unreachable_store_is_unavailable(store_kit: StoreKit) -> None:
    store = store_kit.unreachable()
    await store.start()
    try:
        t0 = time.monotonic()
        for call in (store.ping(), store.insert("c", {"x": 1}), store.documents("c"),
                     store.documents("c", [1]), store.upsert_many("c", [{"_id": 1}]),
                     store.insert_new("c", [{"_id": 1}]), store.delete("c", [1]),
                     store.clear("c"), store.history_page("dm:a:b", limit=1)):
            with pytest.raises(PeerNetError) as caught:
                await call
            assert caught.value.code is ErrorCode.UNAVAILABLE and caught.value.retriable
        assert time.monotonic() - t0 < 15
    finally:
        await store.stop()
