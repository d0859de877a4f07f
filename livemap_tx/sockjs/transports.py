"""
SockJS receivers: how frames travel to the client on each transport.

HTTP transports write frames into one twisted.web response each, wrapped
the way the browser side expects (``xhr``/``xhr_streaming``: a line;
``eventsource``: an SSE event; ``htmlfile``: a script tag; ``jsonp``: a
callback). Polling transports end the response after one frame; streaming
ones after ``response_limit`` bytes, so the browser can free what it
buffered. Websockets carry one frame per message (or, on the raw endpoint,
the bare messages) through Autobahn.

Every receiver is also a streaming producer for its transport, so a full TCP
send buffer reaches the session (and from there the app) as back-pressure.
"""

from __future__ import annotations

from typing import Any, Callable

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from . import frames
from .session import (
    CONNECTION_INTERRUPTED,
    ConnectionInfo,
    Session,
)

__all__ = [
    "EventSourceReceiver",
    "HtmlFileReceiver",
    "HTTPReceiver",
    "JsonpReceiver",
    "WebSocketReceiver",
    "XhrPollingReceiver",
    "XhrStreamingReceiver",
    "HTMLFILE_PRELUDE",
    "XHR_STREAMING_PRELUDE",
]

# IE needs 2 KiB before it shows anything of a streaming XHR.
XHR_STREAMING_PRELUDE = b"h" * 2048 + b"\n"
# Opera needs a new line before the first event.
EVENTSOURCE_PRELUDE = b"\r\n"

_HTMLFILE_TEMPLATE = b"""
<!doctype html>
<html><head>
  <meta http-equiv="X-UA-Compatible" content="IE=edge" />
  <meta http-equiv="Content-Type" content="text/html; charset=UTF-8" />
</head><body><h2>Don't panic!</h2>
  <script>
    document.domain = document.domain;
    var c = parent.%s;
    c.start();
    function p(d) {c.message(d);};
    window.onload = function() {c.stop();};
  </script>
"""


def HTMLFILE_PRELUDE(callback: bytes) -> bytes:
    """The htmlfile page head, padded to more than 1 KiB (Safari waits for that)."""
    page = _HTMLFILE_TEMPLATE % (callback,)
    return page + b" " * max(0, 1024 - len(page) + 14) + b"\r\n\r\n"


def _js_string(frame: bytes) -> bytes:
    """A frame as a JavaScript string literal, safe inside <script>."""
    return frames.quote(frame.decode("utf-8"))


@implementer(IPushProducer)
class _ReceiverFlow:
    """
    A receiver as a streaming producer: its transport (an HTTP channel's, or
    the TCP or TLS transport under a websocket) is full or has drained.
    """

    session: Session | None
    paused: bool

    def pauseProducing(self) -> None:  # noqa: N802 (Twisted's names)
        if not self.paused:
            self.paused = True
            if self.session is not None:
                self.session.receiver_paused()

    def resumeProducing(self) -> None:  # noqa: N802
        if self.paused:
            self.paused = False
            if self.session is not None:
                self.session.receiver_resumed()

    def stopProducing(self) -> None:  # noqa: N802
        # The connection is going away; its own close handling does the rest.
        pass


