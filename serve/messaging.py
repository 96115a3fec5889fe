"""Messenger: direct and group messages into the messages log, durable before acknowledged, with
`cid` idempotency for 24 hours (`once`, which a group's creation uses too)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bus.cache import Cache
from bus.eventlog import EventLog
from bus.groups import Group
from peernet.codec import pack, unpack
from peernet.config import PeerNetConfig
from peernet.envelope import Event
from peernet.errors import PeerNetError, unavailable
from peernet.wire import recipients_header
from serve import metrics
from serve.batching import TurnBatch
from serve.validate import dm_conv

log = logging.getLogger("peernet.messaging")

# How long a second request with the same cid waits for the first to become durable.
_CID_WAIT_S = 3.0
# A claim still `pending` after this long belongs to a request whose append is over, one way or
# the other (the gateway's producer gives up on a record after its delivery timeout, 10 s), but
# whose mark never reached the cache (its replica died, or the cache failed meanwhile): a retry
# then appends the same event again, as after `failed`.
_STALE_PENDING_S = 30.0
# How long a mark may wait for a claim's round trip to ride on before it goes on its own.
_MARK_DELAY_S = 0.05


@dataclass(frozen=True, slots=True)
class Sent:
    id: str
    conv: str
    ts: int


def _claim(event: Event, state: str) -> bytes:
    return pack({"id": event.id, "conv": event.data["conv"], "ts": event.ts, "state": state})


class Messenger:
    """Sends direct and group messages. The `cid` claims of one event-loop turn go to the cache
    together (TurnBatch), and the marks that say how a claimed send ended (done, failed) ride on
    the next claims' round trip, or go on their own after at most _MARK_DELAY_S: one round trip
    per turn with cids instead of two per DM. A mark is not awaited: `ok` waits only for the
    log. A second request with the same cid that comes before its mark waits for it
    (`_earlier`)."""

    def __init__(self, cfg: PeerNetConfig, log: EventLog, cache: Cache) -> None:
        self._cfg = cfg
        self._log = log
        self._cache = cache
        self._claims: TurnBatch[tuple[str, bytes], bool] = TurnBatch("cid_claim", self._claim_many)
        self._marks_due: list[tuple[str, bytes]] = []
        self._mark_timer: asyncio.TimerHandle | None = None
        self._mark_tasks: set[asyncio.Task[None]] = set()

    async def _claim_many(self, items: list[tuple[str, bytes]]) -> list[bool]:
        marks = self._take_marks()
        try:
            return await self._cache.set_many_if_absent(items, ttl_s=self._cfg.gateway.cid_ttl_s,
                                                        first=marks)
        except BaseException:
            self._marks_due[:0] = marks  # a failed round trip may have set none: send them again
            self._schedule_marks()
            raise

    def _mark(self, key: str, event: Event, state: str) -> None:
        self._marks_due.append((key, _claim(event, state)))
        self._schedule_marks()

    def _schedule_marks(self) -> None:
        if self._mark_timer is None and self._marks_due:
            self._mark_timer = asyncio.get_running_loop().call_later(_MARK_DELAY_S, self._send_marks)

    def _take_marks(self) -> list[tuple[str, bytes]]:
        if self._mark_timer is not None:
            self._mark_timer.cancel()
            self._mark_timer = None
        marks, self._marks_due = self._marks_due, []
        return marks

    def _send_marks(self) -> None:
        self._mark_timer = None
        marks = self._take_marks()
        if marks:
            task = asyncio.create_task(self._write_marks(marks), name="cid-marks")
            self._mark_tasks.add(task)
            task.add_done_callback(self._mark_tasks.discard)

    async def _write_marks(self, marks: list[tuple[str, bytes]]) -> None:
        try:
            await self._cache.set_many(marks, ttl_s=self._cfg.gateway.cid_ttl_s)
        except PeerNetError as exc:
            # Lost marks leave their claims pending; a retry treats a stale one as failed.
            metrics.BACKGROUND_ERRORS.labels("cid_marks").inc()
            log.warning("cid marks not written (%d): %s", len(marks), exc)

    async def append(self, event: Event, *, key: str, recipients: list[str],
                     topic: str | None = None) -> None:
        """Append `event` durably (acks=all) to `topic` (the event log unless named) or raise
        PeerNetError(unavailable)."""
        start = time.perf_counter()
        await self._log.append(topic or self._cfg.topics.events, event.encode(), key=key.encode(),
                               headers=(recipients_header(recipients),))
        metrics.APPEND_LATENCY.observe(time.perf_counter() - start)

    async def send_dm(self, sender: str, to: str, body: str, cid: str | None) -> Sent:
        conv = dm_conv(sender, to)

        def make(**same: Any) -> Event:
            return Event("dm", sender, {"to": to, "body": body, "conv": conv}, **same)

        return await self.once(sender, cid, make, lambda event: self.append(
            event, key=conv, recipients=[sender, to], topic=self._cfg.topics.messages))

    async def send_to_group(self, sender: str, group: Group, body: str, cid: str | None) -> Sent:
        """A message to `group` as the gateway read it (the sender a member): its recipients are
        the members of that state, and `mv` its version, from which the session shards tell
        a send that raced a membership change (actors/groups.py)."""

        def make(**same: Any) -> Event:
            return Event("group_msg", sender,
                         {"conv": group.conv, "body": body, "mv": group.version}, **same)

        return await self.once(sender, cid, make, lambda event: self.append(
            event, key=group.conv, recipients=list(group.members),
            topic=self._cfg.topics.messages))

    async def once(self, sender: str, cid: str | None, make: Callable[..., Event],
                   deliver: Callable[[Event], Awaitable[None]], *, scope: str = "cid") -> Sent:
        """`deliver(make())` (which makes the event durable or raises), at most once per sender
        and `cid` within the cid ttl: a repeat gets the first one's Sent. `make(id=, ts=)` makes
        the event again with the first attempt's id and time; its `data["conv"]` is returned.
        `scope` keeps the cids of different requests (a dm, a group_create) apart."""
        if cid is None:
            event = make()
            await deliver(event)
            return Sent(event.id, event.data["conv"], event.ts)

        # The cid's claim: pending while an append is in flight, done once it is durable, failed
        # when it was refused. A refused append may still reach the log (the producer can deliver
        # a record after its caller's timeout), so a retry after `failed` appends the same event
        # again, with the same id: a copy that did land is then a duplicate the client drops by
        # id, never a second message.
        event = make()
        key = f"{scope}:{sender}:{cid}"
        ttl_s = self._cfg.gateway.cid_ttl_s
        if not await self._claims.submit((key, _claim(event, "pending"))):
            earlier = await self._earlier(key)
            if isinstance(earlier, Sent):
                return earlier
            event = make(id=earlier["id"], ts=earlier["ts"])
            await self._cache.set(key, _claim(event, "pending"), ttl_s=ttl_s)
        try:
            await deliver(event)
        except BaseException:
            self._mark(key, event, "failed")
            raise
        self._mark(key, event, "done")
        return Sent(event.id, event.data["conv"], event.ts)

    async def _earlier(self, key: str) -> Sent | dict[str, Any]:
        """The result of the first request with this cid once it is durable, or its claim when
        it failed (to be sent again with the same id)."""
        deadline = asyncio.get_running_loop().time() + _CID_WAIT_S
        while True:
            raw = await self._cache.get(key)
            if raw is None:
                raise unavailable("an earlier request with this cid expired meanwhile; retry")
            state = unpack(raw)
            if state["state"] == "done":
                return Sent(state["id"], state["conv"], state["ts"])
            if state["state"] == "failed" or time.time() * 1000 - state["ts"] > _STALE_PENDING_S * 1000:
                return state
            if asyncio.get_running_loop().time() > deadline:
                raise unavailable("an earlier request with this cid is still in flight; retry")
            await asyncio.sleep(0.02)
