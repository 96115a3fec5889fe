"""The control channel between the coordinator and its load processes: dicts one way and the
other, over asyncio queues in one process or MessagePack over a pipe between processes."""

from __future__ import annotations

import asyncio
from multiprocessing.connection import Connection as PipeEnd
from typing import Any, Protocol

import msgpack

Message = dict[str, Any]


class Channel(Protocol):
    async def send(self, msg: Message) -> None: ...

    async def recv(self) -> Message: ...


class QueueChannel:
    """One end of an in-process channel (see `queue_pair`)."""

    def __init__(self, inbound: asyncio.Queue[Message], outbound: asyncio.Queue[Message]) -> None:
        self._in = inbound
        self._out = outbound

    async def send(self, msg: Message) -> None:
        await self._out.put(msg)

    async def recv(self) -> Message:
        return await self._in.get()


def queue_pair() -> tuple[QueueChannel, QueueChannel]:
    a: asyncio.Queue[Message] = asyncio.Queue()
    b: asyncio.Queue[Message] = asyncio.Queue()
    return QueueChannel(a, b), QueueChannel(b, a)


class PipeChannel:
    """One end of a multiprocessing pipe; blocking pipe I/O runs in a thread so neither side's
    event loop stalls on a large result."""

    def __init__(self, end: PipeEnd) -> None:
        self._end = end

    async def send(self, msg: Message) -> None:
        data = msgpack.packb(msg, use_bin_type=True)
        await asyncio.to_thread(self._end.send_bytes, data)

    async def recv(self) -> Message:
        data = await asyncio.to_thread(self._end.recv_bytes)
        msg = msgpack.unpackb(data, raw=False, strict_map_key=False)
        if not isinstance(msg, dict):
            raise TypeError("control message is not a map")
        return msg

    def close(self) -> None:
        self._end.close()
