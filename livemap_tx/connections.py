"""
Every TCP connection of the HTTP port, whatever it becomes (a page, an API
call, a phone app's report, a WebSocket): counted against the per-address
limit of `Admission`, and kept within the process's file descriptors.

When the process holds as many connections as its descriptors allow
(`socket_budget`), a new connection takes the place of the one that has
waited longest for its client (an idle keep-alive, headers or a body still
arriving), so /healthz and /metrics, and everyone else, still get in while
slow clients hold connections. Connections being answered and live ones
(WebSocket) are never dropped for it; and live connections may use only
part of the budget (`Admission.max_connections` is lowered to it), so
there always are connections that can make room.
"""

from __future__ import annotations

import resource
from typing import Any, Optional, Protocol

from twisted.internet import tcp
from twisted.internet.error import ConnectionAborted
from twisted.logger import Logger
from twisted.python.failure import Failure

from .admission import Admission, Refused

# Descriptors kept for everything but client connections (log files, Redis,
# SQLite, the listening sockets, connections accepted in one go while the
# ones they replace are closing), as a share of the limit and at least this.
FD_RESERVE_SHARE = 0.1
FD_RESERVE_MIN = 64
# The share of the connection budget that live connections may not take.
REQUEST_SHARE = 0.05
REQUEST_MIN = 16

_REFUSED = (b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain\r\n"
            b"Retry-After: 10\r\nContent-Length: 38\r\nConnection: close\r\n\r\n"
            b"too many connections from this address")


def socket_budget(limit: Optional[int] = None) -> Optional[int]:
    """Client connections this process can hold: its open-file limit less a reserve."""
    if limit is None:
        try:
            limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        except (ValueError, OSError):
            return None
        if limit == resource.RLIM_INFINITY:
            return None
    reserve = max(FD_RESERVE_MIN, int(limit * FD_RESERVE_SHARE))
    return max(1, limit - reserve)


def _close_now(transport: Any) -> None:
    """
    Abort a connection and free its descriptor now, not on the reactor's next
    turn (abortConnection's way): in one turn the listening port may accept
    a hundred connections or more, each making room.
    """
    raw = transport
    while not isinstance(raw, tcp.Connection) and getattr(raw, "transport", None) is not None:
        raw = raw.transport  # under TLS: the TCP connection
    raw.abortConnection()
    if isinstance(raw, tcp.Connection) and hasattr(raw, "socket"):
        raw.connectionLost(Failure(ConnectionAborted()))


class Sheddable(Protocol):
    """What the table needs of a connection it may drop (http_site.BoundedChannel)."""

    transport: Any


class ConnectionTable:
    """The open connections of one HTTP port, and who makes room for whom."""

    log = Logger()

    def __init__(self, admission: Admission, max_sockets: Optional[int] = None) -> None:
        self.admission = admission
        self.max_sockets = max_sockets
        if max_sockets is not None:
            live = max_sockets - max(REQUEST_MIN, int(max_sockets * REQUEST_SHARE))
            if 0 < live < admission.max_connections:
                self.log.info("live connections capped at {live}: the open-file limit "
                              "leaves room for {sockets} connections", live=live,
                              sockets=max_sockets)
                admission.max_connections = live
        self.open = 0
        # Connections waiting for their client, the longest waiting first
        # (with the address they count under), in all and by address.
        self.waiting: dict[Sheddable, Optional[str]] = {}
        self.waiting_from: dict[str, dict[Sheddable, None]] = {}
        # Dropped to make room, and not closed yet.
        self.dropping = 0
        self.shed = 0

    def admit(self, channel: Sheddable, peer: str) -> bool:
        """
        Count a new connection from `peer` (a trusted proxy's are not counted
        per address: its clients' live connections are). At the address's
        limit, its own connection that has waited longest makes room; if
        none waits, the new one is refused with a 429 (False).
        """
        transport = channel.transport
        if not self.admission._trusted(peer):
            try:
                self.admission.open_connection(transport, peer)
            except Refused:
                if not self._make_room(peer):
                    transport.write(_REFUSED)
                    transport.loseConnection()
                    return False
                self.admission.open_connection(transport, peer)
        self.open += 1
        self._watch_close(transport)
        if self.max_sockets is not None and self.open - self.dropping > self.max_sockets:
            self._make_room()
        return True

    def _watch_close(self, transport: Any) -> None:
        # Counted until the socket closes, whatever protocol then owns it:
        # a WebSocket upgrade hands the transport to another protocol, and
        # the channel never hears of the close.
        lost = transport.connectionLost

        def connection_lost(reason: Any) -> None:
            try:
                lost(reason)
            finally:
                self._closed(transport)
        transport.connectionLost = connection_lost

    def _closed(self, transport: Any) -> None:
        if getattr(transport, "_livemap_closed", False):
            return
        transport._livemap_closed = True
        vars(transport).pop("connectionLost", None)  # no cycle through the wrapper
        self.open -= 1
        if getattr(transport, "_livemap_dropped", False):
            self.dropping -= 1
        self.admission.close_connection(transport)

    def _make_room(self, address: Optional[str] = None) -> bool:
        """Close the connection (of `address`, if given) that waited longest; False if none."""
        waiting = self.waiting if address is None else self.waiting_from.get(address, {})
        for channel in waiting:
            break
        else:
            return False  # all live or being answered: the budget's reserve is for them
        self.answering(channel)
        transport = channel.transport
        if transport is None:
            return False
        transport._livemap_dropped = True
        self.dropping += 1
        self.shed += 1
        _close_now(transport)
        return True

    def file_opened(self) -> None:
        """
        A request body went to a temporary file: one more descriptor (room
        is made at the next connection, not in the middle of a read).
        """
        self.open += 1

    def file_closed(self) -> None:
        self.open -= 1

    def waiting_for_client(self, channel: Sheddable) -> None:
        """`channel` waits for its client from now on (a new idle spell)."""
        self.answering(channel)
        address = self.admission.sockets.get(channel.transport)
        self.waiting[channel] = address
        if address is not None:
            self.waiting_from.setdefault(address, {})[channel] = None

    def answering(self, channel: Sheddable) -> None:
        """`channel` has its whole request (or is gone): not to be dropped."""
        address = self.waiting.pop(channel, None)
        if address is not None:
            mine = self.waiting_from.get(address)
            if mine is not None:
                mine.pop(channel, None)
                if not mine:
                    del self.waiting_from[address]
