"""TurnBatch: the calls of one event-loop turn go to the backend as one batch."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from bus.cache_memory import MemoryCache
from bus.eventlog_memory import MemoryEventLog
from bus.topics import peernet_topics
from peernet.codec import unpack
from peernet.config import load_config
from serve.batching import TurnBatch


class Backend:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[list[int]] = []
        self.fail = fail

    async def run(self, items: list[int]) -> list[int]:
        self.calls.append(items)
        await asyncio.sleep(0)
        if self.fail:
            raise RuntimeError("backend away")
        return [i * 10 for i in items]


async def test_the_calls_of_one_turn_are_one_batch_and_each_gets_its_answer() -> None:
    backend = Backend()
    batch: TurnBatch[int, int] = TurnBatch("t", backend.run)
    answers = await asyncio.gather(*(batch.submit(i) for i in range(5)))
    assert answers == [0, 10, 20, 30, 40]
    assert backend.calls == [[0, 1, 2, 3, 4]]
    # Calls of later turns are batches of their own.
    assert await batch.submit(7) == 70
    assert backend.calls[-1] == [7]


async def test_tasks_woken_in_one_turn_share_a_batch() -> None:
    backend = Backend()
    batch: TurnBatch[int, int] = TurnBatch("t", backend.run)
    go = asyncio.Event()

    async def request(i: int) -> int:
        await go.wait()  # like connections whose sockets were read in one epoll wake-up
        return await batch.submit(i)

    tasks = [asyncio.create_task(request(i)) for i in range(4)]
    await asyncio.sleep(0)
    go.set()
    assert await asyncio.gather(*tasks) == [0, 10, 20, 30]
    assert backend.calls == [[0, 1, 2, 3]]


async def test_a_full_turn_is_split_at_max_size() -> None:
    backend = Backend()
    batch: TurnBatch[int, int] = TurnBatch("t", backend.run, max_size=3)
    assert await asyncio.gather(*(batch.submit(i) for i in range(7))) == [i * 10 for i in range(7)]
    assert backend.calls == [[0, 1, 2], [3, 4, 5], [6]]


async def test_a_failed_batch_fails_every_caller_and_a_cancelled_one_is_skipped() -> None:
    backend = Backend(fail=True)
    batch: TurnBatch[int, int] = TurnBatch("t", backend.run)
    first, second = batch.submit(1), batch.submit(2)
    second.cancel()
    with pytest.raises(RuntimeError, match="backend away"):
        await first
    assert second.cancelled()
    assert backend.calls == [[1, 2]]  # the cancelled caller's item still ran


class CountingCache(MemoryCache):
    """A memory cache that records its batched calls: `claim N (+M marks)`, `mark N`."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    async def set_many_if_absent(self, items, *, ttl_s=None, first=()):  # type: ignore[no-untyped-def]
        self.calls.append(f"claim {len(items)} (+{len(first)} marks)")
        return await super().set_many_if_absent(items, ttl_s=ttl_s, first=first)

    async def set_many(self, items, *, ttl_s=None):  # type: ignore[no-untyped-def]
        self.calls.append(f"mark {len(items)}")
        await super().set_many(items, ttl_s=ttl_s)


async def _messenger(cache: MemoryCache) -> tuple[Any, MemoryEventLog]:
    from serve.messaging import Messenger

    log = MemoryEventLog()
    await log.start()
    await log.ensure_topics(peernet_topics(load_config()))
    return Messenger(load_config(), log, cache), log


async def test_a_turns_cid_claims_are_one_call_and_their_marks_ride_on_the_next() -> None:
    cache = CountingCache()
    messenger, log = await _messenger(cache)
    sent = await asyncio.gather(*(messenger.send_dm(f"u{i}", "bob", "hi", f"c{i}") for i in range(6)))
    assert cache.calls == ["claim 6 (+0 marks)"]  # `ok` did not wait for the marks
    # The next turn's claims carry the six marks in the same round trip.
    await asyncio.gather(*(messenger.send_dm(f"v{i}", "bob", "hi", f"d{i}") for i in range(2)))
    assert cache.calls == ["claim 6 (+0 marks)", "claim 2 (+6 marks)"]
    # The same cid again: the same message, not a second one.
    again = await messenger.send_dm("u3", "bob", "hi", "c3")
    assert again == sent[3]
    assert len(log.records(load_config().topics.messages)) == 8


async def test_marks_go_on_their_own_when_no_claim_comes() -> None:
    cache = CountingCache()
    messenger, _ = await _messenger(cache)
    await messenger.send_dm("u", "bob", "hi", "c")
    await asyncio.sleep(0.2)
    assert cache.calls == ["claim 1 (+0 marks)", "mark 1"]
    assert unpack(await cache.get("cid:u:c"))["state"] == "done"


async def test_a_retry_before_the_mark_waits_for_it_and_gets_the_same_id() -> None:
    cache = CountingCache()
    messenger, log = await _messenger(cache)
    first = await messenger.send_dm("u", "bob", "hi", "c")
    again = await messenger.send_dm("u", "bob", "hi", "c")  # its claim's round trip marks the first
    assert again == first
    assert len(log.records(load_config().topics.messages)) == 1


async def test_a_claim_left_pending_long_ago_is_sent_again_under_its_id() -> None:
    """A replica died between its append and its mark: the claim stays pending. Once that is
    older than any append can take, a retry appends the same event again (a duplicate by id,
    which the session shard drops), rather than answering `unavailable` for 24 hours."""
    from peernet.envelope import Event
    from serve.messaging import _STALE_PENDING_S, _claim

    cache = CountingCache()
    messenger, log = await _messenger(cache)
    old = Event("dm", "u", {"to": "bob", "body": "hi", "conv": "dm:bob:u"},
                ts=int((time.time() - _STALE_PENDING_S - 1) * 1000))
    await cache.set("cid:u:c", _claim(old, "pending"), ttl_s=60)
    sent = await messenger.send_dm("u", "bob", "hi", "c")
    assert (sent.id, sent.ts) == (old.id, old.ts)
    records = log.records(load_config().topics.messages)
    assert len(records) == 1 and Event.decode(records[0].value).id == old.id
