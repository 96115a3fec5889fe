"""What a call on a Redis-backed store costs Redis: its client's round trips and the commands
Redis runs for it, the inner calls of scripts included (importable from test modules)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from unittest import mock

import redis.asyncio as aioredis
from bus_helpers import unique
from redis.asyncio.connection import AbstractConnection

T = TypeVar("T")


@dataclass(frozen=True)
class RedisCost:
    round_trips: int
    commands: list[str]  # names, lower case, in the order Redis ran them

    def by_name(self) -> dict[str, int]:
        return dict(Counter(self.commands).most_common())


async def redis_cost(action: Callable[[], Awaitable[T]], node_urls: Sequence[str],
                     key_prefix: str) -> tuple[T, RedisCost]:
    """Run `action` and say what it cost. Round trips: every packed send of this process's
    Redis connections (a command, a pipeline, a health-check PING each send once and wait for
    their replies); nothing else of this process may talk to Redis meanwhile. Commands: what
    MONITOR on each of `node_urls` shows naming a key that contains `key_prefix` (so other
    clients of a shared Redis do not count); a script's own calls show up one by one."""
    monitors: list[Any] = []
    clients = [aioredis.Redis.from_url(url) for url in node_urls]
    try:
        for client in clients:
            monitor = client.monitor()
            await monitor.__aenter__()
            monitors.append(monitor)
        sends = 0
        send = AbstractConnection.send_packed_command

        async def counted(conn: AbstractConnection, command: Any, check_health: bool = True) -> None:
            nonlocal sends
            sends += 1
            await send(conn, command, check_health)

        with mock.patch.object(AbstractConnection, "send_packed_command", counted):
            result = await action()
        # What each node ran for `action` comes before this marker in its MONITOR stream.
        marker = unique("redis-cost-marker")
        commands: list[str] = []
        for client, monitor in zip(clients, monitors, strict=True):
            await client.echo(marker)
            while True:
                command = (await monitor.next_command())["command"]
                if marker in command:
                    break
                if key_prefix in command:
                    commands.append(command.split(" ", 1)[0].lower())
        return result, RedisCost(sends, commands)
    finally:
        for monitor in monitors:
            await monitor.__aexit__(None, None, None)
        for client in clients:
            await client.aclose()
