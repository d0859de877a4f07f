"""
SockJS over websockets, on real sockets (127.0.0.1, port 0) with an
Autobahn client: the framed ``/<server>/<session>/websocket`` transport and
the raw ``/websocket`` endpoint. Session timers run on a task.Clock, the
network on the reactor.
"""

from __future__ import annotations

from typing import Any, Generator

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateResponse, PerMessageDeflateResponseAccept
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import Site

from livemap_tx.sockjs import SEND_QUEUE_FULL, SockJSResource, quote
from livemap_tx.sockjs.testing import HandlerLog

TIMEOUT = 10.0


class Client(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.queue.put(payload.decode("utf-8"))

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        self.factory.lost_reason = reason
        super().connectionLost(reason)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.factory.opened.called:
            self.factory.opened.errback(RuntimeError(f"handshake failed: {code} {reason}"))
        self.factory.closed.callback((code, reason))


class ClientFactory(WebSocketClientFactory):
    protocol = Client

    def __init__(self, url: str, **kw: Any) -> None:
        super().__init__(url, **kw)
        self.opened: Deferred = Deferred()
        self.closed: Deferred = Deferred()
        self.queue: DeferredQueue = DeferredQueue()
        self.client: Client | None = None
        self.lost_reason: Any = None

    def recv(self) -> Deferred:
        return self.queue.get().addTimeout(TIMEOUT, reactor)

    def wait_closed(self) -> Deferred:
        return self.closed if self.closed.called else self.closed.addTimeout(TIMEOUT, reactor)


class Server:
    def __init__(self, **options: Any) -> None:
        self.clock = Clock()
        self.log = HandlerLog(echo=True)
        self.resource = SockJSResource(self.log, self.clock, **options)
        closer = HandlerLog()
        self.closer = SockJSResource(self._closing(closer), self.clock)
        root = Resource()
        root.putChild(b"echo", self.resource)
        root.putChild(b"close", self.closer)
        self.site = Site(root, timeout=None)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.factories: list[ClientFactory] = []

    @staticmethod
    def _closing(log: HandlerLog) -> Any:
        def factory(conn: Any) -> Any:
            handler = log(conn)
            conn.close(3000, "Go away!")
            return handler

        return factory

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port.getHost().port}{path}"

    @defer.inlineCallbacks
    def connect(self, path: str, **kw: Any) -> Generator[Deferred, Any, ClientFactory]:
        factory = ClientFactory(self.url(path), **kw)
        self.factories.append(factory)
        reactor.connectTCP("127.0.0.1", self.port.getHost().port, factory)
        client = yield factory.opened.addTimeout(TIMEOUT, reactor)
        factory.client = client
        return factory

    @defer.inlineCallbacks
    def stop(self) -> Generator[Deferred, Any, None]:
        for factory in self.factories:
            if factory.client is not None and not factory.closed.called:
                factory.client.sendClose(1000)
            if factory.opened.called:
                yield factory.wait_closed()
        yield self.port.stopListening()
        self.clock.advance(0)


@pytest.fixture
def server() -> Generator[Server, None, None]:
    srv = Server()
    yield srv
    pytest_twisted.blockon(srv.stop())


@pytest_twisted.inlineCallbacks
def test_framed_echo_and_empty_frames(server: Server) -> Generator[Deferred, Any, None]:
    ws = yield server.connect("/echo/000/abc/websocket")
    assert (yield ws.recv()) == "o"
    ws.client.sendMessage(b"")
    ws.client.sendMessage(b"[]")
    ws.client.sendMessage(b'["a","\\u2028 \xc3\xa9"]')
    ws.client.sendMessage(b'"single"')
    assert (yield ws.recv()) == 'a["a"]'
    assert (yield ws.recv()) == 'a["\\u2028 \xe9"]'
    assert (yield ws.recv()) == 'a["single"]'
    assert server.log.last.messages == ["a", "\u2028 é", "single"]


@pytest_twisted.inlineCallbacks
def test_framed_heartbeat_comes_from_the_clock(server: Server) -> Generator[Deferred, Any, None]:
    ws = yield server.connect("/echo/000/abc/websocket")
    assert (yield ws.recv()) == "o"
    server.clock.advance(25)
    assert (yield ws.recv()) == "h"


