"""
The HTTP server under livemap's routes (web.py): what every HTTP connection
gets whatever it asks for. Bounded request bodies (size, spooling to disk,
deadlines), a bounded send buffer and keep-alive probes, the per-address
and total connection limits, and an access log that never holds a private
map's name or a device's token.
"""

from __future__ import annotations

import re
import socket
import tempfile
from typing import Any, Optional, cast
from urllib.parse import unquote_to_bytes

from twisted.internet.interfaces import IDelayedCall, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from .admission import Admission
from .connections import ConnectionTable, socket_budget


# Paths that carry a map name, for the access log: a private map's name is
# its only key, so it never goes into a log.
_MAP_IN_PATH = re.compile(rb"^(/(?:m|ws|sockjs|api/maps)/)(?!public(?:/|$))[^/?]+")
# Paths that carry a device's token: its only credential.
_TOKEN_IN_PATH = re.compile(rb"^(/(?:api/devices|apps/owntracks|apps/overland)/)[^/?]+")
# And anything shaped like a secret, wherever it is (tokens are 32 characters
# of this alphabet, private map names 24): what a mistyped URL, or one
# spelled in a way no route takes, may carry.
_SECRET_SHAPED = re.compile(rb"[A-Za-z0-9_-]{20,}")


def loggable_path(raw: bytes) -> bytes:
    """
    The path of a request as the access log may show it: decoded and
    normalised at least as far as routing does (percent-escapes, repeated
    slashes, dot segments), then every map name but `public`, every token
    and anything shaped like one replaced with `*`. However a request spells
    a token, routed or not, the log never holds it (a SockJS session id
    excepted). No query string.
    """
    path = unquote_to_bytes(raw.split(b"?", 1)[0])
    segments: list[bytes] = []
    for segment in path.split(b"/"):
        if segment in (b"", b"."):
            continue
        if segment == b"..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    normal = b"/" + b"/".join(segments) + (b"/" if path.endswith(b"/") and segments else b"")
    normal = _TOKEN_IN_PATH.sub(rb"\1*", _MAP_IN_PATH.sub(rb"\1*", normal))
    parts = normal.split(b"/")
    # A SockJS session's id stays (its map does not): --log-sockjs-requests
    # is there to follow sessions through a balancer.
    keep = 4 if parts[1:2] == [b"sockjs"] else -1
    return b"/".join(part if index == keep else _SECRET_SHAPED.sub(b"*", part)
                     for index, part in enumerate(parts))


def _log_escape(value: bytes) -> str:
    return repr(value)[2:-1].replace('"', '\\"')


def private_log_formatter(timestamp: str, request: Any) -> str:
    """
    The combined log format without what would leak where people are:
    query strings, map names other than `public`, tokens (loggable_path),
    and referrers (map links).
    """
    address = request.getClientAddress()
    path = loggable_path(request.uri)
    return '"%s" - - %s "%s %s %s" %d %s "-" "%s"' % (
        _log_escape(getattr(address, "host", "-").encode()), timestamp,
        _log_escape(request.method), _log_escape(path), _log_escape(request.clientproto),
        request.code, request.sentLength or "-",
        _log_escape(request.getHeader(b"user-agent") or b"-"))


# No request body is read beyond this (twisted.web would read any body into
# memory or a temporary file before a resource sees it): the largest
# legitimate one is an Overland batch of 1,000 points.
MAX_BODY = 2 * 1024 * 1024
_TOO_LARGE = (b"HTTP/1.1 413 Content Too Large\r\nContent-Type: text/plain\r\n"
              b"Content-Length: 22\r\nConnection: close\r\n\r\nrequest body too large")


# A request body must keep coming: no gap between two reads longer than
# BODY_TIMEOUT (nginx's client_body_timeout), and on the whole at least
# MIN_BODY_RATE bytes a second after the first BODY_TIMEOUT seconds (Apache
# mod_reqtimeout's MinRate): the deadline of a body is BODY_TIMEOUT plus one
# second per MIN_BODY_RATE bytes received. An Overland batch of 2 MiB over a
# phone's slowest link (a few KB/s) makes it; a dribbler is cut off.
BODY_TIMEOUT = 20.0
MIN_BODY_RATE = 500.0


# A body is kept in memory up to this size (twisted.web's own threshold),
# then in a temporary file: a descriptor, which the connection table counts.
SPOOL_BYTES = 100_000


