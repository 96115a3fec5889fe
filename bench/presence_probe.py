"""A closed-loop presence probe: `python -m bench.presence_probe --url URL`.

W watchers watch C users; each user in turn connects, then closes, one change at a time. The
latency of a change is taken at every watcher, from the moment the server has counted it (the
user's `welcome` arrived, or the user's close was sent) to the watcher's `presence` frame. So it
excludes the WebSocket handshake and load-generator lag that the open-loop harness
(`peernet bench presence`) includes, and measures presence's own path: report to the owning
shard, record, publish, fan-out, push.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

import httpx
import websockets
from websockets.asyncio.client import ClientConnection

from peernet.codec import decode_frame, encode_frame


class Peer:
    """One JSON connection with a frame reader."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, ws_url: str, token: str) -> tuple[Peer, dict[str, Any]]:
        peer = cls(await websockets.connect(ws_url, ping_interval=None))
        await peer.send({"t": "hello", "token": token})
        welcome = await peer.next("welcome")
        return peer, welcome

    async def _read(self) -> None:
        try:
            async for data in self.ws:
                await self.frames.put(decode_frame(data))
        except websockets.ConnectionClosed:
            pass

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(encode_frame(frame, False))

    async def next(self, t: str, timeout: float = 30) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.frames.get()
                if frame.get("t") == t:
                    return frame

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()


def percentiles(values: Sequence[float]) -> dict[str, float]:
    v = sorted(values)
    pick = lambda q: round(1000 * v[min(len(v) - 1, int(len(v) * q))], 1)  # noqa: E731
    return {"n": len(v), "p50_ms": pick(0.5), "p90_ms": pick(0.9), "p99_ms": pick(0.99),
            "max_ms": round(1000 * v[-1], 1)}


async def probe(url: str, watchers: int, users: int, rounds: int, gap_s: float) -> dict[str, Any]:
    ws_url = url.replace("http", "ws", 1) + "/v1/ws"
    tag = uuid.uuid4().hex[:6]
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        async def token(user: str) -> str:
            reply = await http.post("/v1/dev/token", json={"user": user})
            reply.raise_for_status()
            return str(reply.json()["token"])

        names = [f"pp{tag}_{i}" for i in range(users)]
        tokens = {u: await token(u) for u in names}
        peers = []
        for i in range(watchers):
            peer, _ = await Peer.open(ws_url, await token(f"pw{tag}_{i}"))
            await peer.send({"t": "watch", "rid": 1, "users": names})
            await peer.next("presence_state")
            peers.append(peer)

    latencies: dict[str, list[float]] = {"online": [], "offline": []}

    async def seen(peer: Peer, user: str, status: str, t0: float) -> None:
        while True:
            frame = await peer.next("presence")
            if frame["user"] == user and frame["status"] == status:
                latencies[status].append(time.monotonic() - t0)
                return

    for _ in range(rounds):
        for user in names:
            churner, _ = await Peer.open(ws_url, tokens[user])
            t0 = time.monotonic()
            await asyncio.gather(*(seen(p, user, "online", t0) for p in peers))
            t0 = time.monotonic()
            await churner.close()
            await asyncio.gather(*(seen(p, user, "offline", t0) for p in peers))
            await asyncio.sleep(gap_s)
        for peer in peers:  # a frame now and then: idle connections are closed at 2 x heartbeat
            await peer.send({"t": "ping"})
    for peer in peers:
        await peer.close()
    return {k: percentiles(v) for k, v in latencies.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.presence_probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--watchers", type=int, default=20)
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--gap", type=float, default=0.25, help="seconds between users")
    args = parser.parse_args(argv)
    result = asyncio.run(probe(args.url, args.watchers, args.users, args.rounds, args.gap))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
