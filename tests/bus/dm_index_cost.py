"""What the conversation index adds to a DM (issue 21), run as a script: the session shard's
inbox append of a batch of DMs (two items each, the sender's and the recipient's) with and
without the batch's conversation ops, interleaved, on a Redis nothing else uses:

    PYTHONPATH=. python tests/bus/dm_index_cost.py --redis-url redis://127.0.0.1:6391/0

Redis's time is INFO commandstats' EVALSHA time over the appends; the shard's own CPU is the
process time of making the ops (actors/conversations.py) and of the append call's encoding."""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
import uuid
from typing import Any

from actors.conversations import conversation_op
from bus.conversations import ConversationOp
from bus.inbox_redis import RedisInboxCache
from bus.redis import redis_client
from peernet.envelope import Event


def batch(users: list[str], size: int, offset: int) -> tuple[list[tuple[str, Any]],
                                                            list[ConversationOp]]:
    items: list[tuple[str, Any]] = []
    ops: list[ConversationOp] = []
    for i in range(size):
        a, b = random.sample(users, 2)
        lo, hi = sorted([a, b])
        event = Event("dm", a, {"to": b, "body": "x" * 60, "conv": f"dm:{lo}:{hi}"})
        for user in (a, b):
            items.append((user, {"t": "msg", "seq": offset + i, "id": event.id,
                                 "conv": event.data["conv"], "from": a, "to": b,
                                 "body": event.data["body"], "ts": event.ts}))
        op = conversation_op(event, offset + i, [a, b], notify=True)
        assert op is not None
        ops.append(op)
    return items, ops


async def evalsha_usec(r: Any) -> float:
    stats = await r.info("commandstats")
    return float(stats.get("cmdstat_evalsha", {}).get("usec", 0))


async def main(url: str, rounds: int, size: int) -> None:
    tag = uuid.uuid4().hex[:8]
    users = [f"u{i}_{tag}" for i in range(1_000)]
    cache = RedisInboxCache(redis_client(url), retention_items=10_000, retention_ms=10**9)
    r = redis_client(url)
    per_dm: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    offset = 1
    try:
        for _ in range(rounds):
            for with_index in (False, True):
                items, ops = batch(users, size, offset)
                offset += size
                if not with_index:
                    ops = []
                before = await evalsha_usec(r)
                started = time.process_time()
                await cache.append(items, checkpoint_name=f"cost-{tag}", checkpoint={0: offset},
                                   conversations=ops)
                cpu[with_index].append((time.process_time() - started) * 1e6 / size)
                per_dm[with_index].append((await evalsha_usec(r) - before) / size)
        for with_index in (False, True):
            label = "with the index   " if with_index else "without the index"
            print(f"{label}: Redis {statistics.median(per_dm[with_index]):.1f} us per DM "
                  f"(fastest round {min(per_dm[with_index]):.1f}), the append call's CPU "
                  f"{statistics.median(cpu[with_index]):.1f} us per DM")
        started = time.process_time()
        for _ in range(rounds):
            batch(users, size, 0)
        print(f"making a DM's op and items: {(time.process_time() - started) * 1e6 / rounds / size:.1f}"
              " us (the items alone are the shard's own work either way)")
    finally:
        keys = [k async for k in r.scan_iter(match=f"inbox:*{tag}*", count=5000)]
        for i in range(0, len(keys), 500):
            await r.delete(*keys[i:i + 500])
        await r.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--batch", type=int, default=50, help="DMs per append")
    args = parser.parse_args()
    asyncio.run(main(args.redis_url, args.rounds, args.batch))
