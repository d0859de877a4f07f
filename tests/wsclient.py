"""
A small WebSocket test client on Autobahn: connect, send JSON, await the
next message or the close. Waits are bounded so a broken server fails a
test instead of hanging it.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, endpoints, reactor

WAIT = 5.0


class _Protocol(WebSocketClientProtocol):
    def onOpen(self) -> None:  # noqa: N802
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802,N803
        self.factory.client._deliver(payload)

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:  # noqa: N802,N803
        client = self.factory.client
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(f"refused: {code} {reason}"))
        client._closed(code, reason)


class WSClient:
    """One test connection; `messages` holds what arrived and was not yet taken."""

    def __init__(self) -> None:
        self.messages: list[dict] = []
        # Every message's bytes as they arrived, in order.
        self.raw: list[bytes] = []
        self._waiting: list[defer.Deferred] = []
        self.close_code: Optional[int] = None
        self.close_reason: Optional[str] = None
        self.closed: defer.Deferred = defer.Deferred()
        self.protocol: Optional[_Protocol] = None

    def _deliver(self, payload: bytes) -> None:
        self.raw.append(payload)
        self.messages.append(json.loads(payload))
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.callback(None)

    def _closed(self, code: Optional[int], reason: Optional[str]) -> None:
        self.close_code, self.close_reason = code, reason
        if not self.closed.called:
            self.closed.callback((code, reason))
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.callback(None)

    def send(self, obj: Any) -> None:
        assert self.protocol is not None
        self.protocol.sendMessage(json.dumps(obj).encode())

    def send_raw(self, payload: bytes, binary: bool = False) -> None:
        assert self.protocol is not None
        self.protocol.sendMessage(payload, isBinary=binary)

    async def next(self, kind: Optional[str] = None, timeout: float = WAIT) -> dict:
        """The next message (of `kind`, skipping others), waiting at most `timeout`."""
        deadline = reactor.seconds() + timeout
        while True:
            while self.messages:
                message = self.messages.pop(0)
                if kind is None or message.get("type") == kind:
                    return message
            if self.closed.called:
                raise AssertionError(f"closed ({self.close_code}) while waiting for {kind}")
            remaining = deadline - reactor.seconds()
            if remaining <= 0:
                raise AssertionError(f"no {kind or 'message'} within {timeout} s")
            waiter: defer.Deferred = defer.Deferred()
            waiter.addTimeout(remaining, reactor, onTimeoutCancel=lambda *_: None)
            self._waiting.append(waiter)
            await waiter

    async def until(self, predicate, timeout: float = WAIT) -> dict:
        """Read messages until one satisfies `predicate`; return it."""
        deadline = reactor.seconds() + timeout
        while True:
            message = await self.next(timeout=max(0.01, deadline - reactor.seconds()))
            if predicate(message):
                return message

    async def wait_closed(self, timeout: float = WAIT) -> tuple:
        closed = defer.Deferred()
        self.closed.addBoth(lambda result: (closed.callback(result), result)[1])
        closed.addTimeout(timeout, reactor)
        return await closed

    def close(self, code: int = 1000) -> None:
        if self.protocol is not None and self.protocol.state == self.protocol.STATE_OPEN:
            self.protocol.sendClose(code)

    def abort(self) -> None:
        """Drop the TCP connection without a close handshake."""
        if self.protocol is not None and self.protocol.transport is not None:
            self.protocol.transport.abortConnection()


async def connect(url: str, origin: Optional[str] = None, tls=None, offers=None) -> WSClient:
    """Open a WebSocket to `url` (ws://127.0.0.1:PORT/ws/MAP; wss:// with `tls` options)."""
    client = WSClient()
    factory = WebSocketClientFactory(url, origin=origin)
    factory.protocol = _Protocol
    factory.client = client
    factory.opened = defer.Deferred()
    factory.setProtocolOptions(autoPingInterval=None)
    if offers:
        factory.setProtocolOptions(perMessageCompressionOffers=offers)
    host, port = factory.host, factory.port
    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1" if host == "localhost" else host, port)
    if factory.isSecure:
        endpoint = endpoints.wrapClientTLS(tls, endpoint)
    await endpoint.connect(factory)
    opened = factory.opened
    opened.addTimeout(WAIT, reactor)
    client.protocol = await opened
    return client
