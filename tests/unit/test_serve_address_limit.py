"""The limit on open connections per client address (serve/limits.py: which address a
connection counts under, and the count; serve/app.py: the refusal with 4429, and every way out
of a connection giving its place back)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from gateway_harness import WS, Gateway, gateway
from unit_helpers import FAST_TIMING, eventually, unique_user

from peernet.config import ConfigError
from peernet.errors import CloseCode
from serve import metrics
from serve.app import ADDRESS_FULL
from serve.limits import AddressLimiter, TrustedProxies, client_address

LOOPBACK_AND_PRIVATE = TrustedProxies("127.0.0.0/8,::1,10.0.0.0/8,192.168.0.0/16,fc00::/7")


# -- which address ----------------------------------------------------------------------------


@pytest.mark.parametrize(("peer", "xff", "expected"), [
    # A peer that is no trusted proxy is the client, whatever header it sends.
    ("203.0.113.7", [], "203.0.113.7"),
    ("203.0.113.7", ["198.51.100.1"], "203.0.113.7"),
    # A trusted proxy names the client: the rightmost entry that is not a trusted proxy.
    ("127.0.0.1", ["203.0.113.7"], "203.0.113.7"),
    ("10.0.0.5", ["198.51.100.1, 203.0.113.7"], "203.0.113.7"),
    ("127.0.0.1", ["203.0.113.7, 10.0.0.9, 192.168.1.1"], "203.0.113.7"),
    # Several header lines are one list, in order.
    ("127.0.0.1", ["198.51.100.1", "203.0.113.7"], "203.0.113.7"),
    # Ports, brackets and IPv4-mapped IPv6 name the same address.
    ("127.0.0.1", ["203.0.113.7:5555"], "203.0.113.7"),
    ("127.0.0.1", ["::ffff:203.0.113.7"], "203.0.113.7"),
    ("::ffff:203.0.113.7", [], "203.0.113.7"),
    # An IPv6 host owns a /64: its addresses count as one.
    ("2001:db8:1:2::1", [], "2001:db8:1:2::/64"),
    ("127.0.0.1", ["[2001:db8:1:2:ffff::9]:443"], "2001:db8:1:2::/64"),
    # A trusted proxy that names no one, or only trusted hosts, is not counted (Serve's HAProxy
    # adds no header: counting its address would put every client under one limit).
    ("127.0.0.1", [], None),
    ("127.0.0.1", [""], None),
    ("127.0.0.1", ["10.1.2.3, 127.0.0.1"], None),
    # What is not an address is counted as it is written, cut short.
    ("127.0.0.1", ["unknown"], "unknown"),
    ("127.0.0.1", ["x" * 500], "x" * 64),
    ("testclient", [], "testclient"),
    (None, ["203.0.113.7"], None),
])
def test_the_address_a_connection_counts_under(peer: str | None, xff: list[str],
                                                 expected: str | None) -> None:
    assert client_address(peer, xff, LOOPBACK_AND_PRIVATE) == expected


def test_with_no_trusted_proxy_every_peer_is_the_client() -> None:
    nobody = TrustedProxies("")
    assert client_address("127.0.0.1", ["203.0.113.7"], nobody) == "127.0.0.1"


def test_the_default_trusts_loopback_and_private_networks_only() -> None:
    from peernet.config import GatewayConfig

    trusted = TrustedProxies(GatewayConfig().trusted_proxies)
    for proxy in ("127.0.0.1", "::1", "10.2.3.4", "172.31.0.1", "192.168.0.1", "fd00::1"):
        assert client_address(proxy, ["203.0.113.7"], trusted) == "203.0.113.7", proxy
    assert client_address("172.32.0.1", ["203.0.113.7"], trusted) == "172.32.0.1"


@pytest.mark.parametrize("spec", ["localhost", "10.0.0.0/33", "1.2.3.4, nonsense"])
def test_a_bad_trusted_proxies_setting_is_a_config_error(spec: str) -> None:
    with pytest.raises(ConfigError, match="PEERNET_TRUSTED_PROXIES"):
        TrustedProxies(spec)


# -- the count ---------------------------------------------------------------------------------


def test_the_limiter_refuses_over_the_limit_and_forgets_closed_addresses() -> None:
    limiter = AddressLimiter(3)
    assert all(limiter.acquire("a") for _ in range(3))
    assert limiter.acquire("a") is False
    assert limiter.open_connections("a") == 3  # a refusal counts nothing
    assert limiter.acquire("b") is True
    limiter.release("a")
    assert limiter.acquire("a") is True
    for _ in range(3):
        limiter.release("a")
    limiter.release("b")
    assert len(limiter) == 0 and limiter.open_connections("a") == 0


def test_no_address_and_a_limit_of_zero_are_never_refused_nor_counted() -> None:
    limiter = AddressLimiter(1)
    assert all(limiter.acquire(None) for _ in range(10))
    limiter.release(None)
    assert len(limiter) == 0
    off = AddressLimiter(0)
    assert all(off.acquire("a") for _ in range(10))
    off.release("a")
    assert len(off) == 0


# -- the gateway -------------------------------------------------------------------------------

LIMIT = 3


def refused_count() -> float:
    return metrics.CONNECTIONS_REFUSED.labels("address")._value.get()


def open_at(gw: Gateway, address: str) -> int:
    limiter = gw.client.app.state.per_address  # type: ignore[attr-defined]
    return int(limiter.open_connections(address))


def all_released(gw: Gateway) -> None:
    """Every connection's place is given back (the server finishes a moment after the client)."""
    limiter = gw.client.app.state.per_address  # type: ignore[attr-defined]
    gw.run(eventually, lambda: len(limiter) == 0)