@pytest_twisted.inlineCallbacks
def test_framed_close_sends_close_frame_then_closes(server: Server) -> Generator[Deferred, Any, None]:
    ws = yield server.connect("/close/000/abc/websocket")
    assert (yield ws.recv()) == "o"
    assert (yield ws.recv()) == 'c[3000,"Go away!"]'
    code, reason = yield ws.wait_closed()
    assert (code, reason) == (3000, "Go away!")


@pytest_twisted.inlineCallbacks
def test_broken_json_closes_the_connection(server: Server) -> Generator[Deferred, Any, None]:
    ws = yield server.connect("/echo/000/abc/websocket")
    assert (yield ws.recv()) == "o"
    ws.client.sendMessage(b'["a')
    # sockjs-node closes the websocket itself, with no SockJS close frame.
    code, reason = yield ws.wait_closed()
    assert (code, reason) == (3000, "Broken framing.")
    assert not ws.queue.pending  # nothing after the open frame
    # The TCP connection ends cleanly (FIN), as sockjs-node ends it, not reset.
    for _ in range(100):
        if ws.lost_reason is not None:
            break
        yield deferLater(0.01)
    assert ws.lost_reason.check(ConnectionDone), ws.lost_reason
    server.clock.advance(0)
    assert server.log.last.lost == [(3000, "Broken framing.")]


@pytest_twisted.inlineCallbacks
def test_client_close_ends_session_at_once(server: Server) -> Generator[Deferred, Any, None]:
    ws = yield server.connect("/echo/000/abc/websocket")
    assert (yield ws.recv()) == "o"
    ws.client.sendClose(1000, "bye")
    yield ws.wait_closed()
    server.clock.advance(0)
    assert server.log.last.lost == [(1000, "bye")]
    assert server.resource.session_count == 0


@pytest_twisted.inlineCallbacks
def test_session_ids_may_be_reused_on_websockets(server: Server) -> Generator[Deferred, Any, None]:
    ws1 = yield server.connect("/echo/000/same/websocket")
    ws2 = yield server.connect("/echo/000/same/websocket")
    assert (yield ws1.recv()) == "o"
    assert (yield ws2.recv()) == "o"
    ws1.client.sendMessage(b'["one"]')
    ws2.client.sendMessage(b'["two"]')
    assert (yield ws1.recv()) == 'a["one"]'
    assert (yield ws2.recv()) == 'a["two"]'


@pytest_twisted.inlineCallbacks
def test_connection_describes_the_upgrade_request(server: Server) -> Generator[Deferred, Any, None]:
    ws = yield server.connect("/echo/000/abc/websocket", origin="http://m.example", useragent="probe/1")
    assert (yield ws.recv()) == "o"
    conn = server.log.last.conn
    assert conn.transport_name == "websocket"
    assert conn.prefix == (b"echo",)
    assert conn.headers["origin"] == "http://m.example"
    assert conn.headers["user-agent"] == "probe/1"
    assert conn.remote_address.host == "127.0.0.1"


@pytest_twisted.inlineCallbacks
def test_permessage_deflate_is_refused(server: Server) -> Generator[Deferred, Any, None]:
    factory = ClientFactory(server.url("/echo/000/abc/websocket"))
    factory.setProtocolOptions(perMessageCompressionOffers=[PerMessageDeflateOffer()])
    factory.setProtocolOptions(
        perMessageCompressionAccept=lambda response: PerMessageDeflateResponseAccept(response)
        if isinstance(response, PerMessageDeflateResponse)
        else None
    )
    server.factories.append(factory)
    reactor.connectTCP("127.0.0.1", server.port.getHost().port, factory)
    factory.client = yield factory.opened.addTimeout(TIMEOUT, reactor)
    assert (yield factory.recv()) == "o"
    assert factory.client.websocket_extensions_in_use == []


