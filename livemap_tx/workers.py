"""
`--workers N`: N livemap processes on one machine sharing one port.

The parent (`twistd livemap --workers N`) listens on the port, stops
reading from it, and starts N children with `reactor.spawnProcess`, passing
the listening socket as fd 3; each child adopts it
(`reactor.adoptStreamPort`) and the kernel spreads new connections among
them. The children are ordinary livemap nodes linked through Redis, so a
client of any worker sees one map.

SockJS's HTTP transports need every request of a session to reach the
process that holds the session, but the kernel hands each TCP connection to
whichever worker accepts first. So each session has an owner, worker
`hash(session id) % N`, and a worker that gets a request of a session it
does not own forwards it to the owner over loopback (a private port per
worker, also opened by the parent, so a restarted worker gets it back).
WebSocket connections (raw or SockJS's) are one TCP connection each and are
never forwarded.

Children die with the parent: each reads a pipe from the parent on stdin
and stops at its end of file (a parent killed with -9 closes it too), and on
Linux also asks the kernel for SIGTERM when the parent dies (the child's
side is worker_process.py). A child that exits while the parent runs is
started again with back-off.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
from io import BytesIO
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

from twisted.application import service
from twisted.internet import defer, endpoints, error, fdesc, protocol
from twisted.internet.address import IPv6Address
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

log = Logger()

SHARED_FD = 3
PRIVATE_FD = 4
# A child that lived this long before exiting is restarted at once.
STABLE_SECONDS = 10.0
MAX_RESTART_DELAY = 30.0

# SockJS transports made of several HTTP requests per session.
# Where forwarded requests come from: their X-Forwarded-For is believed.
LOOPBACK = ("127.0.0.1/32", "::1/128")
HTTP_TRANSPORTS = frozenset([b"xhr", b"xhr_send", b"xhr_streaming", b"jsonp",
                             b"jsonp_send", b"eventsource", b"htmlfile"])
# Not passed on to the owner: hop-by-hop, or no longer true of the body.
_DROPPED_HEADERS = frozenset([b"connection", b"keep-alive", b"proxy-connection",
                              b"transfer-encoding", b"content-length", b"upgrade", b"te"])


@dataclass(frozen=True)
class WorkerSpec:
    """What a child needs to know of its place among the workers."""

    index: int
    count: int
    private_ports: tuple[int, ...]
    ipv6: bool = False

    @property
    def family(self) -> int:
        return socket.AF_INET6 if self.ipv6 else socket.AF_INET


# SockJS session routing


def session_owner(session_id: bytes, count: int) -> int:
    """The worker that holds a SockJS session: the same answer in every worker."""
    digest = hashlib.blake2b(session_id, digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


class _QuietHTTP11ClientFactory(_HTTP11ClientFactory):
    noisy = False


class _Relay(protocol.Protocol):
    """Streams the owner's answer to the client as it comes (xhr_streaming...)."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.gone = False

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's names)
        if not self.gone:
            self.request.write(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:  # noqa: N802
        if not self.gone:
            self.gone = True
            self.request.finish()

    def client_gone(self) -> None:
        self.gone = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]