@pytest.fixture(scope="module")
def limited() -> Iterator[Gateway]:
    with gateway({**FAST_TIMING, "PEERNET_MAX_CONNECTIONS_PER_ADDRESS": str(LIMIT)}) as g:
        yield g


def live(gw: Gateway, stack: contextlib.ExitStack, **headers: str) -> WS:
    ws, _ = stack.enter_context(gw.connect(unique_user(), headers=headers or None))
    return ws


def test_the_connection_over_the_limit_is_closed_4429_and_counted(limited: Gateway) -> None:
    gw = limited
    before = refused_count()
    with contextlib.ExitStack() as stack:
        first = [live(gw, stack) for _ in range(LIMIT)]
        assert open_at(gw, "testclient") == LIMIT
        with gw.open() as ws:
            assert ws.closed()[0] == CloseCode.SLOW_OR_FLOODING
            assert ws.close_reason == ADDRESS_FULL
        assert refused_count() == before + 1
        # The others at that address carry on. A peer that is no trusted proxy cannot name
        # another address to get in.
        assert first[0].request({"t": "ping", "rid": 1}) == {"t": "pong", "rid": 1}
        with gw.open(headers={"x-forwarded-for": "203.0.113.7"}) as ws:
            assert ws.closed()[0] == CloseCode.SLOW_OR_FLOODING
        assert refused_count() == before + 2
    all_released(gw)


def test_a_closed_connection_makes_room_for_a_new_one(limited: Gateway) -> None:
    gw = limited
    with contextlib.ExitStack() as stack:
        for _ in range(LIMIT - 1):
            live(gw, stack)
        with gw.connect(unique_user()):
            pass
        gw.run(eventually, lambda: open_at(gw, "testclient") == LIMIT - 1)
        ws = live(gw, stack)
        assert ws.request({"t": "ping", "rid": 2}) == {"t": "pong", "rid": 2}
    all_released(gw)


def test_a_trusted_proxy_is_limited_per_forwarded_address_and_not_as_itself() -> None:
    with gateway({"PEERNET_MAX_CONNECTIONS_PER_ADDRESS": "2"}, peer=("127.0.0.1", 40000)) as gw:
        flooder = {"x-forwarded-for": "203.0.113.7"}
        with contextlib.ExitStack() as stack:
            live(gw, stack, **flooder)
            live(gw, stack, **flooder)
            with gw.open(headers=flooder) as ws:
                assert ws.closed()[0] == CloseCode.SLOW_OR_FLOODING
            # A claim the client put left of what the proxy appended changes nothing.
            with gw.open(headers={"x-forwarded-for": "198.51.100.1, 203.0.113.7"}) as ws:
                assert ws.closed()[0] == CloseCode.SLOW_OR_FLOODING
            # The proxy's own connections (Serve's HAProxy names no one) are not limited.
            for _ in range(4):
                live(gw, stack)
            live(gw, stack, **{"x-forwarded-for": "198.51.100.1"})
        all_released(gw)


# Each way a connection ends; afterwards its address holds nothing.
def _client_closes(gw: Gateway, ws: WS) -> None:
    ws.send({"t": "hello", "token": gw.token(unique_user())})
    ws.expect("welcome")


def _bad_first_frame(gw: Gateway, ws: WS) -> None:
    ws.send({"t": "ping"})
    assert ws.closed()[0] == CloseCode.BAD_TOKEN


def _bad_token(gw: Gateway, ws: WS) -> None:
    ws.send({"t": "hello", "token": "not-a-token"})
    assert ws.closed()[0] == CloseCode.BAD_TOKEN


def _no_hello_in_time(gw: Gateway, ws: WS) -> None:
    assert ws.closed()[0] == CloseCode.TIMEOUT


def _heartbeat_lost(gw: Gateway, ws: WS) -> None:
    _client_closes(gw, ws)
    assert ws.closed()[0] == CloseCode.TIMEOUT


def _frame_too_large(gw: Gateway, ws: WS) -> None:
    _client_closes(gw, ws)
    ws.send_raw(b"\x00" * (gw.cfg.gateway.max_frame_bytes + 1))
    assert ws.closed()[0] == CloseCode.MESSAGE_TOO_BIG


def _gone_before_hello(gw: Gateway, ws: WS) -> None:
    pass


@pytest.mark.parametrize("end", [_client_closes, _bad_first_frame, _bad_token, _no_hello_in_time,
                                 _heartbeat_lost, _frame_too_large, _gone_before_hello],
                         ids=lambda f: f.__name__.strip("_"))
def test_every_way_out_gives_the_place_back(limited: Gateway, end: object) -> None:
    gw = limited
    for _ in range(LIMIT + 1):  # more times than the limit: a leak would refuse the last
        with gw.open() as ws:
            end(gw, ws)  # type: ignore[operator]
        all_released(gw)


def test_an_app_error_gives_the_place_back(limited: Gateway, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    from serve import connection

    async def broken(self: object) -> None:
        raise RuntimeError("a bug in the connection")

    monkeypatch.setattr(connection.Connection, "run", broken)
    gw = limited
    for _ in range(LIMIT + 1):
        with contextlib.suppress(Exception), gw.open() as ws:
            ws.message()
        all_released(gw)