class SpooledBody(tempfile.SpooledTemporaryFile):
    """
    A request body that takes a descriptor only once it is over SPOOL_BYTES,
    not as soon as a client declares a large one (twisted.web opens a
    temporary file at once): a dribbler costs one descriptor, not two.
    """

    def __init__(self) -> None:
        super().__init__(max_size=SPOOL_BYTES)
        self.table: Optional[ConnectionTable] = None
        self.counted = False

    def rollover(self) -> None:
        rolled = getattr(self, "_rolled", False)  # tempfile's own flag
        if not rolled and self.table is not None and not self.counted:
            self.counted = True
            self.table.file_opened()
        super().rollover()

    def close(self) -> None:
        if self.counted and self.table is not None:
            self.counted = False
            self.table.file_closed()
        super().close()


def _close_body(request: Request) -> None:
    content = request.content
    if isinstance(content, SpooledBody):
        content.close()


class BoundedChannel(HTTPChannel):
    """
    HTTP/1.1 with a deadline for each request's headers: a client that
    dribbles them (slowloris), or keeps an idle connection, is cut off; and
    one for its body (BODY_TIMEOUT, MIN_BODY_RATE).
    A body over MAX_BODY (declared, or chunked past it) gets a 413 and is
    never read into memory: the connection is closed after a lingering
    close, as nginx does. With a `table` (connections.py), the connection
    counts against its address's limit, and one that waits for its client
    may be dropped to make room when the process runs out of descriptors.
    """

    header_timeout = 20.0
    body_timeout = BODY_TIMEOUT
    min_body_rate = MIN_BODY_RATE
    max_body = MAX_BODY
    # After a 413, how long what the client still sends is read and dropped.
    linger = 2.0
    table: Optional[ConnectionTable] = None
    # The clock of callLater (make_site gives the Site's reactor).
    clock: Optional[Any] = None
    _header_deadline: Optional[IDelayedCall] = None
    _body_deadline: Optional[IDelayedCall] = None
    _body_started = 0.0
    _linger_call: Optional[IDelayedCall] = None
    _body_read = 0
    _refused = False
    log = Logger()

    def connectionMade(self) -> None:  # noqa: N802 (Twisted's names)
        if self.table is not None:
            peer = getattr(self.transport.getPeer(), "host", "unknown")  # type: ignore[union-attr]
            if not self.table.admit(self, peer):
                self._refused = True
                return
        super().connectionMade()
        detect_half_open(self.transport)
        bound_send_buffer(self.transport)
        self._arm()

    def allHeadersReceived(self) -> None:  # noqa: N802
        self._disarm()
        self._body_read = 0
        if self.length is not None and self.length > self.max_body:
            self._too_large()
            return
        super().allHeadersReceived()
        content = self.requests[-1].content if self.requests else None
        if isinstance(content, SpooledBody):
            content.table = self.table
        if self.length != 0:
            self._body_started = self._now()
            self._body_deadline = self.callLater(self.body_timeout, self._too_slow)

    def allContentReceived(self) -> None:  # noqa: N802
        self._stop_body_deadline()
        if self.table is not None:
            self.table.answering(self)
        super().allContentReceived()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._refused:
            return  # lingering: dropped unread
        super().dataReceived(data)

    def rawDataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._refused:
            return
        if self._body_deadline is not None:
            self._body_read += len(data)
            if self._body_read > self.max_body + 64 * 1024:  # a chunked body past the bound
                self._too_large()
                return
            self._extend_body_deadline()
        super().rawDataReceived(data)

    def _now(self) -> float:
        if self.clock is None:
            from twisted.internet import reactor
            return cast(Any, reactor).seconds()
        return self.clock.seconds()

    def _extend_body_deadline(self) -> None:
        """The next read within body_timeout, and the whole body at min_body_rate."""
        deadline = self._body_deadline
        if deadline is None or not deadline.active():
            return
        now = self._now()
        at_rate = self._body_started + self.body_timeout + self._body_read / self.min_body_rate
        deadline.reset(max(0.0, min(now + self.body_timeout, at_rate) - now))

    def _stop_body_deadline(self) -> None:
        if self._body_deadline is not None and self._body_deadline.active():
            self._body_deadline.cancel()
        self._body_deadline = None

    def _too_large(self) -> None:
        self._refused = True
        self._disarm()
        self._stop_body_deadline()
        transport = self.transport
        if transport is None:
            return
        transport.write(_TOO_LARGE)
        # Closing now, with the client's body still arriving, would make the
        # kernel answer with a reset, which can destroy the 413 before a
        # client that writes its whole body first (most HTTP libraries)
        # reads it. So: send the 413 and a FIN, drop what still comes for a
        # moment, then close.
        if ITCPTransport.providedBy(transport):
            transport.loseWriteConnection()
        self._linger_call = self.callLater(self.linger, self._end_linger)

    def _end_linger(self) -> None:
        self._linger_call = None
        if self.transport is not None:
            cast(Any, self.transport).abortConnection()

    def requestDone(self, request: Request) -> None:  # noqa: N802
        _close_body(request)  # answered: its body is not needed any more
        # Armed first: a pipelined request handled inside requestDone disarms it.
        self._arm()
        super().requestDone(request)

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        self._disarm()
        self._stop_body_deadline()
        if self.table is not None:
            self.table.answering(self)
        for request in self.requests:
            _close_body(request)
        if self._linger_call is not None and self._linger_call.active():
            self._linger_call.cancel()
        self._linger_call = None
        super().connectionLost(reason)

    def _arm(self) -> None:
        self._disarm()
        self._header_deadline = self.callLater(self.header_timeout, self._too_slow)
        if self.table is not None:
            self.table.waiting_for_client(self)

    def _disarm(self) -> None:
        if self._header_deadline is not None and self._header_deadline.active():
            self._header_deadline.cancel()
        self._header_deadline = None

    def _too_slow(self) -> None:
        self._header_deadline = None
        self._body_deadline = None
        if self.table is not None:
            self.table.answering(self)
        if self.transport is not None:
            cast(Any, self.transport).abortConnection()


