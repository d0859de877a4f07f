"""
A delaying TCP proxy for tests (Twisted, in the test's reactor): put it in
front of one Redis server and that server answers later than the others,
by a fixed delay plus random jitter, each direction on its own. Bytes keep
their order within a connection (as TCP does); only the timing changes.

    proxy = DelayingProxy(target_port, to_server=(0.3, 0.1), to_client=(0.3, 0.1))
    port = await proxy.start()      # give the nodes 127.0.0.1:port
    ...
    await proxy.stop()
"""

from __future__ import annotations

import random
from collections import deque
from typing import Any, Optional

from twisted.internet import defer, protocol, reactor
from twisted.internet.interfaces import IDelayedCall


class _Direction:
    """One direction of one connection: each chunk goes out after its delay, in order."""

    def __init__(self, delay: float, jitter: float, rng: random.Random) -> None:
        self.delay = delay
        self.jitter = jitter
        self.rng = rng
        self.peer: Any = None
        # (due, chunk), due never decreasing; one timer for the head only,
        # so that chunks due at the same moment keep their order.
        self.queue: deque[tuple[float, bytes]] = deque()
        self.last_due = 0.0
        self.call: Optional[IDelayedCall] = None

    def send(self, data: bytes) -> None:
        now = reactor.seconds()
        due = max(now + self.delay + self.rng.uniform(0, self.jitter), self.last_due)
        self.last_due = due
        self.queue.append((due, data))
        if self.call is None:
            self.call = reactor.callLater(due - now, self._deliver)

    def _deliver(self) -> None:
        self.call = None
        now = reactor.seconds()
        while self.queue and self.queue[0][0] <= now:
            _, data = self.queue.popleft()
            if self.peer is not None and self.peer.transport is not None:
                self.peer.transport.write(data)
        if self.queue:
            self.call = reactor.callLater(max(0.0, self.queue[0][0] - now), self._deliver)

    def cancel(self) -> None:
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None
        self.queue.clear()


class _Upstream(protocol.Protocol):
    """The proxy's connection to the real server."""

    def __init__(self, client: _Downstream) -> None:
        self.client = client

    def connectionMade(self) -> None:  # noqa: N802
        self.client.upstream_ready(self)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.client.to_client.send(data)

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        # After what is still on its way to the client.
        due = max(0.0, self.client.to_client.last_due - reactor.seconds())
        reactor.callLater(due, self.client.close)


class _Downstream(protocol.Protocol):
    """A client's connection to the proxy."""

    def __init__(self, proxy: DelayingProxy) -> None:
        self.proxy = proxy
        self.to_server = _Direction(*proxy.to_server, proxy.rng)
        self.to_client = _Direction(*proxy.to_client, proxy.rng)
        self.to_client.peer = self
        self.upstream: Optional[_Upstream] = None

    def connectionMade(self) -> None:  # noqa: N802
        self.proxy.clients.add(self)
        self.transport.pauseProducing()
        factory = protocol.ClientFactory()
        factory.protocol = lambda: _Upstream(self)  # type: ignore[assignment]
        self.connector = reactor.connectTCP("127.0.0.1", self.proxy.target_port, factory,
                                            timeout=5)

    def upstream_ready(self, upstream: _Upstream) -> None:
        self.upstream = upstream
        self.to_server.peer = upstream
        self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.to_server.send(data)

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        self.proxy.clients.discard(self)
        self.to_server.cancel()
        self.to_client.cancel()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.loseConnection()
        else:
            self.connector.disconnect()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()


class DelayingProxy(protocol.Factory):
    """
    Listens on a free 127.0.0.1 port; every connection goes to `target_port`,
    late: `to_server` and `to_client` are each (fixed delay, up to this much
    more at random), in seconds.
    """

    def __init__(self, target_port: int, *, to_server: tuple[float, float],
                 to_client: tuple[float, float], seed: Optional[int] = None) -> None:
        self.target_port = target_port
        self.to_server = to_server
        self.to_client = to_client
        self.rng = random.Random(seed)
        self.clients: set[_Downstream] = set()
        self.listening: Any = None

    def buildProtocol(self, addr: Any) -> _Downstream:  # noqa: N802
        return _Downstream(self)

    @property
    def port(self) -> int:
        return self.listening.getHost().port

    def start(self, port: int = 0) -> int:
        """Listen on 127.0.0.1:`port` (0: any free port); raises CannotListenError if taken."""
        self.listening = reactor.listenTCP(port, self, interface="127.0.0.1")
        return self.port

    def stop(self) -> defer.Deferred:
        for client in list(self.clients):
            client.transport.abortConnection()
        return defer.maybeDeferred(self.listening.stopListening)
