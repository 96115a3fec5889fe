"""Connection limits: the token bucket of the frame rate, the flood detector, and the count of
open connections per client address."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Sequence

from peernet.config import ConfigError


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up; one frame costs one token."""

    __slots__ = ("_clock", "_stamp", "_tokens", "burst", "rate")  # one per connection

    def __init__(self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = self._clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class FloodDetector:
    """Counts refused frames; persistent flooding is `limit` refusals with no 10 s quiet gap."""

    QUIET_S = 10.0

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.refused = 0
        self._last = 0.0

    def refuse(self) -> bool:
        """Count one refused frame; True when the connection should be closed."""
        now = time.monotonic()
        if now - self._last > self.QUIET_S:
            self.refused = 0
        self._last = now
        self.refused += 1
        return self.refused >= self.limit


# An IPv6 host is given a /64 by its network: its addresses count as one.
IPV6_PREFIX = 64
# Longest X-Forwarded-For entry kept as a key when it is not an IP address.
MAX_ADDRESS_CHARS = 64

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxies:
    """The peers whose X-Forwarded-For is believed: addresses or networks, comma-separated
    (PEERNET_TRUSTED_PROXIES). An empty setting trusts no one."""

    def __init__(self, spec: str) -> None:
        self.networks: list[Network] = []
        for entry in (e.strip() for e in spec.split(",")):
            if not entry:
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                raise ConfigError(f"PEERNET_TRUSTED_PROXIES: {entry!r} is not an IP address "
                                  "or network") from None

    def __contains__(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
        return ip is not None and any(ip in net for net in self.networks)


def _ip(entry: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address in an X-Forwarded-For entry or a peer host (`1.2.3.4`, `1.2.3.4:5678`,
    `::1`, `[::1]:80`), IPv4-mapped IPv6 as IPv4; None when it is none of those."""
    host = entry.strip()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _key(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))
    return str(ip)


def client_address(peer: str | None, forwarded_for: Sequence[str],
                   trusted: TrustedProxies) -> str | None:
    """The address a connection is counted under, or None when it is not counted.

    A peer that is not a trusted proxy is the client: its own address. A trusted proxy speaks
    for the client named in X-Forwarded-For (all of the header's lines, in order): the rightmost
    entry that is not itself a trusted proxy, since each proxy appends the address it saw and
    whatever is left of that is the client's own claim. A trusted proxy that names no one is not
    counted: Serve's HAProxy adds no X-Forwarded-For, so counting its address would put every
    client behind it under one limit (docs/reliability.md, "A connection flood from one address").
    """
    if not peer:
        return None
    peer_ip = _ip(peer)
    if peer_ip not in trusted:
        return _key(peer_ip) if peer_ip is not None else peer[:MAX_ADDRESS_CHARS]
    entries = [e.strip() for line in forwarded_for for e in line.split(",")]
    for entry in reversed(entries):
        if not entry:
            continue
        ip = _ip(entry)
        if ip is None:
            return entry[:MAX_ADDRESS_CHARS]
        if ip not in trusted:
            return _key(ip)
    return None


class AddressLimiter:
    """Open connections per client address in this replica, at most `limit` each (0: no limit).
    An address is forgotten when its last connection closes, so the table holds only addresses
    with a connection open."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def acquire(self, address: str | None) -> bool:
        """Count one more connection of `address`; False (and nothing counted) over the limit.
        An address of None is never limited nor counted."""
        if address is None or self.limit <= 0:
            return True
        count = self._open.get(address, 0)
        if count >= self.limit:
            return False
        self._open[address] = count + 1
        return True

    def release(self, address: str | None) -> None:
        """Count one connection of `address` closed (one acquired before)."""
        if address is None or self.limit <= 0:
            return
        count = self._open.get(address, 0) - 1
        if count > 0:
            self._open[address] = count
        else:
            self._open.pop(address, None)

    def open_connections(self, address: str) -> int:
        return self._open.get(address, 0)

    def __len__(self) -> int:
        """Addresses with at least one connection counted."""
        return len(self._open)
