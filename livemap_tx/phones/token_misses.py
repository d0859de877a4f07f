"""
Unknown device tokens cost the address that sends them, not the server.

A report with a token this node holds in its cache of devices is never
limited: a venue's thousand phones behind one NAT address report freely.
Any other token costs a look-up in the store (Redis in a cluster) and, if
it is unknown, one "miss" of its client address: MISS_BURST of them, then
one every MISS_PERIOD seconds (a token bucket). An address with no miss
left gets 429 with a Retry-After, without a look-up, for any token not in
the cache: a scanner is slowed, then refused.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request

from ..admission import Admission, AddressRate
from .devices import Device, Devices, TooFast, UnknownDevice, looks_like_token, token_hash

# Misses one address may make at once (a phone whose device was deleted, a
# typo in a setup), then one every MISS_PERIOD seconds.
MISS_BURST = 20
MISS_PERIOD = 6.0
# Addresses whose misses are counted (the least recently seen go first).
MAX_ADDRESSES = 10_000


class TooManyMisses(TooFast):
    """429: this address sent too many unknown tokens; try again in `retry_after` s."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"too many unknown tokens from this address; retry in "
                         f"{math.ceil(retry_after)} s")
        self.retry_after = retry_after


class MissLimiter:
    """The misses of each client address (a token bucket each), and the look-up they guard."""

    def __init__(self, devices: Devices, admission: Admission, burst: int = MISS_BURST,
                 period: float = MISS_PERIOD, max_addresses: int = MAX_ADDRESSES) -> None:
        self.devices = devices
        self.admission = admission
        self.clock: IReactorTime = devices.clock
        self.rate = AddressRate(self.clock, burst, period, max_addresses)
        # address -> (misses left, when counted)
        self.addresses = self.rate.addresses
        self.refused = 0
        self.misses = 0

    def retry_after(self, address: str) -> float:
        """0 if `address` may make a miss now, else the seconds until it may."""
        return self.rate.wait(address)

    def missed(self, address: str) -> None:
        self.rate.spend(address)
        self.misses += 1

    async def find(self, request: Request, token: Optional[str]) -> Device:
        """
        The device of a report's token, unless its client address is out of
        misses and the token is not cached: then 429 with a Retry-After.
        """
        devices = self.devices
        if token and looks_like_token(token) and token_hash(token) in devices.known:
            return await devices.find(token)  # cached: no look-up, never limited
        address = self.admission.client_address(
            getattr(request.getClientAddress(), "host", "unknown"),
            (request.getHeader(b"x-forwarded-for") or b"").decode("latin-1") or None)
        wait = self.retry_after(address)
        if wait > 0:
            self.refused += 1
            request.setHeader(b"Retry-After", b"%d" % math.ceil(wait))
            raise TooManyMisses(wait)
        try:
            return await devices.find(token or "")
        except UnknownDevice:
            self.missed(address)
            raise


class MissCollector(Collector):
    """Unknown tokens seen, and reports refused for too many of them."""

    def __init__(self, limiter: MissLimiter) -> None:
        self.limiter = limiter

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily("livemap_token_misses",
                                  "Reports with a token no device has.",
                                  value=self.limiter.misses)
        yield CounterMetricFamily("livemap_token_misses_refused",
                                  "Reports refused (429) because their address sent too many "
                                  "unknown tokens.", value=self.limiter.refused)
