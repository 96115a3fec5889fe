"""Redis over TLS (issue 8: "TLS where the URL says so"): with `PEERNET_REDIS_URL=rediss://...
?ssl_ca_certs=CA`, PeerNet's cache, its pub/sub connection (also after a reconnect), the other
stores' clients and the stack's probe all speak TLS to a real redis-server, and a client that
does not trust the server's certificate is refused with PeerNetError(unavailable) in bounded time.

The server is the machine's redis-server with TLS only (`--port 0`) on a free port of 127.0.0.1,
its certificates from a throwaway CA (bus_tls.py); the project's own Redis is not touched."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from bus_helpers import eventually, unique
from bus_tls import TlsFiles, make_tls_files
from ports import free_ports

from bus.backends import presence_store
from bus.pubsub_redis import RedisPubSub
from bus.redis import RedisCache, redis_client
from peernet.config import load_config
from peernet.errors import ErrorCode, PeerNetError
from stack.process import tail
from stack.redis import REDIS

pytestmark = pytest.mark.stack

START_TIMEOUT_S = 20.0
# A refused client must fail within this (its timeouts are a few seconds), never hang.
REFUSED_WITHIN_S = 8.0


@dataclass(frozen=True)
class TlsRedis:
    port: int
    tls: TlsFiles
    log: Path

    def url(self, ca: Path | None = None, scheme: str = "rediss") -> str:
        query = f"?ssl_ca_certs={quote(str(ca or self.tls.ca))}" if scheme == "rediss" else ""
        return f"{scheme}://127.0.0.1:{self.port}/0{query}"


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not on PATH (`./dev test` installs it)")
    root = tmp_path_factory.mktemp("redis-tls")
    tls = make_tls_files(root / "certs")
    (port,) = free_ports(1)
    log = root / "redis.log"
    argv = [server, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(tls.server_cert), "--tls-key-file", str(tls.server_key),
            "--tls-ca-cert-file", str(tls.ca), "--tls-auth-clients", "no",
            "--save", "", "--appendonly", "no", "--dir", str(root), "--logfile", str(log)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        redis = TlsRedis(port, tls, log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"redis-server exited ({proc.returncode}):\n{tail(log, 20)}")
            try:
                # Up when a TLS client (not ours: the stack's probe, also under test) gets PONG.
                REDIS.probe(load_config({"PEERNET_REDIS_URL": redis.url()}), 1.0)
                break
            except Exception as exc:
                if time.monotonic() > deadline:
                    pytest.fail(f"redis-server not up over TLS within {START_TIMEOUT_S:.0f}s: "
                                f"{exc!r}\n{tail(log, 20)}")
                time.sleep(0.1)
        yield redis
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
async def cache(tls_redis: TlsRedis) -> AsyncIterator[RedisCache]:
    cache = RedisCache(tls_redis.url())
    await cache.start()
    yield cache
    await cache.stop()


def test_the_stack_probe_reaches_an_external_redis_over_tls(tls_redis: TlsRedis) -> None:
    cfg = load_config({"PEERNET_REDIS_URL": tls_redis.url()})
    assert cfg.services.redis_external
    assert REDIS.probe(cfg, 5.0).startswith("redis 7")


async def test_cache_writes_and_reads_over_tls(cache: RedisCache) -> None:
    key = unique("tls:cache")
    await cache.ping()
    assert await cache.get(key) is None
    await cache.set(key, b"over tls", ttl_s=30)
    assert await cache.get(key) == b"over tls"
    assert not await cache.set_if_absent(key, b"second")
    await cache.delete(key)
    assert await cache.set_if_absent(key, b"second", ttl_s=30)
    assert await cache.get(key) == b"second"


async def test_stores_opened_from_the_configuration_use_tls(tls_redis: TlsRedis) -> None:
    """The presence, feed and inbox stores get their client from redis_client(cfg's URL), as
    bus/backends.py opens them: one of them, end to end from PEERNET_REDIS_URL."""
    cfg = load_config({"PEERNET_REDIS_URL": tls_redis.url(),
                       "PEERNET_PRESENCE_KEYSPACE": unique("tls-presence")})
    presence = presence_store(cfg)
    try:
        replica = unique("replica")
        assert not await presence.renew_lease(replica, 30_000)  # new: no lease before
        assert await presence.renew_lease(replica, 30_000)
        assert await presence.live([replica, "nobody"]) == {replica}
        await presence.release_lease(replica)
        assert await presence.live([replica]) == set()
    finally:
        await presence._r.aclose()  # the store has no close of its own: its client's


async def test_pubsub_delivers_over_tls_and_reconnects_over_tls(tls_redis: TlsRedis) -> None:
    # Options of the URL's query beside the TLS ones: redis-py's pool takes some, the pub/sub
    # connection must drop those and not clash with its own timeouts.
    url = tls_redis.url() + "&socket_timeout=5&max_connections=8"
    received: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    channel = unique("tls-channel")
    async with RedisPubSub(url) as subscriber, RedisPubSub(url) as publisher:
        await subscriber.subscribe(channel, lambda ch, payload: received.put_nowait((ch, payload)))
        assert await publisher.publish(channel, b"first") == 1
        assert await asyncio.wait_for(received.get(), 5) == (channel, b"first")

        # The reader's reconnect opens its new connection from the same URL: TLS again (the
        # server has no plaintext port, so a delivery after it proves it).
        admin = redis_client(url)
        try:
            killed = 0
            for client in await admin.client_list():
                if client.get("name") == subscriber.connection_name:
                    killed += await admin.client_kill_filter(_id=client["id"])
            assert killed == 1
        finally:
            await admin.aclose()
        await eventually(lambda: subscriber.reconnects == 1, within_s=10)
        await publisher.publish_many([(channel, b"after reconnect")])
        assert await asyncio.wait_for(received.get(), 5) == (channel, b"after reconnect")


async def refused_ping(url: str) -> tuple[PeerNetError, float]:
    """A cache on `url` pings and is refused with `unavailable` within REFUSED_WITHIN_S: the
    error, and how long the refusal took."""
    cache = RedisCache(url, socket_timeout_s=1.0)
    await cache.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(PeerNetError) as refused:
            await cache.ping()
    finally:
        await cache.stop()
    waited = time.monotonic() - t0
    assert refused.value.code is ErrorCode.UNAVAILABLE
    assert waited < REFUSED_WITHIN_S, f"refused only after {waited:.1f}s"
    return refused.value, waited


async def test_a_client_that_does_not_trust_the_server_is_refused(tls_redis: TlsRedis) -> None:
    untrusted = tls_redis.url(ca=tls_redis.tls.other_ca)

    error, waited = await refused_ping(untrusted)
    assert error.retriable
    assert "certificate verify failed" in str(error).lower(), error
    print(f"\nuntrusted CA: cache refused after {waited:.2f}s: {error}")

    pubsub = RedisPubSub(untrusted, subscribe_timeout_s=2.0)
    t0 = time.monotonic()
    with pytest.raises(PeerNetError) as refused:
        await pubsub.start()
    waited = time.monotonic() - t0
    assert refused.value.code is ErrorCode.UNAVAILABLE
    assert "certificate verify failed" in str(refused.value).lower(), refused.value
    assert waited < REFUSED_WITHIN_S, f"refused only after {waited:.1f}s"
    assert pubsub.connection_errors >= 1
    print(f"untrusted CA: pub/sub refused after {waited:.2f}s (its subscribe timeout: 2 s, "
          f"{pubsub.connection_errors} attempts): {refused.value}")


async def test_a_plaintext_client_is_refused_by_the_tls_port(tls_redis: TlsRedis) -> None:
    error, waited = await refused_ping(tls_redis.url(scheme="redis"))
    print(f"\nplaintext client on the TLS port: refused after {waited:.2f}s: {error}")
