"""
SockJS sessions: the state that outlives any one HTTP request.

A session is opened by its first receiving request (or websocket), holds
the messages queued for the client while no request is there to carry them,
sends heartbeats while one is, and ends ``disconnect_delay`` seconds after
its last receiving request went away. Receivers (``transports.py``) only
carry frames; everything with a timer or a queue lives here, driven by an
injected clock so tests run in virtual time.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.logger import Logger

from . import frames

__all__ = [
    "ConnectionInfo",
    "Receiver",
    "Session",
    "SessionState",
    "SockJSConnection",
    "SockJSHandler",
    "SEND_QUEUE_FULL",
    "MESSAGE_TOO_BIG",
    "CONNECTION_INTERRUPTED",
    "SESSION_TIMED_OUT",
    "INTERNAL_ERROR",
]

# Close codes and reasons this library uses on its own (the app picks its own
# with ``SockJSConnection.close``). 1013 is RFC 6455's "Try Again Later": a
# client that could not keep up should reconnect and start afresh.
SEND_QUEUE_FULL = (1013, "Send queue full")
MESSAGE_TOO_BIG = (1009, "Message too big")
# What ``connection_lost`` is told when the client went away instead of
# closing: an aborted request (sockjs-node's "Connection interrupted") or no
# receiving request for ``disconnect_delay`` seconds.
CONNECTION_INTERRUPTED = (1002, "Connection interrupted")
SESSION_TIMED_OUT = (1001, "Session timed out")
INTERNAL_ERROR = (1011, "Internal error")
ANOTHER_CONNECTION = (2010, "Another connection still open")


class SockJSHandler(Protocol):
    """What ``handler_factory`` returns: the app's side of one session."""

    def message_received(self, message: str) -> None:
        """One SockJS message from the client, in order."""

    def connection_lost(self, code: int, reason: str) -> None:
        """The session ended (called once, never re-entrantly from ``close``)."""

    def pause_writing(self) -> None:
        """The session's unsent outgoing bytes went over the high-water mark."""

    def resume_writing(self) -> None:
        """They drained below the low-water mark again."""


class SessionState(enum.Enum):
    CONNECTING = 0
    OPEN = 1
    CLOSING = 2
    CLOSED = 3


@dataclass(frozen=True)
class ConnectionInfo:
    """What the app may know about the request that opened a session."""

    prefix: tuple[bytes, ...]
    remote_address: IAddress | None
    headers: Mapping[str, str] = field(default_factory=dict)
    transport_name: str = ""


class Receiver(Protocol):
    """
    A connection able to carry frames to the client right now.

    HTTP receivers are one response each; a websocket receiver lives as long
    as its socket. ``session`` is set while the receiver is attached.
    """

    session: "Session | None"
    #: end the session at once when this receiver goes (websockets), or give
    #: the client ``disconnect_delay`` seconds to come back (HTTP).
    delay_disconnect: bool
    #: the transport under it asked us to stop writing (producer API).
    paused: bool

    def send_frame(self, frame: bytes) -> None: ...

    def send_messages(self, encoded: list[bytes]) -> None: ...

    def finish(self, code: int, reason: str) -> None: ...


@dataclass
class SessionOptions:
    """The per-resource settings every session reads."""

    heartbeat: float | None = 25.0
    disconnect_delay: float = 5.0
    max_message_size: int = 64 * 1024
    outgoing_high_water: int = 64 * 1024
    outgoing_low_water: int = 16 * 1024
    send_queue_limit: int = 1024 * 1024


