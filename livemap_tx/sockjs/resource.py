"""
The SockJS service as one twisted.web resource.

The resource is a leaf: it routes on ``request.postpath`` alone, so one
instance serves any number of mount points (a Klein branch route such as
``/sockjs/<map>/`` returns it). Sessions are keyed by the mount point
(``request.prepath``) and the session id, so two mount points never share
one. The URL scheme and every header below follow the sockjs-protocol test
suite (protocol 0.3.3 with the later fixes sockjs-node passes).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Callable
from urllib.parse import parse_qs

import orjson
from autobahn.twisted.resource import WebSocketResource
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http import datetimeToString
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from . import frames
from .session import (
    ConnectionInfo,
    Session,
    SessionOptions,
    SockJSConnection,
    SockJSHandler,
)
from .transports import (
    EVENTSOURCE_PRELUDE,
    HTMLFILE_PRELUDE,
    XHR_STREAMING_PRELUDE,
    EventSourceReceiver,
    HtmlFileReceiver,
    HTTPReceiver,
    JsonpReceiver,
    SockJSWebSocketFactory,
    WebSocketContext,
    XhrPollingReceiver,
    XhrStreamingReceiver,
)

__all__ = ["SockJSResource", "DEFAULT_SOCKJS_URL"]

DEFAULT_SOCKJS_URL = "https://cdn.jsdelivr.net/npm/sockjs-client@1/dist/sockjs.min.js"

ONE_YEAR = 365 * 24 * 60 * 60
NO_CACHE = b"no-store, no-cache, no-transform, must-revalidate, max-age=0"

_IFRAME_TEMPLATE = """<!DOCTYPE html>
<html>
<head>
  <meta http-equiv="X-UA-Compatible" content="IE=edge" />
  <meta http-equiv="Content-Type" content="text/html; charset=UTF-8" />
  <script src="{sockjs_url}"></script>
  <script>
    document.domain = document.domain;
    SockJS.bootstrap_iframe();
  </script>
</head>
<body>
  <h2>Don't panic!</h2>
  <p>This is a SockJS hidden iframe. It's used for cross domain magic.</p>