# A peer that vanished without a FIN or RST (a phone that lost its network)
# is found by TCP keepalive after KEEPALIVE_IDLE + KEEPALIVE_COUNT * INTERVAL
# seconds, instead of the system default of two hours.
KEEPALIVE_IDLE = 60
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 6


# The kernel's send buffer of each connection, fixed instead of autotuned
# (Linux lets one grow to net.ipv4.tcp_wmem's maximum, 4 MiB by default): a
# phone that stops reading then fills it, and Twisted's buffer after it,
# within a few hundred KiB, so the hub pauses it and keeps only what it
# missed, and the kernel holds at most twice this for it. Plenty for a map's
# updates, even over a slow, distant link.
SEND_BUFFER = 128 * 1024


def bound_send_buffer(transport: Any) -> None:
    """Fix an accepted connection's kernel send buffer at SEND_BUFFER."""
    get_handle = getattr(transport, "getHandle", None)
    sock = get_handle() if get_handle is not None else None
    if not isinstance(sock, socket.socket):
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
    except OSError:
        pass


def detect_half_open(transport: Any) -> None:
    """Tune TCP keepalive on an accepted connection (where the platform allows)."""
    get_handle = getattr(transport, "getHandle", None)
    sock = get_handle() if get_handle is not None else None
    if not isinstance(sock, socket.socket):
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE),
                            ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
                            ("TCP_KEEPCNT", KEEPALIVE_COUNT)):
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    except OSError:
        pass


class QuietSite(Site):
    """
    Access logs without SockJS's transport requests (unless asked for): a
    polling client makes one request per message, and logs say nothing per
    move. Sessions are logged once when they open and close.
    """

    log_sockjs = False

    def getContentFile(self, length: Optional[int]) -> SpooledBody:  # noqa: N802 (Twisted's)
        return SpooledBody()

    def log(self, request: Any) -> None:
        if self.log_sockjs or not request.uri.startswith(b"/sockjs/"):
            super().log(request)


def make_site(resource: IResource, reactor: Any, *, header_timeout: float = 20.0,
              body_timeout: float = BODY_TIMEOUT, min_body_rate: float = MIN_BODY_RATE,
              log_sockjs: bool = False, admission: Optional[Admission] = None,
              max_sockets: Optional[int] = None) -> Site:
    """
    The twisted.web Site for livemap's resource: bounded headers and bodies,
    private logs. With `admission`, every connection counts against its
    per-address limit, and at most `max_sockets` (default: what the
    open-file limit allows) are held, the longest waiting dropped first.
    """
    site = QuietSite(resource, logFormatter=private_log_formatter, reactor=reactor)
    site.log_sockjs = log_sockjs
    table = None if admission is None else ConnectionTable(
        admission, socket_budget() if max_sockets is None else max_sockets)
    site.connections = table  # type: ignore[attr-defined]

    def channel() -> BoundedChannel:
        built = BoundedChannel()
        built.header_timeout = header_timeout
        built.body_timeout = body_timeout
        built.min_body_rate = min_body_rate
        built.table = table
        built.clock = reactor
        return built
    site.protocol = channel  # type: ignore[assignment]
    return site