class HTTPReceiver(_ReceiverFlow):
    """One HTTP response carrying frames; ends after ``limit`` bytes."""

    log = Logger()
    transport_name = "http"
    delay_disconnect = True
    streaming = False

    def __init__(self, request: Request, limit: int) -> None:
        self.request = request
        self.session: Session | None = None
        self.paused = False
        self._limit = limit
        self._sent = 0
        self._finished = False
        self._producing = False
        request.notifyFinish().addCallbacks(lambda _: None, self._connection_lost)
        if self.streaming:
            request.registerProducer(self, True)
            self._producing = True

    def wrap(self, frame: bytes) -> bytes:
        raise NotImplementedError()

    def send_frame(self, frame: bytes) -> None:
        if self._finished:
            return
        data = self.wrap(frame)
        self._sent += len(data)
        self.request.write(data)
        if self._sent >= self._limit:
            # Browsers keep a streamed response in memory until it ends:
            # end it now and then so they can let go.
            self.finish(0, "")

    def send_messages(self, encoded: list[bytes]) -> None:
        self.send_frame(frames.message_frame(encoded))

    def finish(self, code: int, reason: str) -> None:
        """End the response (the session, if attached, is told)."""
        if self._finished:
            return
        self._finished = True
        self._stop_producing()
        self.request.finish()
        session = self.session
        if session is not None:
            session.detach(self, code, reason)

    def _stop_producing(self) -> None:
        if self._producing:
            self._producing = False
            self.request.unregisterProducer()

    def _connection_lost(self, reason: Failure) -> None:
        """The client went away mid-response: the session ends now."""
        # The channel is gone already: nothing to unregister from.
        self._producing = False
        if self._finished:
            return
        self._finished = True
        self.delay_disconnect = False
        session = self.session
        if session is not None:
            session.detach(self, *CONNECTION_INTERRUPTED)



class XhrPollingReceiver(HTTPReceiver):
    transport_name = "xhr-polling"

    def __init__(self, request: Request) -> None:
        super().__init__(request, limit=1)

    def wrap(self, frame: bytes) -> bytes:
        return frame + b"\n"


class XhrStreamingReceiver(HTTPReceiver):
    transport_name = "xhr-streaming"
    streaming = True

    def wrap(self, frame: bytes) -> bytes:
        return frame + b"\n"


class EventSourceReceiver(HTTPReceiver):
    transport_name = "eventsource"
    streaming = True

    def wrap(self, frame: bytes) -> bytes:
        # Frames never hold a raw CR, LF or NUL: every message is JSON with
        # control characters escaped.
        return b"data: " + frame + b"\r\n\r\n"


class HtmlFileReceiver(HTTPReceiver):
    transport_name = "htmlfile"
    streaming = True

    def wrap(self, frame: bytes) -> bytes:
        return b"<script>\np(" + _js_string(frame) + b");\n</script>\r\n"


class JsonpReceiver(HTTPReceiver):
    transport_name = "jsonp-polling"

    def __init__(self, request: Request, callback: bytes) -> None:
        super().__init__(request, limit=1)
        self._callback = callback

    def wrap(self, frame: bytes) -> bytes:
        # The leading comment defeats the "Rosetta Flash" JSONP exploit.
        return b"/**/" + self._callback + b"(" + _js_string(frame) + b");\r\n"


# -- websockets ---------------------------------------------------------------

# Close codes a server may put on the wire (RFC 6455 7.4 and the IANA list);
# Autobahn's sendClose allows only 1000 and 3000-4999.
_WIRE_CODES = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})


class WebSocketReceiver(_ReceiverFlow):
    """A websocket carrying SockJS frames (or bare messages when raw)."""

    delay_disconnect = False

    def __init__(self, protocol: "SockJSWebSocketProtocol", raw: bool) -> None:
        self.protocol = protocol
        self.raw = raw
        self.session: Session | None = None
        self.paused = False
        self._closed = False

    @property
    def transport_name(self) -> str:
        return "websocket-raw" if self.raw else "websocket"

    def _send(self, payload: bytes) -> None:
        if not self._closed and self.protocol.state == WebSocketServerProtocol.STATE_OPEN:
            self.protocol.sendMessage(payload, isBinary=False)

    def send_frame(self, frame: bytes) -> None:
        if self.raw:
            return  # the raw endpoint has no SockJS frames
        self._send(frame)

    def send_messages(self, encoded: list[bytes]) -> None:
        if not self.raw:
            self._send(frames.message_frame(encoded))
            return
        for item in encoded:
            self._send(frames.unquote(item).encode("utf-8", "surrogatepass"))

    def finish(self, code: int, reason: str) -> None:
        """Close the websocket (with the session's code where the wire allows it)."""
        if self._closed:
            return
        self._closed = True
        protocol = self.protocol
        if protocol.state != WebSocketServerProtocol.STATE_OPEN:
            return
        reason_bytes = reason.encode("utf-8")[:123]
        if 3000 <= code <= 4999 or code == 1000:
            protocol.sendClose(code, reason_bytes.decode("utf-8", "ignore"))
        elif code in _WIRE_CODES:
            # Valid on the wire, refused by sendClose's stricter check.
            protocol.sendCloseFrame(code=code, reasonUtf8=reason_bytes)
        else:
            protocol.sendClose(1000)

    def connection_closed(self, code: int, reason: str) -> None:
        self._closed = True
        session = self.session
        if session is not None:
            session.detach(self, code, reason)



