"""
The WebSocket transport: Autobahn frames in, hub frames out.

Every limit is set explicitly: message size, handshake timeout,
pings, no permessage-deflate (it would force a per-client encode on the
broadcast path). Flow control uses Twisted's producer API: when a client's
write buffer fills, Twisted pauses us and the hub skips that client until
it drains.
"""

from __future__ import annotations

from pprint import pformat
from typing import Any, Optional, cast

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket import protocol as autobahn_protocol
from autobahn.websocket.protocol import TrafficStats
from autobahn.websocket.types import ConnectionDeny
from autobahn.util import encode_truncate
from twisted.internet import tcp
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from .. import wire
from ..admission import Admission, Refused
from .client import DEFAULT_RATE, Client
from .small_frames import small_text_frame, text_frame
from ..hub import Frame, Hub, MapFull
from ..privacy import map_label as log_name

# Autobahn drops anything larger without reading it; between 4 KiB and this
# bound the client gets the protocol's `too_big` error before the close.
FRAME_LIMIT = 64 * 1024
WS_PREFIX = "/ws/"


def map_from_path(path: str) -> Optional[str]:
    """The map name of a WebSocket request path, or None if it is not one."""
    if not path.startswith(WS_PREFIX):
        return None
    name = path[len(WS_PREFIX):]
    return name if wire.is_map_name(name) else None


def write_through(transport: Any, data: bytes) -> None:
    """
    Write to a plain TCP connection at once when nothing is queued before the
    data, and leave to Twisted only what the socket did not take.

    Twisted's write() always buffers and waits for the reactor to report the
    socket writable: for a broadcast that is two epoll changes and a trip
    through the reactor per client per tick, for bytes the kernel would have
    taken at once. Anything else (TLS, a backlog, a closing connection) goes
    through Twisted as usual, so order and flow control are unchanged.
    """
    if (type(transport) is tcp.Server and transport.connected
            and not transport.disconnecting and not transport._writeDisconnected
            and not transport._tempDataBuffer and not transport.dataBuffer):
        try:
            sent = transport.socket.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            sent = 0  # Twisted's own write will meet the error and close
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


@implementer(IPushProducer)
class _FlowControl:
    """
    Relays Twisted's pause/resume of the TCP transport to the hub, and stops
    reading from a client that does not read: otherwise it could keep the
    server writing (errors, snapshots) into a buffer that never drains.
    """

    def __init__(self, protocol: LiveMapProtocol) -> None:
        self.protocol = protocol

    def pauseProducing(self) -> None:  # noqa: N802 (Twisted's names)
        client = self.protocol.client
        if client is not None:
            client.pause()
        transport = cast(Any, self.protocol.transport)
        if transport is not None:
            transport.pauseProducing()

    def resumeProducing(self) -> None:  # noqa: N802
        transport = cast(Any, self.protocol.transport)
        if transport is not None:
            transport.resumeProducing()
        client = self.protocol.client
        if client is not None:
            client.resume()

    def stopProducing(self) -> None:
        pass


_OPEN = WebSocketServerProtocol.STATE_OPEN
# The key of a frame's WebSocket bytes in Frame.cache.
_WEBSOCKET = "websocket"
# Shared by every open connection: their counters add up, and nobody reads
# them (trackTimings and logOctets are off).
_SHARED_TRAFFIC_STATS = TrafficStats()
_NO_HEADERS: dict = {}
# What Autobahn keeps of the opening handshake and uses only during it.
_HANDSHAKE_LEFTOVERS = ("http_request_data", "http_response_data", "http_status_line",
                        "http_request_uri", "http_request_path", "http_request_params",
                        "http_request_host", "_wskey", "websocket_extensions",
                        "websocket_protocols", "websocket_origin")


