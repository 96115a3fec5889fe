"""AckBuffer (serve/acks.py): a replica's acks written together, each user's newest only, kept
while the inbox cache is away, written at stop."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest

from bus.inbox_memory import MemoryInboxCache
from peernet.errors import ErrorCode, PeerNetError
from serve.acks import AckBuffer


class CountingInbox(MemoryInboxCache):
    def __init__(self) -> None:
        super().__init__(retention_items=100, retention_ms=60_000)
        self.writes: list[dict[str, int]] = []

    async def ack_many(self, acks: Mapping[str, int]) -> dict[str, int]:
        self.writes.append(dict(acks))
        return await super().ack_many(acks)


async def test_acks_within_an_interval_are_one_write_of_each_users_newest() -> None:
    inbox = CountingInbox()
    buffer = AckBuffer(inbox, flush_ms=50)
    await buffer.start()
    try:
        for seq in (1, 2, 3):
            await buffer.add("alice", seq)
        await buffer.add("bob", 7)
        await buffer.add("alice", 2)  # cumulative: an older ack changes nothing
        assert inbox.writes == []  # nothing written before the interval
        for _ in range(100):
            if inbox.writes:
                break
            await asyncio.sleep(0.01)
        assert inbox.writes == [{"alice": 3, "bob": 7}]
        assert (await inbox.acked("alice"), await inbox.acked("bob")) == (3, 7)
    finally:
        await buffer.stop()


async def test_acks_are_kept_while_the_cache_is_away_and_written_when_it_answers() -> None:
    inbox = CountingInbox()
    buffer = AckBuffer(inbox, flush_ms=1000)  # flushed by hand here
    await buffer.add("alice", 4)
    inbox.set_down(True)
    with pytest.raises(PeerNetError) as caught:
        await buffer.flush()
    assert caught.value.code is ErrorCode.UNAVAILABLE
    await buffer.add("alice", 3)  # older than the one kept
    await buffer.add("bob", 1)
    assert buffer.pending() == {"alice": 4, "bob": 1}
    inbox.set_down(False)
    await buffer.flush()
    assert (await inbox.acked("alice"), await inbox.acked("bob")) == (4, 1)
    assert buffer.pending() == {} and buffer.failures == 1


async def test_stop_writes_what_is_pending() -> None:
    inbox = CountingInbox()
    buffer = AckBuffer(inbox, flush_ms=60_000)
    await buffer.start()
    await buffer.add("alice", 9)
    await buffer.stop()
    assert await inbox.acked("alice") == 9


async def test_with_no_interval_each_ack_is_written_at_once() -> None:
    inbox = CountingInbox()
    buffer = AckBuffer(inbox, flush_ms=0)
    await buffer.start()
    await buffer.add("alice", 1)
    await buffer.add("alice", 2)
    assert inbox.writes == [{"alice": 1}, {"alice": 2}]
    inbox.set_down(True)
    with pytest.raises(PeerNetError):  # the client hears of it, as before the buffer
        await buffer.add("alice", 3)
    await buffer.stop()