@pytest_twisted.inlineCallbacks
def test_frame_over_max_payload_size_is_refused_with_1009() -> Generator[Deferred, Any, None]:
    server = Server(max_payload_size=1000)
    try:
        ws = yield server.connect("/echo/000/abc/websocket")
        assert (yield ws.recv()) == "o"
        ws.client.sendMessage(b'["' + b"x" * 1000 + b'"]')
        code, _ = yield ws.wait_closed()
        assert code == 1009
        server.clock.advance(0)
        assert server.log.last.messages == []
        assert server.log.last.lost[0][0] == 1009
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_raw_websocket_echo(server: Server) -> Generator[Deferred, Any, None]:
    ws = yield server.connect("/echo/websocket")
    ws.client.sendMessage("Hello world!\uffff".encode("utf-8"))
    assert (yield ws.recv()) == "Hello world!\uffff"
    conn = server.log.last.conn
    assert conn.transport_name == "websocket-raw"
    conn.send_encoded(quote('{"a": "</b>"}'))
    assert (yield ws.recv()) == '{"a": "</b>"}'
    # No SockJS frames on the raw endpoint, heartbeats included.
    server.clock.advance(60)
    ws.client.sendMessage(b"ping")
    assert (yield ws.recv()) == "ping"


@pytest_twisted.inlineCallbacks
def test_raw_websocket_close_carries_code_and_reason(server: Server) -> Generator[Deferred, Any, None]:
    ws = yield server.connect("/close/websocket")
    code, reason = yield ws.wait_closed()
    assert (code, reason) == (3000, "Go away!")


@pytest_twisted.inlineCallbacks
def test_raw_websocket_app_close_with_rfc_code(server: Server) -> Generator[Deferred, Any, None]:
    ws = yield server.connect("/echo/websocket")
    ws.client.sendMessage(b"x")
    yield ws.recv()
    server.log.last.conn.close(1009, "Message too big")
    code, reason = yield ws.wait_closed()
    assert (code, reason) == (1009, "Message too big")


@pytest_twisted.inlineCallbacks
def test_raw_binary_frames_are_refused(server: Server) -> Generator[Deferred, Any, None]:
    ws = yield server.connect("/echo/websocket")
    ws.client.sendMessage(b"\x00\x01", isBinary=True)
    code, _ = yield ws.wait_closed()
    assert code == 1003


@pytest_twisted.inlineCallbacks
def test_full_tcp_buffer_pauses_the_app_and_drains_in_order() -> Generator[Deferred, Any, None]:
    """The receiver is the TCP transport's producer: a client that stops
    reading makes Twisted pause it, which reaches the handler."""
    server = Server(outgoing_high_water=64 * 1024, send_queue_limit=8 * 1024 * 1024)
    try:
        ws = yield server.connect("/echo/000/abc/websocket")
        assert (yield ws.recv()) == "o"
        ws.client.transport.pauseProducing()  # the client stops reading
        handler = server.log.last
        chunk = quote("m" * 65000)
        sent = 0
        while not handler.conn.paused:
            assert sent < 2000, "never paused"  # 130 MB: far beyond any socket buffer
            handler.conn.send_encoded(chunk)
            sent += 1
            if sent % 16 == 0:
                # Let the reactor write (and notice the full socket).
                yield deferLater(0.001)
        assert handler.flow == ["pause"]
        ws.client.transport.resumeProducing()
        received = 0
        while received < sent:
            frame = yield ws.recv()
            assert frame.startswith('a["mmm')
            received += frame.count('"m')
        assert received == sent
        assert handler.flow == ["pause", "resume"]
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_queue_over_hard_bound_closes_with_1013() -> Generator[Deferred, Any, None]:
    server = Server(outgoing_high_water=1000, send_queue_limit=10000)
    try:
        ws = yield server.connect("/echo/000/abc/websocket")
        assert (yield ws.recv()) == "o"
        handler = server.log.last
        receiver = handler.conn._session.receiver
        receiver.pauseProducing()  # as Twisted does when the socket is full
        assert handler.flow == ["pause"]
        count = 0
        while handler.conn.send("x" * 998):
            count += 1
        assert count == 10
        code, reason = yield ws.wait_closed()
        assert (code, reason) == SEND_QUEUE_FULL
        server.clock.advance(0)
        assert handler.lost == [SEND_QUEUE_FULL]
    finally:
        yield server.stop()


def deferLater(seconds: float) -> Deferred:
    from twisted.internet.task import deferLater as _later

    return _later(reactor, seconds, lambda: None)
