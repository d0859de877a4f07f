"""Origin checks and connection limits, as rules and on the real WebSocket endpoint."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, protocol

from conftest import eventually
from livemap_tx.admission import Admission, Refused, parse_networks
from wsclient import connect


@pytest.mark.parametrize("origin, host, ok", [
    (None, "example.com", True),                       # apps and tools send no Origin
    ("http://example.com", "example.com", True),
    ("https://example.com", "example.com", True),      # TLS ended at a proxy
    ("http://127.0.0.1:8080", "127.0.0.1:8080", True),
    ("http://EXAMPLE.com:8080", "example.com:8080", True),
    ("http://evil.example", "example.com", False),
    ("http://localhost:9999", "localhost:8080", False),
    ("https://example.com", "example.com:8443", False),
    ("null", "example.com", False),
    ("file://", "example.com", False),
    ("http://example.com:notaport", "example.com", False),
    ("http://friend.example", "example.com", True),    # --allow-origin
])
def test_origin_rules(origin, host, ok):
    admission = Admission(allowed_origins=["http://friend.example"])
    if ok:
        admission.check_origin(origin, host)
    else:
        with pytest.raises(Refused) as refused:
            admission.check_origin(origin, host)
        assert refused.value.status == 403


def test_forwarded_for_is_trusted_only_from_trusted_proxies():
    admission = Admission(trusted_proxies=parse_networks(["10.0.0.0/8", "::1"]))
    assert admission.client_address("203.0.113.9", "1.2.3.4") == "203.0.113.9"
    assert admission.client_address("10.1.1.1", "1.2.3.4") == "1.2.3.4"
    assert admission.client_address("10.1.1.1", "6.6.6.6, 1.2.3.4, 10.2.2.2") == "1.2.3.4"
    assert admission.client_address("::1", None) == "::1"
    assert admission.client_address("10.1.1.1", "garbage") == "garbage"


def test_limits_per_address_and_in_total():
    admission = Admission(max_connections=3, max_per_ip=2)
    admission.acquire("a")
    admission.acquire("a")
    with pytest.raises(Refused) as refused:
        admission.acquire("a")
    assert refused.value.status == 429
    admission.acquire("b")
    with pytest.raises(Refused) as refused:
        admission.acquire("c")
    assert refused.value.status == 503
    admission.release("a")
    admission.acquire("c")
    for address in ("a", "b", "c"):
        admission.release(address)
    admission.release("never-seen")
    assert (admission.total, admission.per_ip) == (0, {})


@pytest_twisted.ensureDeferred
async def test_cross_site_websocket_is_refused_and_same_origin_allowed(server):
    with pytest.raises(Exception):
        await connect(server.ws_url(), origin="http://evil.example")
    client = await connect(server.ws_url(), origin=server.url)
    assert (await client.next())["type"] == "welcome"
    client.close()
    await client.wait_closed()


@pytest_twisted.ensureDeferred
async def test_per_address_limit_refuses_the_upgrade_and_frees_on_close(server):
    server.factory.admission = Admission(max_per_ip=2)
    first = await connect(server.ws_url())
    second = await connect(server.ws_url())
    with pytest.raises(Exception, match="429"):
        await connect(server.ws_url())
    first.close()
    await first.wait_closed()
    third = await connect(server.ws_url())
    assert server.factory.admission.total == 2
    for client in (second, third):
        client.close()
        await client.wait_closed()
    assert server.factory.admission.total == 0


@pytest_twisted.ensureDeferred
async def test_refusals_are_counted_in_metrics(server):
    with pytest.raises(Exception):
        await connect(server.ws_url(), origin="http://evil.example")
    body = await (await treq.get(server.url + "/metrics")).text()
    assert 'livemap_connections_refused_total{reason="origin not allowed"} 1.0' in body


@pytest_twisted.ensureDeferred
async def test_cross_site_sockjs_session_is_closed_with_a_reason(server):
    base = f"{server.url}/sockjs/public/000/evil"
    response = await treq.post(base + "/xhr", headers={"Origin": ["http://evil.example"]})
    assert (await response.content()).startswith(b"o")
    response = await treq.post(base + "/xhr", headers={"Origin": ["http://evil.example"]})
    assert (await response.content()).startswith(b'c[1008,"origin not allowed"]')
    assert server.hub.connection_count() == 0
    own = f"{server.url}/sockjs/public/000/own"
    await treq.post(own + "/xhr", headers={"Origin": [server.url]})
    response = await treq.post(own + "/xhr", headers={"Origin": [server.url]})
    assert b"welcome" in await response.content()


@pytest_twisted.ensureDeferred
async def test_a_map_filled_after_the_upgrade_check_closes_with_1008(server):
    first = await connect(server.ws_url("tiny"))
    await first.next("welcome")
    server.hub.max_members = 1
    base = f"{server.url}/sockjs/tiny/000/late"
    await treq.post(base + "/xhr")  # SockJS has no upgrade to refuse: open, then close
    response = await treq.post(base + "/xhr")
    assert (await response.content()).startswith(b'c[1008,"map full"]')
    assert server.factory.admission.total == 1  # the refused session gave its place back
    first.close()
    await first.wait_closed()


class _RawUpgrade(protocol.Protocol):
    """A bare WebSocket upgrade: the status line and the first frame are all it reads."""

    def __init__(self, done: defer.Deferred, path: bytes) -> None:
        self.done = done
        self.path = path
        self.data = b""

    def connectionMade(self) -> None:  # noqa: N802
        self.transport.write(
            b"GET " + self.path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.data += data
        head, found, rest = self.data.partition(b"\r\n\r\n")
        if self.done.called or not found:
            return
        if not head.startswith(b"HTTP/1.1 101"):
            self.done.callback(head.split(b"\r\n", 1)[0])
        elif b"welcome" in rest:
            self.done.callback(b"welcome")

    def connectionLost(self, reason: object = None) -> None:  # noqa: N802
        if not self.done.called:
            self.done.callback(b"lost")


@pytest_twisted.ensureDeferred
async def test_the_default_admits_an_audience_of_two_thousand_behind_one_address(server):
    """A talk's audience on one venue Wi-Fi shares one public address."""
    from twisted.internet import reactor

    assert server.factory.admission.max_per_ip >= 2000
    opened = []
    for _ in range(50):  # in batches, so the listen backlog (50) never overflows
        batch = []
        for _ in range(40):
            done: defer.Deferred = defer.Deferred()
            transport = reactor.connectTCP(
                "127.0.0.1", server.port,
                _OneShot(lambda d=done: _RawUpgrade(d, b"/ws/venue")))
            batch.append((done, transport))
        results = await defer.gatherResults([d for d, _ in batch])
        assert set(results) == {b"welcome"}, set(results)
        opened.extend(transport for _, transport in batch)
    assert server.hub.connection_count() == 2000
    assert server.factory.admission.per_ip == {"127.0.0.1": 2000}
    for connector in opened:
        connector.disconnect()
    await eventually(lambda: server.hub.connection_count() == 0, "all closed")


class _OneShot(protocol.ClientFactory):
    def __init__(self, build: Any) -> None:
        self.build = build

    def buildProtocol(self, addr: object) -> protocol.Protocol:  # noqa: N802
        return self.build()
