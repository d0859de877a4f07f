"""
One client connection, whatever its transport: size check, parsing, the
move rate limit and dispatch to the hub. WebSocket and SockJS adapters feed
it frames and give it a way to send and close; the rules live here once.
"""

from __future__ import annotations

from typing import Optional, Union

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from .. import wire
from ..hub import Hub, Member, Subscriber
from ..privacy import coarsen

DEFAULT_RATE = 10.0
# The flood allowance (docs/protocol.md, "Move rate"): a client is closed only
# when, over some stretch of L seconds, it sent more than rate * L moves plus
# this many seconds' worth of moves (and never fewer than FLOOD_MIN_MOVES).
FLOOD_SECONDS = 10.0
FLOOD_MIN_MOVES = 10.0


def flood_allowance(rate: float) -> float:
    """Moves a client may send beyond `rate` a second before it is closed."""
    return max(FLOOD_MIN_MOVES, FLOOD_SECONDS * rate)


class MoveLimiter:
    """
    Two separate things, so that an honest client is never closed:

    - pacing, a token bucket of `rate` moves a second (bursts up to
      `rate`): a move that finds no token is held (the client keeps only
      the newest) and applied once a token is free (`take`, `wait`); at
      most one warning a second;
    - flood detection, a leaky bucket that every arriving move fills by
      one (and only then: a held move applied later is the same move) and
      that drains at `rate` a second: over `flood_allowance(rate)`, CLOSE.
      That is exactly "more than rate * L + allowance moves in some
      stretch of L seconds", the rule docs/protocol.md gives clients.
    """

    ACCEPT, DROP, WARN, CLOSE = range(4)

    def __init__(self, clock: IReactorTime, rate: float) -> None:
        self.clock = clock
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.allowance = flood_allowance(rate)
        self.tokens = self.capacity
        self.updated = clock.seconds()
        self.level = 0.0
        self.last_warning = -1e18

    def _refill(self) -> float:
        now = self.clock.seconds()
        elapsed = now - self.updated
        self.tokens = min(self.capacity, self.tokens + elapsed * self.rate)
        self.level = max(0.0, self.level - elapsed * self.rate)
        self.updated = now
        return now

    def take(self) -> bool:
        """Use a pacing token if there is one (a held move; not an arrival)."""
        self._refill()
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def wait(self) -> float:
        """Seconds until a pacing token is free."""
        self._refill()
        return max(0.0, (1.0 - self.tokens) / self.rate) + 1e-6

    def check(self) -> int:
        """The verdict on a move that just arrived."""
        now = self._refill()
        self.level += 1.0
        if self.level > self.allowance:
            return self.CLOSE
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return self.ACCEPT
        if now - self.last_warning >= 1.0:
            self.last_warning = now
            return self.WARN
        return self.DROP


class Client:
    """The protocol state of one connection to one map."""

    log = Logger()

    def __init__(self, hub: Hub, map_name: str, transport: Subscriber, *,
                 rate: float = DEFAULT_RATE, precision: float = 0.0,
                 view: Optional[wire.View] = None) -> None:
        self.hub = hub
        self.transport = transport
        self.limiter = MoveLimiter(hub.clock, rate)
        # Metres positions are coarsened to: the server's, or the client's
        # own wish if coarser.
        self.server_precision = self.precision = precision
        self.closed = False
        # The newest move over the limit, applied once the bucket allows:
        # moves that queued up unread (while this connection was paused, or
        # in a network's buffer) arrive at once, and the last of them is
        # where the person is.
        self._held: Optional[wire.Move] = None
        self._held_call: Optional[IDelayedCall] = None
        self.member: Member = hub.join(map_name, transport, view)

    @property
    def id(self) -> str:
        return self.member.id

    def message_received(self, payload: Union[bytes, str], binary: bool = False) -> None:
        """Handle one client frame; bad input becomes an error frame."""
        if self.closed:
            return
        size = len(payload) if isinstance(payload, bytes) else len(payload.encode("utf-8"))
        if size > wire.MAX_MESSAGE_BYTES:
            self._reject(wire.TOO_BIG, f"message over {wire.MAX_MESSAGE_BYTES} bytes")
            self.close(wire.CLOSE_TOO_BIG, "message too big")
            return
        if binary:
            self._reject(wire.BAD_MESSAGE, "binary frames are not part of the protocol")
            return
        try:
            message = wire.parse(payload)
        except wire.ProtocolError as error:
            self._reject(error.code, error.message)
            return
        if isinstance(message, wire.Move):
            self._move(message)
        elif isinstance(message, wire.Hello):
            if message.precision is not None:
                self.precision = max(self.server_precision, message.precision)
            self.member.hello(message.name)
        else:
            self.member.set_view(message.bbox, message.zoom)

    def _move(self, move: wire.Move) -> None:
        verdict = self.limiter.check()
        if verdict == MoveLimiter.ACCEPT:
            self._held = None  # older than this one
            self._apply(move)
            return
        self.hub.stats.reject(wire.RATE_LIMITED)
        if verdict != MoveLimiter.CLOSE:
            self._held = move
            if self._held_call is None:
                self._held_call = self.hub.clock.callLater(
                    self.limiter.wait(), self._apply_held)
        if verdict == MoveLimiter.WARN:
            self._send_error(wire.RATE_LIMITED,
                             f"more than {self.limiter.rate:g} moves a second; excess dropped "
                             "(the newest is applied when the rate allows)")
        elif verdict == MoveLimiter.CLOSE:
            self._send_error(wire.RATE_LIMITED, "flood: far more moves than the rate allows")
            self.close(wire.CLOSE_POLICY, "rate limit exceeded")

    def _apply(self, move: wire.Move) -> None:
        if self.precision > 0:
            move = self._coarsened(move)
        self.member.move(move)

    def _apply_held(self) -> None:
        self._held_call = None
        if self._held is None or self.closed:
            return
        if self.limiter.take():
            move, self._held = self._held, None
            self._apply(move)
        else:
            self._held_call = self.hub.clock.callLater(self.limiter.wait(), self._apply_held)

    def _coarsened(self, move: wire.Move) -> wire.Move:
        lat, lng = coarsen(move.lat, move.lng, self.precision)
        accuracy = self.precision if move.accuracy is None else max(move.accuracy, self.precision)
        return wire.Move(lat, lng, move.heading, accuracy, move.seq)

    def _reject(self, code: str, message: str) -> None:
        self.hub.stats.reject(code)
        self._send_error(code, message)

    def _send_error(self, code: str, message: str) -> None:
        self.member.send(wire.encode_error(code, message))

    def close(self, code: int, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self._forget_held()
            self.transport.close(code, reason)

    def _forget_held(self) -> None:
        self._held = None
        if self._held_call is not None and self._held_call.active():
            self._held_call.cancel()
        self._held_call = None

    def pause(self) -> None:
        self.member.pause()

    def resume(self) -> None:
        self.member.resume()

    def connection_lost(self) -> None:
        self.closed = True
        self._forget_held()
        self.member.leave()
