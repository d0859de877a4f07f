"""
Who may open a live connection: the Origin check against cross-site
WebSocket hijacking, and connection limits in total and per client address
(the address read from X-Forwarded-For only when a trusted proxy sent it).

Both transports (WebSocket and SockJS) ask the same `Admission` object, so a
client cannot get around a limit by switching transport. Plain HTTP
connections count against the same per-address limit (connections.py): a
WebSocket counts once, as the TCP connection it is.

`AddressRate` is the one per-address request limit (a token bucket each):
unknown device tokens, device creations and people searches each keep one.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, Optional, Union
from urllib.parse import urlsplit

from twisted.internet.interfaces import IReactorTime

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

DEFAULT_MAX_CONNECTIONS = 20_000
# One public address can be a whole venue or a carrier-grade NAT (the
# talk's own audience shares one Wi-Fi): a quarter of the connections, so
# that it takes several addresses to fill the server.
DEFAULT_MAX_PER_IP = 5_000


class Refused(Exception):
    """A connection is not admitted; `status` is the HTTP code to answer with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _origin_netloc(value: str) -> Optional[str]:
    """`host:port` of an origin (the scheme's default port if none is given)."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    default = 443 if parts.scheme == "https" else 80
    return f"{parts.hostname.lower()}:{port or default}"


def _same_origin(origin_netloc: str, host: str) -> bool:
    """
    Whether an Origin names the Host the client asked for. A Host without a
    port matches the origin's host on any port: behind a TLS-terminating
    proxy this process cannot tell the scheme the browser used.
    """
    try:
        parts = urlsplit("//" + host.strip())
        port = parts.port
    except ValueError:
        return False
    hostname = (parts.hostname or "").lower()
    origin_host, _, origin_port = origin_netloc.rpartition(":")
    return hostname == origin_host and (port is None or str(port) == origin_port)


def parse_networks(values: Iterable[str]) -> list[Network]:
    """CIDR blocks or single addresses, as given to --trust-proxy."""
    return [ipaddress.ip_network(value.strip(), strict=False) for value in values if value.strip()]


class Admission:
    """The admission rules of one server, and its count of open connections."""

    def __init__(self, *, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 max_per_ip: int = DEFAULT_MAX_PER_IP,
                 allowed_origins: Iterable[str] = (),
                 trusted_proxies: Iterable[Network] = ()) -> None:
        self.max_connections = max_connections
        self.max_per_ip = max_per_ip
        self.allowed_origins = {n for n in map(_origin_netloc, allowed_origins) if n}
        self.trusted_proxies = list(trusted_proxies)
        self.total = 0
        self.per_ip: dict[str, int] = {}
        # The address each counted TCP connection (by its transport) counts under.
        self.sockets: dict[object, str] = {}
        # Refusals by reason, for /metrics.
        self.refused: dict[str, int] = {}

    def _refuse(self, status: int, reason: str) -> Refused:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        return Refused(status, reason)

    def check_origin(self, origin: Optional[str], host: Optional[str]) -> None:
        """
        A browser always sends Origin: it must be this server's own (the Host
        it asked for) or an allowed one. No Origin means an app or a tool.
        """
        if origin is None:
            return
        netloc = _origin_netloc(origin)
        if netloc is None:
            raise self._refuse(403, "origin not allowed")
        if netloc in self.allowed_origins:
            return
        if host is not None and _same_origin(netloc, host):
            return
        raise self._refuse(403, "origin not allowed")

    def client_address(self, peer: str, forwarded_for: Optional[str]) -> str:
        """The client's address: the peer, unless a trusted proxy says otherwise."""
        if not forwarded_for or not self._trusted(peer):
            return peer
        # Walk from the nearest hop back; the first untrusted hop is the client.
        hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
        for hop in reversed(hops):
            if not self._trusted(hop):
                return hop
        return hops[0] if hops else peer

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.trusted_proxies)

    def acquire(self, address: str, carrier: object = None) -> bool:
        """
        Count a new live connection from `address`, or refuse it. Returns
        whether it took a place of its own under the address: not when its
        TCP connection (`carrier`, the transport) already counts there.
        """
        if self.total >= self.max_connections:
            raise self._refuse(503, "server full")
        carried = carrier is not None and self.sockets.get(carrier) == address
        if not carried:
            self._count(address)
        self.total += 1
        return not carried

    def release(self, address: str, counted: bool = True) -> None:
        """A live connection closed (`counted`: what `acquire` returned)."""
        if counted:
            if self.per_ip.get(address, 0) <= 0:
                return
            self._uncount(address)
        self.total = max(0, self.total - 1)

    def open_connection(self, transport: object, address: str) -> None:
        """Count a TCP connection from `address`, or refuse it."""
        self._count(address)
        self.sockets[transport] = address

    def close_connection(self, transport: object) -> None:
        address = self.sockets.pop(transport, None)
        if address is not None:
            self._uncount(address)

    def _count(self, address: str) -> None:
        count = self.per_ip.get(address, 0)
        if count >= self.max_per_ip:
            raise self._refuse(429, "too many connections from this address")
        self.per_ip[address] = count + 1

    def _uncount(self, address: str) -> None:
        count = self.per_ip.get(address, 0)
        if count <= 1:
            self.per_ip.pop(address, None)
        else:
            self.per_ip[address] = count - 1


class AddressRate:
    """
    What each client address may still do: `burst` at once, then one every
    `period` seconds (a token bucket per address). The `max_addresses` least
    recently seen are remembered, so a flood of addresses costs bounded memory
    (a forgotten address starts again with its burst).
    """

    def __init__(self, clock: IReactorTime, burst: float, period: float,
                 max_addresses: int = 10_000) -> None:
        self.clock = clock
        self.burst = float(burst)
        self.period = period
        self.max_addresses = max_addresses
        # address -> (tokens left, when counted), least recently seen first.
        self.addresses: dict[str, tuple[float, float]] = {}

    def _left(self, address: str, now: float) -> float:
        left, updated = self.addresses.get(address, (self.burst, now))
        return min(self.burst, left + (now - updated) / self.period)

    def wait(self, address: str) -> float:
        """0 if `address` may act now, else the seconds until it may."""
        left = self._left(address, self.clock.seconds())
        return 0.0 if left >= 1.0 else (1.0 - left) * self.period

    def spend(self, address: str) -> None:
        """`address` acted: one token less (never below none)."""
        now = self.clock.seconds()
        left = self._left(address, now)
        self.addresses.pop(address, None)
        self.addresses[address] = (max(0.0, left - 1.0), now)
        while len(self.addresses) > self.max_addresses:
            del self.addresses[next(iter(self.addresses))]

    def take(self, address: str) -> float:
        """Spend a token if there is one and return 0, else the seconds to wait."""
        wait = self.wait(address)
        if wait == 0.0:
            self.spend(address)
        else:
            seen = self.addresses.pop(address, None)  # stays among the remembered
            if seen is not None:
                self.addresses[address] = seen
        return wait