class SockJSWebSocketProtocol(WebSocketServerProtocol):
    """Autobahn protocol for both websocket endpoints; one session each."""

    log_sockjs = Logger()
    sockjs_context: "WebSocketContext | None" = None

    def onOpen(self) -> None:
        context = self.sockjs_context
        if context is None:  # pragma: no cover - only built by our factory
            self.sendClose(1011)
            return
        try:
            self._receiver = WebSocketReceiver(self, context.raw)
            self._session = context.new_session(raw=context.raw)
            transport: Any = self.transport
            assert transport is not None
            # twisted.web's HTTPChannel is still registered on the transport
            # it handed over: swap in the receiver so a full send buffer
            # reaches the session.
            transport.unregisterProducer()
            transport.registerProducer(self._receiver, True)
            self._session.attach(self._receiver, context.info)
        except Exception:
            self.log_sockjs.failure("SockJS websocket open failed")
            self.sendClose(1011)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        session = getattr(self, "_session", None)
        if session is None:
            return
        if self._receiver.raw:
            if isBinary:
                session.close(1003, "Binary frames not supported")
                return
            session.deliver([payload.decode("utf-8", "surrogatepass")])
            return
        try:
            messages = frames.decode_websocket_payload(payload)
        except frames.PayloadError:
            # As sockjs-node does: a websocket close with 3000, and no
            # SockJS close frame before it (the suite's test_broken_json).
            # The session ends when the close completes (onClose).
            self._receiver.finish(3000, "Broken framing.")
            return
        session.deliver(messages)

    def dropConnection(self, abort: bool = False) -> None:  # noqa: N802 (Autobahn's name)
        # Autobahn aborts (RST) when the peer answers a close we started;
        # sockjs-node ends the socket (FIN) after a clean closing handshake,
        # and the protocol suite's test_broken_json reads to the end.
        # Timeouts and protocol errors are not clean: they still abort.
        if abort and self.wasClean:
            abort = False
        super().dropConnection(abort)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        receiver = getattr(self, "_receiver", None)
        if receiver is not None:
            if self.closedByMe and self.localCloseCode is not None:
                # We closed it (a limit Autobahn enforces, say): our code
                # says why, not the peer's echo.
                code = self.localCloseCode
                reason = (self.localCloseReason or b"").decode("utf-8", "replace")
            if code is None:
                code, reason = CONNECTION_INTERRUPTED
            receiver.connection_closed(code, reason or "")


class WebSocketContext:
    """What the resource knew about the upgrade request, handed to the protocol."""

    def __init__(
        self, info: ConnectionInfo, raw: bool, new_session: Callable[..., Session]
    ) -> None:
        self.info = info
        self.raw = raw
        self.new_session = new_session


class SockJSWebSocketFactory(WebSocketServerFactory):
    """
    One factory per resource; the resource sets ``next_context`` right
    before ``WebSocketResource.render`` builds the protocol (synchronously).
    """

    protocol = SockJSWebSocketProtocol

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.next_context: WebSocketContext | None = None

    def buildProtocol(self, addr: Any) -> SockJSWebSocketProtocol:
        protocol = super().buildProtocol(addr)
        assert isinstance(protocol, SockJSWebSocketProtocol)
        protocol.sockjs_context = self.next_context
        self.next_context = None
        return protocol
