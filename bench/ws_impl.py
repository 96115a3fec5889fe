"""`python -m bench.ws_impl`: the CPU a WebSocket implementation under uvicorn costs the server
per message, for choosing the replicas' one (issue 17: "the WebSocket implementation under the
replicas' uvicorn is measured and the cheapest kept").

Each implementation serves a small ASGI app in a process of its own (uvicorn, uvloop, httptools,
no compression, no keepalive pings, as the replicas run): it answers every binary message with
one binary message of the same size, which is a DM's `dm` and `ok`. This process opens
`--clients` connections and sends `--messages` messages over them, `--window` in flight per
connection, and reads the server process's CPU time from /proc before and after. The
implementations take turns, `--rounds` times, so a machine that gets busier mid-run weighs on
each alike.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import psutil
import websockets

# uvicorn's `ws` setting for each implementation; "lean" is the replicas' own (serve/ws_server.py).
IMPLS = {
    "lean": "serve.ws_server:LeanWebSocketProtocol",
    "websockets-sansio": "websockets-sansio",
    "websockets": "websockets",
    "wsproto": "wsproto",
}


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Accept, then answer each message with one of the same kind and size."""
    if scope["type"] != "websocket":
        return
    await receive()
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("bytes") is not None:
            await send({"type": "websocket.send", "bytes": message["bytes"]})
        else:
            await send({"type": "websocket.send", "text": message.get("text") or ""})


def _serve(impl: str, port: int) -> None:
    import uvicorn

    ws: Any = IMPLS[impl]
    if ":" in ws:
        module, _, name = ws.partition(":")
        ws = getattr(__import__(module, fromlist=[name]), name)
    uvicorn.run(echo_app, host="127.0.0.1", port=port, ws=ws, ws_per_message_deflate=False,
                ws_ping_interval=None, loop="uvloop", http="httptools", log_level="warning",
                lifespan="off")


async def _drive(port: int, clients: int, messages: int, window: int, size: int) -> float:
    """Send `messages` over `clients` connections and wait for every answer; seconds taken."""
    payload = os.urandom(size)
    conns = [await websockets.connect(f"ws://127.0.0.1:{port}/", compression=None,
                                      ping_interval=None, max_queue=None)
             for _ in range(clients)]
    per = messages // clients

    async def one(ws: Any) -> None:
        async def sender() -> None:
            for _ in range(per):
                await ws.send(payload)

        async def reader() -> None:
            for _ in range(per):
                await ws.recv()

        await asyncio.gather(sender(), reader())

    try:
        t0 = time.monotonic()
        await asyncio.gather(*(one(ws) for ws in conns))
        return time.monotonic() - t0
    finally:
        await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def measure(impl: str, port: int, clients: int, messages: int, window: int, size: int) -> float:
    """Microseconds of the server process's CPU per message answered."""
    proc = subprocess.Popen([sys.executable, "-m", "bench.ws_impl", "--serve", impl,
                             "--port", str(port)])
    try:
        server = psutil.Process(proc.pid)
        deadline = time.monotonic() + 20
        while True:  # until it listens
            try:
                asyncio.run(_drive(port, 1, 1, 1, size))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        before = _cpu(server)
        asyncio.run(_drive(port, clients, messages, window, size))
        return (_cpu(server) - before) / messages * 1e6
    finally:
        proc.terminate()
        proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ws_impl", description=__doc__.split("\n\n")[0])
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated, of: " + ", ".join(IMPLS))
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--window", type=int, default=1, help="(kept for the record: sends are not paced)")
    parser.add_argument("--size", type=int, default=120, help="bytes per message (a msgpack DM is about 120)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port", type=int, default=18990)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        _serve(args.serve, args.port)
        return 0
    impls = [i for i in args.impls.split(",") if i]
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        parser.error(f"unknown implementation(s): {', '.join(unknown)}")
    results: dict[str, list[float]] = {i: [] for i in impls}
    for r in range(1, args.rounds + 1):
        for impl in impls:
            us = measure(impl, args.port, args.clients, args.messages, args.window, args.size)
            results[impl].append(us)
            print(f"round {r}: {impl:18s} {us:7.1f} us of server CPU per message", flush=True)
    print(f"\n{args.messages:,} messages of {args.size} bytes over {args.clients} connections, "
          f"{args.rounds} rounds; median:")
    for impl in sorted(impls, key=lambda i: statistics.median(results[i])):
        runs = ", ".join(f"{v:.1f}" for v in results[impl])
        print(f"  {impl:18s} {statistics.median(results[impl]):7.1f} us  ({runs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