class Session:
    """
    One SockJS session (protocol state machine of sockjs-node's Session).

    ``framed`` is False for the raw ``/websocket`` endpoint, which has no
    open, heartbeat or close frames.
    """

    log = Logger()

    def __init__(
        self,
        handler_factory: Callable[["SockJSConnection"], SockJSHandler],
        clock: IReactorTime,
        options: SessionOptions,
        *,
        on_closed: Callable[["Session"], None] | None = None,
        framed: bool = True,
    ) -> None:
        self._handler_factory = handler_factory
        self._clock = clock
        self._options = options
        self._on_closed = on_closed
        self.framed = framed
        self.state = SessionState.CONNECTING
        self.connection = SockJSConnection(self)
        self.info: ConnectionInfo | None = None
        self._handler: SockJSHandler | None = None
        self._receiver: Receiver | None = None
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._app_paused = False
        self._close_code: tuple[int, str] | None = None
        self._close_frame: bytes | None = None
        self._lost_notified = False
        self._disconnect_call: IDelayedCall | None = None
        self._heartbeat_call: IDelayedCall | None = None
        self._last_write = clock.seconds()

    # -- receivers ---------------------------------------------------------

    @property
    def receiver(self) -> Receiver | None:
        return self._receiver

    @property
    def buffered_bytes(self) -> int:
        """Bytes of encoded messages queued and not yet handed to a receiver."""
        return self._buffered

    def attach(self, receiver: Receiver, info: ConnectionInfo) -> None:
        """A request (or websocket) arrived that can carry frames to the client."""
        if self._receiver is not None:
            # Two pollers on one session would each get half of the
            # messages; the protocol turns the newcomer away.
            receiver.send_frame(frames.close_frame(*ANOTHER_CONNECTION))
            receiver.finish(*ANOTHER_CONNECTION)
            return
        self._cancel_disconnect()
        if self.state is SessionState.CLOSING:
            # Keep telling late pollers why the session closed, until it
            # expires.
            self._flush_to(receiver)
            assert self._close_frame is not None and self._close_code is not None
            receiver.send_frame(self._close_frame)
            receiver.finish(*self._close_code)
            self._schedule_disconnect()
            return
        if self.state is SessionState.CLOSED:
            receiver.finish(*(self._close_code or SESSION_TIMED_OUT))
            return

        self._receiver = receiver
        receiver.session = self
        opening = self.state is SessionState.CONNECTING
        if opening:
            self.info = info
            self.state = SessionState.OPEN
            if self.framed:
                self._write(receiver, frames.OPEN)
        if self._receiver is receiver:
            # A polling receiver may already be gone after the open frame.
            self._flush()
            if self._receiver is receiver:
                self._start_heartbeat()
        if opening:
            self._open_handler()

    def detach(self, receiver: Receiver, code: int, reason: str) -> None:
        """
        The receiver's connection ended (finished by us, or lost).

        ``code``/``reason`` say why, for a session that ends right away
        (websockets, aborted requests).
        """
        if receiver is not self._receiver:
            return
        self._receiver = None
        receiver.session = None
        self._cancel_heartbeat()
        self._update_pressure()
        if self.state is SessionState.CLOSED:
            return
        if receiver.delay_disconnect:
            self._schedule_disconnect()
        else:
            self._expire(code, reason)

    def receiver_paused(self) -> None:
        """The attached receiver's transport buffer is full."""
        self._update_pressure()

    def receiver_resumed(self) -> None:
        """The attached receiver's transport drained: send what queued up."""
        self._flush()
        self._update_pressure()

    # -- messages ----------------------------------------------------------

    def deliver(self, messages: list[str]) -> None:
        """Messages from the client, in order, to the app."""
        limit = self._options.max_message_size
        for message in messages:
            if self.state is not SessionState.OPEN:
                return
            if len(message) > limit or (len(message) * 4 > limit and len(message.encode("utf-8", "surrogatepass")) > limit):
                self.close(*MESSAGE_TOO_BIG)
                return
            handler = self._handler
            if handler is None:
                return
            try:
                handler.message_received(message)
            except Exception:
                self.log.failure("SockJS handler failed on a message")

    def send_encoded(self, encoded: bytes) -> bool:
        """Queue one already-encoded message; False if the session is not open."""
        if self.state is not SessionState.OPEN:
            return False
        self._buffer.append(encoded)
        self._buffered += len(encoded)
        if self._buffered > self._options.send_queue_limit:
            # The app kept sending to a client that does not read: cut it
            # loose rather than hold unbounded memory for it.
            self._buffer.clear()
            self._buffered = 0
            self.close(*SEND_QUEUE_FULL)
            return False
        receiver = self._receiver
        if receiver is not None and not receiver.paused:
            self._flush()
        self._update_pressure()
        return True

    def close(self, code: int = 3000, reason: str = "Go away!") -> bool:
        """Close the session; late pollers get the close frame until it expires."""
        if self.state is not SessionState.OPEN:
            return False
        self.state = SessionState.CLOSING
        self._close_code = (code, reason)
        self._close_frame = frames.close_frame(code, reason)
        self._notify_lost(code, reason)
        receiver = self._receiver
        if receiver is not None:
            self._flush_to(receiver)
            if self.framed:
                self._write(receiver, self._close_frame)
            receiver.finish(code, reason)
            if self._receiver is receiver:
                self.detach(receiver, code, reason)
        elif self._disconnect_call is None:
            self._schedule_disconnect()
        return True

    # -- internals ---------------------------------------------------------

    def _open_handler(self) -> None:
        try:
            self._handler = self._handler_factory(self.connection)
        except Exception:
            self.log.failure("SockJS handler factory failed")
            self.close(*INTERNAL_ERROR)

    def _write(self, receiver: Receiver, frame: bytes) -> None:
        self._last_write = self._clock.seconds()
        receiver.send_frame(frame)

    def _flush(self) -> None:
        receiver = self._receiver
        if receiver is None or receiver.paused or not self._buffer:
            return
        self._flush_to(receiver)

    def _flush_to(self, receiver: Receiver) -> None:
        if not self._buffer:
            return
        batch, self._buffer = self._buffer, []
        self._buffered = 0
        self._last_write = self._clock.seconds()
        receiver.send_messages(batch)

    def _update_pressure(self) -> None:
        """Tell the app to pause or resume, with hysteresis."""
        handler = self._handler
        if handler is None or self.state is not SessionState.OPEN:
            return
        receiver = self._receiver
        transport_paused = receiver is not None and receiver.paused
        if not self._app_paused:
            if transport_paused or self._buffered > self._options.outgoing_high_water:
                self._app_paused = True
                self._call_handler("pause_writing")
        elif not transport_paused and self._buffered <= self._options.outgoing_low_water:
            self._app_paused = False
            self._call_handler("resume_writing")

    @property
    def paused(self) -> bool:
        return self._app_paused

    def _call_handler(self, name: str, *args: Any) -> None:
        method = getattr(self._handler, name, None)
        if method is None:
            return
        try:
            method(*args)
        except Exception:
            self.log.failure("SockJS handler {method} failed", method=name)

    def _start_heartbeat(self) -> None:
        delay = self._options.heartbeat
        if not self.framed or not delay or self._heartbeat_call is not None:
            return
        self._heartbeat_call = self._clock.callLater(delay, self._heartbeat_due)

    def _heartbeat_due(self) -> None:
        # One timer per session, never reset on writes (resetting a timer on
        # every broadcast is costly with thousands of sessions): when it
        # fires, send 'h' only if the line was idle a whole period.
        self._heartbeat_call = None
        receiver = self._receiver
        delay = self._options.heartbeat
        if receiver is None or not delay:
            return
        now = self._clock.seconds()
        due = self._last_write + delay
        if receiver.paused:
            # Data is waiting in a full buffer: the line is not idle.
            self._heartbeat_call = self._clock.callLater(delay, self._heartbeat_due)
        elif now + 1e-6 >= due:
            self._write(receiver, frames.HEARTBEAT)
            if self._receiver is receiver:
                self._heartbeat_call = self._clock.callLater(delay, self._heartbeat_due)
        else:
            self._heartbeat_call = self._clock.callLater(due - now, self._heartbeat_due)

    def _cancel_heartbeat(self) -> None:
        if self._heartbeat_call is not None:
            if self._heartbeat_call.active():
                self._heartbeat_call.cancel()
            self._heartbeat_call = None

    def _schedule_disconnect(self) -> None:
        self._cancel_disconnect()
        self._disconnect_call = self._clock.callLater(
            self._options.disconnect_delay, self._expire, *SESSION_TIMED_OUT
        )

    def _cancel_disconnect(self) -> None:
        if self._disconnect_call is not None:
            if self._disconnect_call.active():
                self._disconnect_call.cancel()
            self._disconnect_call = None

    def _expire(self, code: int, reason: str) -> None:
        """The session is over for good: forget it."""
        self._disconnect_call = None
        if self.state is SessionState.CLOSED:
            return
        self._cancel_disconnect()
        self._cancel_heartbeat()
        self.state = SessionState.CLOSED
        self._buffer = []
        self._buffered = 0
        self._notify_lost(code, reason)
        if self._on_closed is not None:
            self._on_closed(self)

    def _notify_lost(self, code: int, reason: str) -> None:
        if self._lost_notified:
            return
        self._lost_notified = True
        # Never re-entrantly: the app may be inside its own close() call, or
        # iterating over its sessions, when the session ends.
        self._clock.callLater(0, self._deliver_lost, code, reason)

    def _deliver_lost(self, code: int, reason: str) -> None:
        if self._handler is not None:
            self._call_handler("connection_lost", code, reason)