class SessionRouter(Resource):
    """
    Wraps the SockJS resource of one worker: requests of a session held by
    another worker go to that worker's private port; the rest are served
    here. Requests that came in on this worker's own private port were
    forwarded already and are always served here.
    """

    isLeaf = True

    def __init__(self, local: IResource, spec: WorkerSpec, reactor: Any) -> None:
        super().__init__()
        self.local = local
        self.spec = spec
        self.reactor = reactor
        self.forwarded = 0
        # Kept-alive connections to the other workers.
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool._factory = _QuietHTTP11ClientFactory  # one log line per connection is noise
        self.agent = Agent(reactor, pool=self.pool, connectTimeout=5)

    def owner(self, request: Request) -> Optional[int]:
        """The worker to forward to, or None to serve here."""
        segments = [segment for segment in (request.postpath or [])]
        if len(segments) < 3 or segments[2] not in HTTP_TRANSPORTS:
            return None
        owner = session_owner(segments[1], self.spec.count)
        if owner == self.spec.index:
            return None
        if request.getHost().port == self.spec.private_ports[self.spec.index]:
            return None
        return owner

    def render(self, request: Request) -> Any:
        owner = self.owner(request)
        if owner is None:
            return self.local.render(request)
        self.forwarded += 1
        self._forward(request, self.spec.private_ports[owner])
        return NOT_DONE_YET

    def _forward(self, request: Request, port: int) -> None:
        assert request.content is not None
        request.content.seek(0)
        body = request.content.read()
        headers = Headers()
        for name, values in request.requestHeaders.getAllRawHeaders():
            if name.lower() not in _DROPPED_HEADERS | {b"x-forwarded-for"}:
                headers.setRawHeaders(name, values)
        # The owner sees this worker as the peer: it is told who the peer was
        # (and trusts loopback for it), so limits per address still apply
        # to the real client.
        peer = getattr(request.getClientAddress(), "host", "unknown").encode()
        forwarded = b", ".join([*request.requestHeaders.getRawHeaders(b"x-forwarded-for", []),
                                peer])
        headers.setRawHeaders(b"x-forwarded-for", [forwarded])
        url = b"http://127.0.0.1:%d%s" % (port, request.uri)
        answer = self.agent.request(request.method, url, headers,
                                    FileBodyProducer(BytesIO(body)) if body else None)
        relay = _Relay(request)

        def client_gone(failure: Failure) -> None:
            relay.client_gone()
            answer.cancel()
        request.notifyFinish().addErrback(client_gone)

        def respond(response: Any) -> None:
            if relay.gone:
                response.deliverBody(protocol.Protocol())
                return
            request.setResponseCode(response.code, response.phrase)
            for name, values in response.headers.getAllRawHeaders():
                if name.lower() not in _DROPPED_HEADERS:
                    request.responseHeaders.setRawHeaders(name, values)
            response.deliverBody(relay)

        def failed(failure: Failure) -> None:
            # The owner is restarting: the SockJS client opens a new session.
            if relay.gone:
                return
            relay.gone = True
            log.info("could not forward a SockJS request to port {port}: {error}", port=port,
                     error=failure.getErrorMessage())
            request.setResponseCode(503)
            request.setHeader(b"Content-Type", b"text/plain; charset=UTF-8")
            request.write(b"session owner unavailable")
            request.finish()
        answer.addCallbacks(respond, failed)


# The child's side


class AdoptedPort(service.Service):
    """
    Serve `factory` on a listening socket inherited from the parent. With a
    `gate`, connections wait in the kernel's backlog (or go to the other
    workers) until the gate fires: the backplane's first sync.
    """

    def __init__(self, reactor: Any, fd: int, family: int, factory: Any,
                 gate: Optional[Callable[[], defer.Deferred]] = None) -> None:
        self.reactor = reactor
        self.fd = fd
        self.family = family
        self.factory = factory
        self.gate = gate
        self.port: Optional[IListeningPort] = None

    def startService(self) -> None:  # noqa: N802
        super().startService()
        fdesc.setNonBlocking(self.fd)
        self.port = port = self.reactor.adoptStreamPort(self.fd, self.family, self.factory)
        os.close(self.fd)  # adoptStreamPort keeps its own duplicate
        if self.gate is not None:
            waiting = self.gate()
            if not waiting.called:
                port.stopReading()  # type: ignore[attr-defined]
                waiting.addCallback(lambda _: port.startReading()  # type: ignore[attr-defined]
                                    if port.connected else None)  # type: ignore[attr-defined]

    def stopService(self) -> Optional[defer.Deferred]:  # noqa: N802
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return defer.maybeDeferred(port.stopListening)
        return None


# The parent's side (the child's is worker_process.py)

# Where the parent passes a worker its configuration.
CONFIG_VARIABLE = "LIVEMAP_WORKER_CONFIG"


class _Listening(protocol.Factory):
    """The parent never accepts on the sockets it shares; this says so if it did."""

    noisy = False

    def buildProtocol(self, addr: Any) -> None:  # noqa: N802
        return None


class _WorkerProcess(protocol.ProcessProtocol):
    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.started = supervisor.reactor.seconds()
        self.ended: defer.Deferred = defer.Deferred()
        self._partial = {1: b"", 2: b""}

    def childDataReceived(self, fd: int, data: bytes) -> None:  # noqa: N802
        lines = (self._partial.get(fd, b"") + data).split(b"\n")
        self._partial[fd] = lines.pop()
        for line in lines:
            if line:
                log.info("worker {index}: {line}", index=self.index,
                         line=line.decode("utf-8", "replace"))

    def processEnded(self, reason: Failure) -> None:  # noqa: N802
        for fd, rest in self._partial.items():
            if rest:
                self.childDataReceived(fd, b"\n")
        self.supervisor._ended(self, reason)
        self.ended.callback(None)