</body>
</html>"""

_IFRAME_NAME = re.compile(rb"iframe[0-9a-z_.\-]*\.html")
_CALLBACK = re.compile(rb"[a-zA-Z0-9_.\-]{1,32}")
_VALID_SEGMENT = re.compile(rb"[^/.]+")

# Headers of the opening request the app may see (sockjs-node's list, plus
# Origin). Cookies stay out: the app has no business with them here.
_EXPOSED_HEADERS = (
    "origin",
    "referer",
    "x-client-ip",
    "x-forwarded-for",
    "x-cluster-client-ip",
    "via",
    "x-real-ip",
    "x-forwarded-proto",
    "x-ssl",
    "host",
    "user-agent",
    "accept-language",
)

# Transports under /<server>/<session>/: the methods each answers.
_SESSION_ROUTES: dict[bytes, tuple[bytes, ...]] = {
    b"xhr": (b"POST", b"OPTIONS"),
    b"xhr_send": (b"POST", b"OPTIONS"),
    b"xhr_streaming": (b"POST", b"OPTIONS"),
    b"jsonp": (b"GET",),
    b"jsonp_send": (b"POST",),
    b"eventsource": (b"GET",),
    b"htmlfile": (b"GET",),
    b"websocket": (b"GET",),
}


class SockJSResource(Resource):
    """
    A SockJS 0.3.3 service: ``/info``, ``/iframe.html``, raw ``/websocket``
    and every session transport under ``/<server>/<session>/``.

    ``handler_factory(conn)`` is called when a session opens and returns the
    app's handler for it (see ``SockJSHandler``). All timers run on ``clock``.
    """

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        handler_factory: Callable[[SockJSConnection], SockJSHandler],
        clock: IReactorTime,
        *,
        websocket: bool = True,
        cookie_needed: bool = False,
        heartbeat: float = 25.0,
        disconnect_delay: float = 5.0,
        response_limit: int = 128 * 1024,
        max_message_size: int = 64 * 1024,
        outgoing_high_water: int = 64 * 1024,
        outgoing_low_water: int | None = None,
        send_queue_limit: int = 1024 * 1024,
        max_payload_size: int = 256 * 1024,
        sockjs_url: str = DEFAULT_SOCKJS_URL,
        open_handshake_timeout: float = 10.0,
        close_handshake_timeout: float = 5.0,
        websocket_ping_interval: float = 0.0,
        websocket_ping_timeout: float = 0.0,
    ) -> None:
        super().__init__()
        if response_limit < 1 or max_message_size < 1 or max_payload_size < 1:
            raise ValueError("limits must be positive")
        if send_queue_limit < outgoing_high_water:
            raise ValueError("send_queue_limit must be at least outgoing_high_water")
        self._handler_factory = handler_factory
        self._clock = clock
        self.websocket = websocket
        self.cookie_needed = cookie_needed
        self.response_limit = response_limit
        self.max_payload_size = max_payload_size
        self._options = SessionOptions(
            heartbeat=heartbeat,
            disconnect_delay=disconnect_delay,
            max_message_size=max_message_size,
            outgoing_high_water=outgoing_high_water,
            outgoing_low_water=(
                outgoing_high_water // 4 if outgoing_low_water is None else outgoing_low_water
            ),
            send_queue_limit=send_queue_limit,
        )
        self._raw_options = SessionOptions(**{**vars(self._options), "heartbeat": None})
        # Sessions of the HTTP transports, by (mount point, session id).
        self._sessions: dict[tuple[tuple[bytes, ...], bytes], Session] = {}
        # Every live session, websockets included (for shutdown and metrics).
        self._live: set[Session] = set()

        self._iframe = _IFRAME_TEMPLATE.format(sockjs_url=sockjs_url).encode("utf-8")
        self._iframe_etag = b'"' + hashlib.md5(self._iframe).hexdigest().encode("ascii") + b'"'

        self._ws_factory = SockJSWebSocketFactory(reactor=clock)
        self._ws_factory.setProtocolOptions(
            # Frames carry JSON-escaped messages, possibly several.
            maxMessagePayloadSize=max_payload_size,
            maxFramePayloadSize=max_payload_size,
            openHandshakeTimeout=open_handshake_timeout,
            closeHandshakeTimeout=close_handshake_timeout,
            autoPingInterval=websocket_ping_interval,
            autoPingTimeout=websocket_ping_timeout,
            # Broadcast frames are shared; compression would force a
            # per-client encode.
            perMessageCompressionAccept=lambda offers: None,
            webStatus=False,
            utf8validateIncoming=True,
            # Tell a client why it is cut off (1009, 1007...) instead of
            # dropping the TCP connection without a word.
            failByDrop=False,
        )
        self._ws_resource = WebSocketResource(self._ws_factory)

    # -- public ------------------------------------------------------------

    @property
    def session_count(self) -> int:
        """Live sessions of every transport."""
        return len(self._live)

    def close_all(self, code: int = 1001, reason: str = "Server shutting down") -> None:
        """Close every live session (for a clean shutdown)."""
        for session in list(self._live):
            session.close(code, reason)

    # -- twisted.web -------------------------------------------------------

    def getChild(self, path: bytes, request: Request) -> Resource:  # pragma: no cover
        return self  # isLeaf: never walked

    def render(self, request: Request) -> bytes | int:
        segments = list(request.postpath or [])
        # A single trailing slash is allowed after any SockJS path.
        if len(segments) > 1 and segments[-1] == b"" and segments[-2] != b"":
            segments.pop()
        try:
            if len(segments) == 0 or segments == [b""]:
                return self._route(request, (b"GET",), self._welcome)
            if len(segments) == 1:
                name = segments[0]
                if name == b"info":
                    return self._route(request, (b"GET", b"OPTIONS"), self._info)
                if _IFRAME_NAME.fullmatch(name):
                    return self._route(request, (b"GET",), self._iframe_page)
                if name == b"websocket":
                    return self._route(request, (b"GET",), self._raw_websocket)
                return self._not_found(request)
            if len(segments) == 3:
                server, session_id, transport = segments
                methods = _SESSION_ROUTES.get(transport)
                if (
                    methods is not None
                    and _VALID_SEGMENT.fullmatch(server)
                    and _VALID_SEGMENT.fullmatch(session_id)
                ):
                    return self._route(
                        request,
                        methods,
                        lambda req: self._transport(req, session_id, transport),
                    )
            return self._not_found(request)
        except Exception:
            self.log.failure("SockJS request failed")
            return self._error(request, 500, "500 - Internal Server Error")

    # -- helpers -----------------------------------------------------------

    def _route(
        self,
        request: Request,
        methods: tuple[bytes, ...],
        render: Callable[[Request], bytes | int],
    ) -> bytes | int:
        if request.method not in methods:
            request.setResponseCode(405)
            request.defaultContentType = None
            request.setHeader(b"Allow", b", ".join(methods))
            return b""
        return render(request)

    def _not_found(self, request: Request) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"Content-Type", b"text/plain; charset=UTF-8")
        return b"404 Error: Page not found\n"

    def _error(self, request: Request, code: int, message: str) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"text/plain; charset=UTF-8")
        return message.encode("utf-8")

    def _cache_for(self, request: Request, seconds: int = ONE_YEAR) -> None:
        request.setHeader(b"Cache-Control", b"public, max-age=%d" % (seconds,))
        request.setHeader(b"Expires", datetimeToString(self._clock.seconds() + seconds))

    def _no_cache(self, request: Request) -> None:
        request.setHeader(b"Cache-Control", NO_CACHE)

    def _cors(self, request: Request, null_is_star: bool = False) -> None:
        origin = request.getHeader(b"origin")
        if not origin or (null_is_star and origin == b"null"):
            request.setHeader(b"Access-Control-Allow-Origin", b"*")
        else:
            # Echo the origin: cookies (JSESSIONID) need credentials, and
            # credentials forbid "*".
            request.setHeader(b"Access-Control-Allow-Origin", origin)
            request.setHeader(b"Access-Control-Allow-Credentials", b"true")
        request.setHeader(b"Vary", b"Origin")
        asked = request.getHeader(b"access-control-request-headers")
        if asked:
            request.setHeader(b"Access-Control-Allow-Headers", asked)

    def _session_cookie(self, request: Request) -> None:
        # Load balancers that do sticky sessions only by JSESSIONID need to
        # see one; echo the client's, or set a dummy.
        if not self.cookie_needed:
            return
        value = request.getCookie(b"JSESSIONID") or b"dummy"
        if not re.fullmatch(rb"[!#-+\--:<-\[\]-~]{1,256}", value):
            value = b"dummy"
        request.addCookie(b"JSESSIONID", value, path=b"/")

    def _options_response(self, request: Request, methods: bytes) -> bytes:
        request.setResponseCode(204)
        self._cache_for(request)
        request.setHeader(b"Access-Control-Allow-Methods", methods)
        request.setHeader(b"Access-Control-Max-Age", b"%d" % (ONE_YEAR,))
        request.defaultContentType = None
        return b""

    def _connection_info(self, request: Request, transport_name: str) -> ConnectionInfo:
        headers = {}
        for name in _EXPOSED_HEADERS:
            value = request.getHeader(name.encode("ascii"))
            if value:
                headers[name] = value.decode("latin-1")
        return ConnectionInfo(
            prefix=tuple(request.prepath or ()),
            remote_address=request.getClientAddress(),
            headers=headers,
            transport_name=transport_name,
        )

    def _new_session(self, key: tuple[tuple[bytes, ...], bytes] | None, raw: bool = False) -> Session:
        def closed(session: Session) -> None:
            self._live.discard(session)
            if key is not None and self._sessions.get(key) is session:
                del self._sessions[key]

        session = Session(
            self._handler_factory,
            self._clock,
            self._raw_options if raw else self._options,
            on_closed=closed,
            framed=not raw,
        )
        self._live.add(session)
        if key is not None:
            self._sessions[key] = session
        return session

    # -- pages -------------------------------------------------------------

    def _welcome(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=UTF-8")
        return b"Welcome to SockJS!\n"

    def _iframe_page(self, request: Request) -> bytes:
        if request.getHeader(b"if-none-match") == self._iframe_etag:
            request.setResponseCode(304)
            request.defaultContentType = None
            return b""
        self._cache_for(request)
        request.setHeader(b"Content-Type", b"text/html; charset=UTF-8")
        request.setHeader(b"ETag", self._iframe_etag)
        return self._iframe

    def _info(self, request: Request) -> bytes:
        self._cors(request)
        if request.method == b"OPTIONS":
            return self._options_response(request, b"OPTIONS, GET")
        self._no_cache(request)
        request.setHeader(b"Content-Type", b"application/json; charset=UTF-8")
        return orjson.dumps(
            {
                "websocket": self.websocket,
                "cookie_needed": self.cookie_needed,
                "origins": ["*:*"],
                "entropy": secrets.randbits(32),
            }
        )

    # -- websockets ----------------------------------------------------------

    def _raw_websocket(self, request: Request) -> bytes | int:
        return self._websocket(request, raw=True)

    def _websocket(self, request: Request, raw: bool) -> bytes | int:
        if not self.websocket:
            self._cache_for(request)
            return self._not_found(request)
        upgrade = (request.getHeader(b"upgrade") or b"").strip().lower()
        connection = [t.strip().lower() for t in (request.getHeader(b"connection") or b"").split(b",")]
        if upgrade != b"websocket" or b"upgrade" not in connection:
            return self._error(request, 400, 'Can "Upgrade" only to "WebSocket".')
        if raw and request.getHeader(b"sec-websocket-version") not in (b"8", b"13"):
            return self._error(request, 400, "Only supported WebSocket protocol is RFC 6455.")
        info = self._connection_info(request, "websocket-raw" if raw else "websocket")
        self._ws_factory.next_context = WebSocketContext(
            info, raw, lambda raw: self._new_session(None, raw=raw)
        )
        try:
            return self._ws_resource.render(request)
        finally:
            self._ws_factory.next_context = None

    # -- session transports ----------------------------------------------------

    def _transport(self, request: Request, session_id: bytes, transport: bytes) -> bytes | int:
        if transport == b"websocket":
            return self._websocket(request, raw=False)
        key = (tuple(request.prepath or ()), session_id)
        self._session_cookie(request)
        if request.method == b"OPTIONS":
            self._cors(request)
            return self._options_response(request, b"OPTIONS, POST")
        self._no_cache(request)
        if transport == b"xhr_send":
            self._cors(request)
            return self._xhr_send(request, key)
        if transport == b"jsonp_send":
            return self._jsonp_send(request, key)

        receiver: HTTPReceiver
        if transport == b"xhr":
            self._cors(request)
            request.setHeader(b"Content-Type", b"application/javascript; charset=UTF-8")
            receiver = XhrPollingReceiver(request)
        elif transport == b"xhr_streaming":
            self._cors(request)
            request.setHeader(b"Content-Type", b"application/javascript; charset=UTF-8")
            request.write(XHR_STREAMING_PRELUDE)
            receiver = XhrStreamingReceiver(request, self.response_limit)
        elif transport == b"eventsource":
            self._cors(request, null_is_star=True)
            request.setHeader(b"Content-Type", b"text/event-stream")
            request.write(EVENTSOURCE_PRELUDE)
            receiver = EventSourceReceiver(request, self.response_limit)
        elif transport == b"htmlfile":
            callback = self._callback(request)
            if isinstance(callback, str):
                return self._error(request, 500, callback)
            request.setHeader(b"Content-Type", b"text/html; charset=UTF-8")
            request.write(HTMLFILE_PRELUDE(callback))
            receiver = HtmlFileReceiver(request, self.response_limit)
        else:  # jsonp
            callback = self._callback(request)
            if isinstance(callback, str):
                return self._error(request, 500, callback)
            request.setHeader(b"Content-Type", b"application/javascript; charset=UTF-8")
            request.setHeader(b"X-Content-Type-Options", b"nosniff")
            receiver = JsonpReceiver(request, callback)

        session = self._sessions.get(key)
        if session is None:
            session = self._new_session(key)
        session.attach(receiver, self._connection_info(request, receiver.transport_name))
        return NOT_DONE_YET

    def _callback(self, request: Request) -> bytes | str:
        """The JSONP/htmlfile callback name, or the error text."""
        args: dict[bytes, list[bytes]] = request.args or {}
        values = args.get(b"c") or args.get(b"callback")
        if not values:
            return '"callback" parameter required'
        if not _CALLBACK.fullmatch(values[0]):
            return 'invalid "callback" parameter'
        return values[0]

    def _read_body(self, request: Request) -> bytes | None:
        content = request.content
        if content is None:
            return b""
        content.seek(0)
        body = content.read(self.max_payload_size + 1)
        if len(body) > self.max_payload_size:
            return None
        return body

    def _deliver(self, request: Request, key: tuple[tuple[bytes, ...], bytes], payload: bytes | str) -> bytes | None:
        """Decode and deliver a payload; an error response, or None when done."""
        try:
            messages = frames.decode_payload(payload)
        except frames.PayloadError as e:
            return self._error(request, 500, str(e))
        session = self._sessions.get(key)
        if session is None:
            return self._not_found(request)
        session.deliver(messages)
        return None

    def _too_big(self, request: Request, key: tuple[tuple[bytes, ...], bytes]) -> bytes:
        session = self._sessions.get(key)
        if session is not None:
            session.close(1009, "Message too big")
        return self._error(request, 413, "Payload too large.")

    def _xhr_send(self, request: Request, key: tuple[tuple[bytes, ...], bytes]) -> bytes:
        body = self._read_body(request)
        if body is None:
            return self._too_big(request, key)
        error = self._deliver(request, key, body)
        if error is not None:
            return error
        # Firefox takes a 204 without a type for XML and complains.
        request.setResponseCode(204)
        request.setHeader(b"Content-Type", b"text/plain; charset=UTF-8")
        return b""

    def _jsonp_send(self, request: Request, key: tuple[tuple[bytes, ...], bytes]) -> bytes:
        body = self._read_body(request)
        if body is None:
            return self._too_big(request, key)
        ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        payload: bytes | str
        if ctype == b"application/x-www-form-urlencoded":
            try:
                form = parse_qs(body.decode("utf-8"), keep_blank_values=True)
            except UnicodeDecodeError:
                return self._error(request, 500, frames.BROKEN_JSON)
            payload = (form.get("d") or [""])[0]
        else:
            payload = body
        error = self._deliver(request, key, payload)
        if error is not None:
            return error
        # Konqueror mishandles 204: answer with a body.
        request.setHeader(b"Content-Type", b"text/plain; charset=UTF-8")
        return b"ok"