class SockJSConnection:
    """
    The app's handle on one session: send, close, and what the opening
    request said about the client.
    """

    def __init__(self, session: Session) -> None:
        self._session = session

    def send(self, message: str) -> bool:
        """Send one message; False if the session is no longer open."""
        return self._session.send_encoded(frames.quote(message))

    def send_encoded(self, encoded: bytes) -> bool:
        """
        Send one message already encoded as a JSON string literal.

        Encode once (``frames.quote`` or ``orjson.dumps(text)``) and pass the
        same bytes to every session: they are joined into frames as they are.
        """
        return self._session.send_encoded(encoded)

    def close(self, code: int = 3000, reason: str = "Go away!") -> None:
        """Close the session; ``connection_lost`` follows (not re-entrantly)."""
        self._session.close(code, reason)

    @property
    def _info(self) -> ConnectionInfo:
        info = self._session.info
        assert info is not None
        return info

    @property
    def prefix(self) -> tuple[bytes, ...]:
        """``request.prepath`` of the opening request: where the service is mounted."""
        return self._info.prefix

    @property
    def remote_address(self) -> IAddress | None:
        return self._info.remote_address

    @property
    def headers(self) -> Mapping[str, str]:
        """Selected headers of the opening request, lower-case names."""
        return self._info.headers

    @property
    def transport_name(self) -> str:
        """``websocket``, ``websocket-raw``, ``xhr-streaming``, ``xhr-polling``, ..."""
        return self._info.transport_name

    @property
    def writable(self) -> bool:
        """True while the session is open (``send`` will be delivered)."""
        return self._session.state is SessionState.OPEN

    @property
    def paused(self) -> bool:
        """True between ``pause_writing`` and ``resume_writing``."""
        return self._session.paused

    @property
    def buffered_bytes(self) -> int:
        return self._session.buffered_bytes

    def __repr__(self) -> str:
        info = self._session.info
        return "<SockJSConnection {} {}>".format(
            info.transport_name if info else "?", self._session.state.name
        )
