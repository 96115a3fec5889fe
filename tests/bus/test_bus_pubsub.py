"""The PubSub contract, run against Redis and the in-memory broker; and delivery between two OS
processes through Redis."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
import time
from urllib.parse import urlsplit

import hiredis
import pytest
from bus_helpers import PubSubKit, Services, eventually, eventually_equal, unique

from bus.pubsub_redis import RedisPubSub
from peernet.config import PROJECT_ROOT


class Inbox:
    """A handler that records what it gets."""

    def __init__(self) -> None:
        self.got: list[tuple[str, bytes]] = []

    def __call__(self, channel: str, payload: bytes) -> None:
        self.got.append((channel, payload))

    @property
    def payloads(self) -> list[bytes]:
        return [p for _, p in self.got]


async def test_publish_reaches_every_local_handler_once(pubsub_kit: PubSubKit) -> None:
    ps = await pubsub_kit.make()
    channel = unique("test:ch")
    a, b = Inbox(), Inbox()
    await ps.subscribe(channel, a)
    await ps.subscribe(channel, b)
    # one process subscribed, however many handlers it has
    receivers = await ps.publish(channel, b"hello")
    await eventually(lambda: a.got and b.got)
    assert a.got == b.got == [(channel, b"hello")]
    if pubsub_kit.exact_counts:
        assert receivers == 1
        assert await ps.publish(unique("test:nobody"), b"x") == 0


async def test_publish_many_delivers_every_message_in_order(pubsub_kit: PubSubKit) -> None:
    ps = await pubsub_kit.make()
    one, two = unique("test:ch"), unique("test:ch")
    got = Inbox()
    await ps.subscribe(one, got)
    await ps.subscribe(two, got)
    await ps.publish_many([(one, b"1"), (two, b"2"), (one, b"3")])
    await ps.publish_many([])
    await eventually(lambda: len(got.got) == 3)
    assert got.got == [(one, b"1"), (two, b"2"), (one, b"3")]


async def test_one_upstream_subscription_per_channel(pubsub_kit: PubSubKit) -> None:
    ps = await pubsub_kit.make()
    channel = unique("test:ch")
    assert await pubsub_kit.numsub(channel) == 0
    first = await ps.subscribe(channel, Inbox())
    second = await ps.subscribe(channel, Inbox())
    assert await pubsub_kit.numsub(channel) == 1
    await first.unsubscribe()
    assert await pubsub_kit.numsub(channel) == 1
    await second.unsubscribe()
    await second.unsubscribe()  # twice: harmless
    await eventually_equal(lambda: pubsub_kit.numsub(channel), 0)


async def test_unsubscribed_handler_gets_nothing_more(pubsub_kit: PubSubKit) -> None:
    ps = await pubsub_kit.make()
    channel = unique("test:ch")
    stays, leaves = Inbox(), Inbox()
    await ps.subscribe(channel, stays)
    sub = await ps.subscribe(channel, leaves)
    await ps.publish(channel, b"1")
    await eventually(lambda: len(leaves.got) == 1 and len(stays.got) == 1)
    await sub.unsubscribe()
    await ps.publish(channel, b"2")
    await eventually(lambda: len(stays.got) == 2)
    assert leaves.payloads == [b"1"]


async def test_fan_out_to_processes_in_publish_order(pubsub_kit: PubSubKit) -> None:
    publisher = await pubsub_kit.make()
    one, two = await pubsub_kit.make(), await pubsub_kit.make()
    channel = unique("test:ch")
    in_one, in_two = Inbox(), Inbox()
    await one.subscribe(channel, in_one)
    await two.subscribe(channel, in_two)
    sent = [f"m{i}".encode() for i in range(20)]
    for payload in sent:
        receivers = await publisher.publish(channel, payload)
        assert receivers == 2 or not pubsub_kit.exact_counts
    await eventually(lambda: len(in_one.got) == 20 and len(in_two.got) == 20)
    assert in_one.payloads == in_two.payloads == sent


async def test_payload_is_copied(pubsub_kit: PubSubKit) -> None:
    ps = await pubsub_kit.make()
    channel = unique("test:ch")
    inbox = Inbox()
    await ps.subscribe(channel, inbox)
    buf = bytearray(b"original")
    await ps.publish(channel, buf)  # type: ignore[arg-type]
    buf[:] = b"mutated!"
    await eventually(lambda: inbox.got)
    assert inbox.payloads == [b"original"]
    assert type(inbox.payloads[0]) is bytes


async def test_failing_handler_does_not_stop_delivery(pubsub_kit: PubSubKit,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    ps = await pubsub_kit.make()
    channel = unique("test:ch")
    inbox = Inbox()

    def broken(channel: str, payload: bytes) -> None:
        raise RuntimeError("handler bug")

    await ps.subscribe(channel, broken)
    await ps.subscribe(channel, inbox)
    await ps.publish(channel, b"1")
    await ps.publish(channel, b"2")
    await eventually(lambda: len(inbox.got) == 2)
    assert getattr(ps, "handler_errors") == 2  # noqa: B009 - counted, not swallowed
    assert "handler bug" in caplog.text


async def test_reconnect_resubscribes_and_calls_on_reconnect(pubsub_kit: PubSubKit) -> None:
    ps = await pubsub_kit.make()
    publisher = await pubsub_kit.make()
    channel = unique("test:ch")
    inbox = Inbox()
    reconnected: list[float] = []
    ps.on_reconnect(lambda: reconnected.append(time.monotonic()))
    await ps.subscribe(channel, inbox)
    await ps.subscribe(channel, Inbox())
    await publisher.publish(channel, b"before")
    await eventually(lambda: inbox.got)

    await pubsub_kit.drop(ps)
    await eventually(lambda: reconnected, within_s=10)
    # on_reconnect runs once the channels are subscribed again: publishing now reaches us.
    assert await pubsub_kit.numsub(channel) == 1
    receivers = await publisher.publish(channel, b"after")
    assert receivers == 1 or not pubsub_kit.exact_counts
    await eventually(lambda: len(inbox.got) == 2)
    assert inbox.payloads == [b"before", b"after"]
    assert len(reconnected) == 1


_PEER = textwrap.dedent("""
    import asyncio, sys
    from bus.pubsub_redis import RedisPubSub

    async def main(url, inbound, outbound):
        ps = RedisPubSub(url)
        await ps.start()
        got = asyncio.get_running_loop().create_future()
        await ps.subscribe(inbound, lambda ch, p: got.done() or got.set_result(p))
        print("ready", flush=True)
        payload = await asyncio.wait_for(got, 20)
        receivers = await ps.publish(outbound, b"echo:" + payload)
        print("echoed", receivers, flush=True)
        await ps.stop()

    asyncio.run(main(*sys.argv[1:4]))