class Supervisor(service.Service):
    """
    The parent of `--workers N`: holds the shared port and each worker's
    private port, keeps N children running, and takes them down with it.
    """

    def __init__(self, reactor: Any, port: str, count: int, options: dict, *,
                 stop_grace: float = 5.0) -> None:
        self.reactor = reactor
        self.port_description = port
        self.count = count
        self.options = options
        self.stop_grace = stop_grace
        self.shared: Optional[IListeningPort] = None
        self.private: list[IListeningPort] = []
        self.processes: dict[int, _WorkerProcess] = {}
        self.crashes = [0] * count
        self.restarts: dict[int, Any] = {}

    @property
    def private_ports(self) -> tuple[int, ...]:
        return tuple(port.getHost().port for port in self.private)  # type: ignore[attr-defined]

    def privilegedStartService(self) -> None:  # noqa: N802
        super().privilegedStartService()
        # Listen now, so that a busy port makes twistd fail at start, loudly.
        endpoint = endpoints.serverFromString(self.reactor, self.port_description)
        result: list[Any] = []
        endpoint.listen(_Listening()).addBoth(result.append)
        if isinstance(result[0], Failure):
            result[0].raiseException()
        self.shared = result[0]
        result[0].stopReading()
        for _ in range(self.count):
            private = self.reactor.listenTCP(0, _Listening(), backlog=1024, interface="127.0.0.1")
            private.stopReading()
            self.private.append(private)

    def startService(self) -> None:  # noqa: N802
        super().startService()
        assert self.shared is not None
        host = self.shared.getHost()
        log.info("{count} workers share {host}:{port}; private ports {private}",
                 count=self.count, host=host.host, port=host.port,  # type: ignore[attr-defined]
                 private=" ".join(map(str, self.private_ports)))
        for index in range(self.count):
            self._spawn(index)

    def stopService(self) -> defer.Deferred:  # noqa: N802
        super().stopService()
        for call in self.restarts.values():
            if call.active():
                call.cancel()
        self.restarts.clear()
        waiting = []
        for process in list(self.processes.values()):
            waiting.append(process.ended)
            self._signal(process, "TERM")
            self.reactor.callLater(self.stop_grace, self._signal, process, "KILL")
        done = defer.gatherResults(waiting, consumeErrors=True)

        def close_ports(_: Any) -> defer.Deferred:
            ports = [port for port in [self.shared, *self.private] if port is not None]
            self.shared, self.private = None, []
            return defer.gatherResults([defer.maybeDeferred(port.stopListening)
                                        for port in ports], consumeErrors=True)
        return done.addCallback(close_ports)

    def _signal(self, process: _WorkerProcess, name: str) -> None:
        try:
            process.transport.signalProcess(name)  # type: ignore[union-attr]
        except error.ProcessExitedAlready:
            pass

    def _spawn(self, index: int) -> None:
        self.restarts.pop(index, None)
        if not self.running:
            return
        assert self.shared is not None
        spec = WorkerSpec(index, self.count, self.private_ports,
                          ipv6=isinstance(self.shared.getHost(), IPv6Address))
        config = {"worker": asdict(spec), "options": self.options}
        process = _WorkerProcess(self, index)
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [package_root, *filter(None, [env.get("PYTHONPATH")])])
        env["PYTHONUNBUFFERED"] = "1"
        env[CONFIG_VARIABLE] = json.dumps(config)
        transport = self.reactor.spawnProcess(
            process, sys.executable,
            [sys.executable, "-m", "livemap_tx.worker_process", f"--worker={index}"], env=env,
            childFDs={0: "w", 1: "r", 2: "r",
                      SHARED_FD: self.shared.fileno(),  # type: ignore[attr-defined]
                      PRIVATE_FD: self.private[index].fileno()})  # type: ignore[attr-defined]
        self.processes[index] = process
        log.info("worker {index} started (pid {pid})", index=index, pid=transport.pid)

    def _ended(self, process: _WorkerProcess, reason: Failure) -> None:
        index = process.index
        if self.processes.get(index) is process:
            del self.processes[index]
        if not self.running:
            log.info("worker {index} stopped", index=index)
            return
        lived = self.reactor.seconds() - process.started
        self.crashes[index] = 0 if lived >= STABLE_SECONDS else self.crashes[index] + 1
        delay = 0.0 if self.crashes[index] == 0 else min(
            MAX_RESTART_DELAY, 0.5 * 2 ** (self.crashes[index] - 1))
        log.warn("worker {index} exited ({why}) after {lived:.1f} s; restarting in {delay:g} s",
                 index=index, why=reason.getErrorMessage(), lived=lived, delay=delay)
        self.restarts[index] = self.reactor.callLater(delay, self._spawn, index)

