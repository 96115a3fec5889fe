"""Gateway replicas of the test server: kill one as a crash would, and wait for Serve to bring
the count back (tests that kill a replica leave two behind them for the tests after)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

from wsclient import Client, Server, unique_user


async def connect(server: Server, user: str) -> Client:
    return await Client.connect(server.ws_url, server.url, user)


def kill_replica(replica: str) -> float:
    """SIGKILL the process of gateway replica `replica` (a crash, as a dead node looks to the
    others); returns when. ray.kill would do, but it takes effect only once the cluster gets to
    it, seconds later on a busy machine, which would blur the bound this measures."""
    import ray

    (actor,) = [a for a in ray._private.state.actors().values()
                if (a.get("Name") or "").endswith(f"#{replica}") and a.get("State") == "ALIVE"]
    killed = time.monotonic()
    os.kill(int(actor["Pid"]), signal.SIGKILL)
    return killed


async def until_two_replicas(server: Server) -> None:
    """Serve replaces the killed replica; later tests expect two. Probes stay open until then:
    HAProxy balances by least connections, so a closed probe sends the next to the same
    replica."""
    deadline = time.monotonic() + 120
    seen: set[str] = set()
    probes: list[Client] = []
    try:
        while len(seen) < 2:
            assert time.monotonic() < deadline, "the killed gateway replica never came back"
            try:
                c = await connect(server, unique_user("probe"))
                seen.add(c.welcome["replica"])
                probes.append(c)
            except Exception:
                pass
            await asyncio.sleep(0.5)
    finally:
        for probe in probes:
            with contextlib.suppress(Exception):
                await probe.close()