""")


@pytest.mark.stack
async def test_delivery_between_two_os_processes(services: Services) -> None:
    """(done when) a message published in one OS process reaches a subscriber in another, and
    back."""
    url = services.redis_url
    inbound, outbound = unique("test:to-peer"), unique("test:from-peer")
    here = RedisPubSub(url)
    await here.start()
    echoes = Inbox()
    await here.subscribe(outbound, echoes)
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    peer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _PEER, url, inbound, outbound,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        cwd=str(PROJECT_ROOT))
    try:
        assert peer.stdout is not None
        line = await asyncio.wait_for(peer.stdout.readline(), 30)
        assert line.strip() == b"ready", line + await _stderr(peer)
        assert await here.publish(inbound, b"ping") == 1
        await eventually(lambda: echoes.got, within_s=10)
        assert echoes.got == [(outbound, b"echo:ping")]
        line = await asyncio.wait_for(peer.stdout.readline(), 10)
        assert line.strip() == b"echoed 1"
        assert await asyncio.wait_for(peer.wait(), 10) == 0
    finally:
        if peer.returncode is None:
            peer.kill()
            await peer.wait()
        await here.stop()


async def _stderr(proc: asyncio.subprocess.Process) -> bytes:
    if proc.returncode is None:
        proc.kill()
    _, err = await proc.communicate()
    return err


class _Relay:
    """A TCP relay to Redis whose open connections can go silent (bytes stop flowing both ways,
    nothing is closed), as behind a half-open connection; connections opened later relay."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self.silent = False
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        born_silent = self.silent
        up_reader, up_writer = await asyncio.open_connection(*self._target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                if self.silent and not born_silent and self.accepted == 1:
                    continue  # the first connection has gone silent: swallow
                dst.write(data)
                await dst.drain()

        for t in (pipe(reader, up_writer), pipe(up_reader, writer)):
            task = asyncio.ensure_future(t)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            self._server.close()


@pytest.mark.stack
async def test_a_silent_connection_is_noticed_by_its_ping_and_replaced(services: Services) -> None:
    """A connection that stops answering without closing (half-open) is pinged after one quiet
    interval and dropped after the next; the reconnect subscribes again and delivery resumes."""
    url = urlsplit(services.redis_url)
    relay = _Relay(url.hostname or "127.0.0.1", url.port or 6379)
    port = await relay.start()
    ps = RedisPubSub(f"redis://127.0.0.1:{port}/0", ping_interval_s=0.3)
    publisher = RedisPubSub(services.redis_url)
    await ps.start()
    await publisher.start()
    try:
        channel = unique("test:ch")
        inbox = Inbox()
        reconnected: list[float] = []
        ps.on_reconnect(lambda: reconnected.append(time.monotonic()))
        await ps.subscribe(channel, inbox)
        await publisher.publish(channel, b"before")
        await eventually(lambda: inbox.got)
        relay.silent = True
        lost = await publisher.publish(channel, b"unseen")  # Redis sends it; the relay swallows it
        assert lost == 1
        await eventually(lambda: reconnected, within_s=5)
        assert ps.connection_errors == 1 and relay.accepted == 2
        await publisher.publish(channel, b"after")
        await eventually(lambda: len(inbox.got) == 2)
        assert inbox.payloads == [b"before", b"after"]
    finally:
        await ps.stop()
        await publisher.stop()
        await relay.stop()


async def test_a_loading_answer_to_the_watchdogs_ping_keeps_the_connection() -> None:
    """Redis takes SUBSCRIBE while it loads its data but answers PING with LOADING (seen after a
    restart reading a large AOF): that answer proves the connection alive, so the subscriber
    keeps it and goes on delivering, where it used to reconnect on every quiet interval."""
    pings = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal pings
        replies = hiredis.Reader()
        while data := await reader.read(65536):
            replies.feed(data)
            while (command := replies.gets()) is not False:
                name = bytes(command[0]).upper()
                if name == b"SUBSCRIBE":
                    for i, channel in enumerate(command[1:], 1):
                        writer.write(b"*3\r\n$9\r\nsubscribe\r\n$%d\r\n%s\r\n:%d\r\n"
                                     % (len(channel), channel, i))
                elif name == b"PING":
                    pings += 1
                    writer.write(b"-LOADING Redis is loading the dataset in memory\r\n")
                    if pings == 2:  # then a message, as Redis sends once it has loaded
                        writer.write(b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nhello\r\n")
                else:  # the handshake (CLIENT SETNAME, CLIENT SETINFO)
                    writer.write(b"+OK\r\n")
            await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    ps = RedisPubSub(f"redis://127.0.0.1:{port}/0", ping_interval_s=0.2)
    await ps.start()
    try:
        inbox = Inbox()
        await ps.subscribe("ch", inbox)
        await eventually(lambda: pings >= 4, within_s=5)
        assert inbox.got == [("ch", b"hello")]
        assert ps.connection_errors == 0 and ps.reconnects == 0
    finally:
        await ps.stop()
        server.close()
