"""What a pub/sub message costs its subscriber: run as a script, it subscribes a RedisPubSub of
this tree to 100 channels, has a subprocess publish N messages of 150 bytes on them (pipelined,
as a session or feed shard does), and prints the subscriber's CPU per message received:

    PYTHONPATH=. python tests/bus/pubsub_intake.py --redis-url redis://127.0.0.1:6379/0

Channels are named `pubsub-intake:<uuid>:<i>`, so a Redis others use is fine."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid

from bus.pubsub_redis import RedisPubSub

_PUBLISHER = """
import redis, sys
r = redis.Redis.from_url(sys.argv[1])
prefix, n = sys.argv[2], int(sys.argv[3])
p = r.pipeline(transaction=False)
payload = b"x" * 150
for i in range(n):
    p.publish(f"{prefix}:{i % 100}", payload)
    if i % 1000 == 999:
        p.execute()
p.execute()
"""


async def measure(url: str, n: int) -> float:
    """The subscriber's CPU per message, in microseconds."""
    prefix = f"pubsub-intake:{uuid.uuid4().hex[:8]}"
    ps = RedisPubSub(url)
    await ps.start()
    got = 0
    done = asyncio.get_running_loop().create_future()

    def handler(channel: str, payload: bytes) -> None:
        nonlocal got
        got += 1
        if got == n and not done.done():
            done.set_result(None)

    try:
        for i in range(100):
            await ps.subscribe(f"{prefix}:{i}", handler)
        cpu0 = time.process_time()
        publisher = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _PUBLISHER, url, prefix, str(n))
        await asyncio.wait_for(done, 300)
        cpu = time.process_time() - cpu0
        await publisher.wait()
    finally:
        await ps.stop()
    return 1e6 * cpu / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--messages", type=int, default=200_000)
    args = ap.parse_args()
    us = asyncio.run(measure(args.redis_url, args.messages))
    print(f"{args.messages} messages: subscriber CPU {us:.1f} us per message")


if __name__ == "__main__":
    main()
