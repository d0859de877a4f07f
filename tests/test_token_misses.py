"""
Unknown tokens cost their sender (token_misses.py): a scanner is slowed,
then refused with 429 and a Retry-After, while reports with known tokens
from the same address are never refused.
"""

from __future__ import annotations

import time

import orjson
import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.web.client import HTTPConnectionPool

from livemap_tx.admission import Admission
from livemap_tx.phones.devices import Devices, new_token
from livemap_tx.hub import Hub
from livemap_tx.maps import MapDirectory
from livemap_tx.phones.token_misses import MISS_BURST, MISS_PERIOD, MissLimiter, TooManyMisses


class FakeRequest:
    """What MissLimiter reads of a request: the client's address and headers."""

    def __init__(self, host: str = "203.0.113.7") -> None:
        self.host = host
        self.headers: dict[bytes, bytes] = {}

    def getClientAddress(self):  # noqa: N802
        return type("Address", (), {"host": self.host})()

    def getHeader(self, name: bytes):  # noqa: N802
        return None

    def setHeader(self, name: bytes, value: bytes) -> None:  # noqa: N802
        self.headers[name] = value


def find(limiter: MissLimiter, request: FakeRequest, token: str):
    result = []
    d = defer.Deferred.fromCoroutine(limiter.find(request, token))
    d.addBoth(result.append)
    return result[0]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def devices(clock) -> Devices:
    return Devices(Hub(clock), MapDirectory(clock), clock)


def test_misses_are_a_burst_then_a_trickle_then_429_with_retry_after(clock, devices):
    limiter = MissLimiter(devices, Admission())
    scanner = FakeRequest()
    outcomes = [find(limiter, scanner, new_token()) for _ in range(MISS_BURST + 5)]
    assert [o.value.status for o in outcomes[:MISS_BURST]] == [404] * MISS_BURST
    refused = outcomes[MISS_BURST:]
    assert all(isinstance(o.value, TooManyMisses) and o.value.status == 429 for o in refused)
    assert scanner.headers[b"Retry-After"] == b"%d" % MISS_PERIOD
    clock.advance(MISS_PERIOD)  # one more look-up, then refused again
    assert find(limiter, scanner, new_token()).value.status == 404
    assert find(limiter, scanner, new_token()).value.status == 429
    # Another address is not affected; and this one gets its burst back in time.
    assert find(limiter, FakeRequest("198.51.100.1"), new_token()).value.status == 404
    clock.advance(MISS_BURST * MISS_PERIOD)
    assert [find(limiter, scanner, new_token()).value.status
            for _ in range(MISS_BURST + 1)] == [404] * MISS_BURST + [429]
    assert (limiter.misses, limiter.refused) == (2 * MISS_BURST + 2, 7)


def test_a_known_device_is_never_refused_even_from_a_scanning_address(clock, devices):
    limiter = MissLimiter(devices, Admission())
    scanner = FakeRequest()
    token, device = find_created(devices)
    for _ in range(MISS_BURST + 10):
        find(limiter, scanner, new_token())
    assert find(limiter, scanner, token) is device
    # Malformed tokens are misses too, and cost no look-up.
    assert find(limiter, FakeRequest("192.0.2.9"), "x").value.status == 404


def find_created(devices):
    result = []
    defer.Deferred.fromCoroutine(devices.create("public", "Ada", "192.0.2.1")).addBoth(
        result.append)
    return result[0]


def test_the_addresses_counted_are_bounded(clock, devices):
    limiter = MissLimiter(devices, Admission(), max_addresses=100)
    for number in range(300):
        find(limiter, FakeRequest(f"10.0.{number // 250}.{number % 250}"), new_token())
    assert len(limiter.addresses) == 100


@pytest_twisted.ensureDeferred
async def test_deleting_by_unknown_tokens_is_limited_too(server):
    codes = []
    for _ in range(MISS_BURST + 3):
        answer = await treq.delete(f"{server.url}/api/devices/{new_token()}", persistent=False)
        await answer.content()
        codes.append(answer.code)
    assert codes == [404] * MISS_BURST + [429] * 3


# The real server: a scanner and a venue behind one NAT address.
UNKNOWN = 10_000
PHONES = 1_000
ROUNDS = 3  # each phone reports once a second for this many seconds


@pytest_twisted.ensureDeferred
async def test_a_scanner_is_refused_while_a_thousand_phones_behind_its_address_report(server):
    apps = server.site.apps
    tokens = []
    for number in range(PHONES):  # made in-process: creating is limited per address too
        token, _ = await apps.devices.create("venue", f"phone {number}",
                                              f"10.1.{number // 250}.{number % 250}")
        tokens.append(token)
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 64
    gate = defer.DeferredSemaphore(64)
    known: dict[int, int] = {}
    unknown: dict[int, int] = {}
    retry_after: set[bytes] = set()

    async def report(token: str, codes: dict[int, int]) -> None:
        answer = await treq.get(
            f"{server.url}/apps/osmand?id={token}&lat=52.5&lon=13.4&timestamp={int(time.time())}",
            pool=pool)
        await answer.content()
        codes[answer.code] = codes.get(answer.code, 0) + 1
        if answer.code == 429:
            retry_after.update(answer.headers.getRawHeaders(b"retry-after") or [b"none"])

    started = reactor.seconds()
    scans = iter(range(UNKNOWN))
    try:
        for second in range(ROUNDS):
            round_start = reactor.seconds()
            work = [gate.run(lambda t=t: defer.ensureDeferred(report(t, known))) for t in tokens]
            work += [gate.run(lambda: defer.ensureDeferred(report(new_token(), unknown)))
                     for _ in zip(range(UNKNOWN // ROUNDS + (second == 0) * (UNKNOWN % ROUNDS)),
                                  scans)]
            await defer.gatherResults(work, consumeErrors=True)
            # Once a second at most: a phone's rate (--rate) is not what is tested.
            wait = 1.0 - (reactor.seconds() - round_start)
            if wait > 0:
                await deferLater(wait)
    finally:
        await pool.closeCachedConnections()
    elapsed = reactor.seconds() - started
    assert known == {200: PHONES * ROUNDS}
    assert sum(unknown.values()) == UNKNOWN
    # The documented limit: a burst, then one look-up every MISS_PERIOD.
    assert MISS_BURST <= unknown.get(404, 0) <= MISS_BURST + elapsed / MISS_PERIOD + 1
    assert unknown.get(429, 0) == UNKNOWN - unknown.get(404, 0)
    assert retry_after and all(int(value) <= MISS_PERIOD for value in retry_after)
    body = await (await treq.get(f"{server.url}/metrics")).text()
    assert f"livemap_token_misses_refused_total {float(unknown[429])}" in body


def deferLater(seconds: float) -> defer.Deferred:  # noqa: N802
    from twisted.internet import task
    return task.deferLater(reactor, seconds)