class LiveMapProtocol(WebSocketServerProtocol):
    """One browser or app on one map."""

    client: Optional[Client] = None
    map_name: str = wire.DEFAULT_MAP
    # The client address counted by admission, until the connection closes.
    address: Optional[str] = None
    # Whether it took a place of its own under that address (not when its
    # TCP connection already counts there).
    counted = True
    view: Optional[wire.View] = None
    factory: LiveMapFactory

    def onConnect(self, request):  # noqa: N802 (Autobahn's name)
        map_name = map_from_path(request.path)
        if map_name is None:
            raise ConnectionDeny(404, "no such map")
        self.map_name = map_name
        admission = self.factory.admission
        headers = request.headers
        transport = self.transport
        assert transport is not None
        try:
            admission.check_origin(headers.get("origin"), headers.get("host"))
            address = admission.client_address(transport.getPeer().host,
                                               headers.get("x-forwarded-for"))
            self.counted = admission.acquire(address, carrier=transport)
        except Refused as refused:
            raise ConnectionDeny(refused.status, refused.reason) from None
        self.address = address
        # The view the page asks for in the URL (extension "clusters"), so
        # that its welcome is already for it; bad values are ignored.
        self.view = wire.view_from_query(request.params)
        return None

    def onOpen(self) -> None:  # noqa: N802
        try:
            self.client = Client(self.factory.hub, self.map_name, self,
                                 rate=self.factory.rate, precision=self.factory.precision,
                                 view=self.view)
            transport = cast(Any, self.transport)
            # twisted.web's channel was the transport's producer; it is ours now.
            transport.unregisterProducer()
            transport.registerProducer(_FlowControl(self), True)
            if getattr(transport, "producerPaused", False):
                # The welcome filled the buffer before the member existed:
                # Twisted paused the channel then; the hub must know too.
                self.client.pause()
            self._forget_the_handshake()
            self.factory.protocols.add(self)
            self.factory.log.info(
                "client {client} opened on map {map} from {peer}",
                client=self.client.id, map=log_name(self.map_name), peer=self.peer)
        except MapFull as full:
            # Admitted at the upgrade, but the map filled meanwhile.
            self.close(wire.CLOSE_POLICY, str(full))
        except Exception:
            self.factory.log.failure("could not open a client on map {map}",
                                     map=log_name(self.map_name))
            self.close(wire.CLOSE_INTERNAL_ERROR, "internal error")

    def _forget_the_handshake(self) -> None:
        """
        An idle connection costs what it keeps: Autobahn keeps the opening
        request and answer (headers, raw bytes, URI...) and a TrafficStats
        per connection, which nothing reads once the connection is open
        (livemap turns off Autobahn's statistics). About 3 KB of each idle
        connection's 10.
        """
        self.trafficStats = _SHARED_TRAFFIC_STATS
        self.http_headers = _NO_HEADERS
        for name in _HANDSHAKE_LEFTOVERS:
            setattr(self, name, None)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        """
        Small whole text frames (moves) are read here; whatever else comes,
        from its first byte on, goes to Autobahn (small_frames.py says why).
        """
        pos = 0
        while (self.state == _OPEN and self.current_frame is None and not self.data
               and not self.inside_message and self.client is not None):
            frame = small_text_frame(data, pos)
            if frame is None:
                break
            payload, pos = frame
            if self.autoPingTimeoutCall is not None and self.autoPingRestartOnAnyTraffic:
                # Traffic counts as an answer to a ping, as in Autobahn.
                self._cancelAutoPingTimeoutCall()
            self.client.message_received(payload, False)
        if pos < len(data):
            self._dataReceived(data[pos:] if pos else data)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802,N803
        if self.client is not None:
            self.client.message_received(payload, isBinary)

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:  # noqa: N802,N803
        client, self.client = self.client, None
        self.factory.protocols.discard(self)
        address, self.address = self.address, None
        if address is not None:
            self.factory.admission.release(address, self.counted)
        if client is not None:
            client.connection_lost()
            self.factory.log.info(
                "client {client} closed on map {map}: {code} {reason}",
                client=client.id, map=log_name(self.map_name), code=code, reason=reason)

    # The hub's Subscriber interface.

    def send_frame(self, frame: Frame) -> None:
        # The hot path of a broadcast: once per client per tick. The payload
        # is framed once for every WebSocket client (no compression, no mask:
        # the same bytes for all) and written straight to the socket.
        # (sendPreparedMessage -> sendData formats debug log arguments on
        # every call, which was most of the cost of a broadcast.)
        data = frame.cache.get(_WEBSOCKET)
        if data is None:
            data = frame.cache[_WEBSOCKET] = text_frame(frame.payload)
        if self.state == _OPEN:
            if self.send_queue:
                self.sendData(data)  # type: ignore[arg-type]
            else:
                write_through(self.transport, data)  # type: ignore[arg-type]

    def close(self, code: int, reason: str) -> None:
        """Close with any protocol code; Autobahn's sendClose only allows 1000 and 3000+."""
        if self.state == WebSocketServerProtocol.STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=encode_truncate(reason, 123), isReply=False)


class _LazyFormat:
    """pformat() done only if a debug line is really written."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __str__(self) -> str:
        return pformat(self.value)

    __repr__ = __str__


# Autobahn pretty-prints its ~30 settings for a debug log line on every new
# connection, whether debug logging is on or not: about half of the cost of
# accepting a WebSocket. Formatting them lazily changes no output.
autobahn_protocol.pformat = _LazyFormat  # type: ignore[assignment]


def _as_class_attribute(value: Any) -> Any:
    return staticmethod(value) if callable(value) else value


class LiveMapFactory(WebSocketServerFactory):
    """Builds one protocol per connection and keeps the shared settings."""

    protocol = LiveMapProtocol  # type: ignore[assignment]
    log = Logger()

    def __init__(self, hub: Hub, reactor: IReactorTime, *, rate: float = DEFAULT_RATE,
                 precision: float = 0.0, ping_interval: float = 30.0, ping_timeout: float = 30.0,
                 handshake_timeout: float = 10.0,
                 admission: Optional[Admission] = None) -> None:
        super().__init__(reactor=reactor)
        self.hub = hub
        self.rate = rate
        self.precision = precision
        self.admission = admission or Admission()
        self.protocols: set[LiveMapProtocol] = set()
        self.setProtocolOptions(
            maxFramePayloadSize=FRAME_LIMIT,
            maxMessagePayloadSize=FRAME_LIMIT,
            openHandshakeTimeout=handshake_timeout,
            closeHandshakeTimeout=2.0,
            autoPingInterval=ping_interval,
            autoPingTimeout=ping_timeout,
            autoPingRestartOnAnyTraffic=True,
            perMessageCompressionAccept=lambda offers: None,
            tcpNoDelay=True,
            failByDrop=False,
        )
        # No per-connection statistics (they are shared: _forget_the_handshake).
        self.logOctets = self.logFrames = self.trackTimings = False
        # Autobahn copies every setting from the factory into each new
        # protocol's __dict__ unless the protocol already has it: a subclass
        # per factory that carries them saves that per idle connection.
        # (Callables, such as perMessageCompressionAccept, must stay plain
        # functions there, not become methods.)
        self.protocol = type("LiveMapProtocol", (LiveMapProtocol,), {  # type: ignore[assignment]
            name: _as_class_attribute(getattr(self, name))
            for name in WebSocketServerProtocol.CONFIG_ATTRS})

    def close_all(self, code: int = wire.CLOSE_GOING_AWAY,
                  reason: str = "server shutting down") -> None:
        for protocol in list(self.protocols):
            protocol.close(code, reason)
