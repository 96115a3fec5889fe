"""Messenger: direct messages into the event log, durable before acknowledged, with `cid`
idempotency for 24 hours."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from actors.inbox_items import recipients_header
from bus.cache import Cache
from bus.eventlog import EventLog
from peernet.codec import pack, unpack
from peernet.config import PeerNetConfig
from peernet.envelope import Event
from peernet.errors import unavailable
from serve import metrics
from serve.validate import dm_conv

# How long a second request with the same cid waits for the first to become durable.
_CID_WAIT_S = 3.0


@dataclass(frozen=True, slots=True)
class Sent:
    id: str
    conv: str
    ts: int


class Messenger:
    def __init__(self, cfg: PeerNetConfig, log: EventLog, cache: Cache) -> None:
        self._cfg = cfg
        self._log = log
        self._cache = cache

    async def append(self, event: Event, *, key: str, recipients: list[str]) -> None:
        """Append `event` durably (acks=all) or raise PeerNetError(unavailable)."""
        start = time.perf_counter()
        await self._log.append(self._cfg.topics.events, event.encode(), key=key.encode(),
                               headers=(recipients_header(recipients),))
        metrics.APPEND_LATENCY.observe(time.perf_counter() - start)

    async def send_dm(self, sender: str, to: str, body: str, cid: str | None) -> Sent:
        conv = dm_conv(sender, to)
        event = Event("dm", sender, {"to": to, "body": body, "conv": conv})
        if cid is None:
            await self.append(event, key=conv, recipients=[sender, to])
            return Sent(event.id, conv, event.ts)

        key = f"cid:{sender}:{cid}"
        claim = pack({"id": event.id, "conv": conv, "ts": event.ts, "done": False})
        if not await self._cache.set_if_absent(key, claim, ttl_s=self._cfg.gateway.cid_ttl_s):
            return await self._earlier(key)
        try:
            await self.append(event, key=conv, recipients=[sender, to])
        except BaseException:
            # Nothing acknowledged: free the cid so that the client's retry stores the message.
            await self._cache.delete(key)
            raise
        await self._cache.set(key, pack({"id": event.id, "conv": conv, "ts": event.ts, "done": True}),
                              ttl_s=self._cfg.gateway.cid_ttl_s)
        return Sent(event.id, conv, event.ts)

    async def _earlier(self, key: str) -> Sent:
        """The result of the first request with this cid, once it is durable."""
        deadline = asyncio.get_running_loop().time() + _CID_WAIT_S
        while True:
            raw = await self._cache.get(key)
            if raw is None:
                raise unavailable("an earlier request with this cid failed; retry")
            state = unpack(raw)
            if state["done"]:
                return Sent(state["id"], state["conv"], state["ts"])
            if asyncio.get_running_loop().time() > deadline:
                raise unavailable("an earlier request with this cid is still in flight; retry")
            await asyncio.sleep(0.02)
