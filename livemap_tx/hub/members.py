"""
One connection's place in a map (`Member`), what a transport gives the hub
for it (`Subscriber`), and the encoded message every subscriber of a
broadcast shares (`Frame`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Protocol

from .. import wire
from .pins import Pin
from ..wire import BBox

if TYPE_CHECKING:
    from .cohorts import Cohort
    from . import MapState
    from .mapcore import ViewGroup


class MapFull(Exception):
    """A map (or the server) has as many members as it may have."""


class Frame:
    """
    One encoded server message, shared by every subscriber it goes to.

    `cache` lets each kind of transport frame the payload once (a prepared
    WebSocket message, a SockJS string) and reuse it for every subscriber.
    """

    __slots__ = ("payload", "cache")

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.cache: dict[object, object] = {}



class Subscriber(Protocol):
    """What a transport gives the hub for one connection."""

    def send_frame(self, frame: Frame) -> None: ...

    def close(self, code: int, reason: str) -> None: ...



class Member:
    """
    One connection's place in a map. Transports call these methods; the
    member's pin (if it has moved) is shared with everyone on the map.

    What a member has been sent is always one of: the map as of the last
    tick (it follows its view's updates), plus `pending` (pins it got ahead
    of the tick in a snapshot or catch-up); or, while paused, that state as
    of the pause plus `missed`/`missed_gone` (what changed since).
    """

    __slots__ = ("id", "map", "subscriber", "view", "pin", "name", "paused_at",
                 "paused_serial", "missed", "missed_gone", "resync", "pending",
                 "last_version", "active", "cohort", "zoom", "group")

    def __init__(self, member_id: str, map_state: MapState, subscriber: Subscriber) -> None:
        self.id = member_id
        self.map = map_state
        self.subscriber = subscriber
        self.view: Optional[BBox] = None
        # Set for a clustered view (extension "clusters"): the page's zoom.
        self.zoom: Optional[int] = None
        # The view group it is subscribed to (None in the world or paused).
        self.group: Optional[ViewGroup] = None
        self.pin: Optional[Pin] = None
        self.name: Optional[str] = None
        self.active = True
        # Flow control: set while the transport says its buffer is full.
        self.paused_at: Optional[float] = None
        # Pins made after this (Pin.born) were never sent to the member.
        self.paused_serial = 0
        # Ids of pins that changed while paused, and of pins it may have
        # known that left while paused: at most the map's pins now plus its
        # pins at the pause.
        self.missed: Optional[set[str]] = None
        self.missed_gone: Optional[set[str]] = None
        # It asked for a new view while paused: it gets a whole snapshot.
        self.resync = False
        # Pins sent to this member (snapshot, catch-up) in a state no tick
        # has sent yet: its view group's next update may not cover them.
        self.pending: Optional[set[str]] = None
        # The version of this member's last pin: a pin made again (after it
        # expired) goes on counting, so no node keeps an old state over it.
        self.last_version = 0
        # Its share of a big map's world subscribers, if the map has them.
        self.cohort: Optional[Cohort] = None

    def move(self, move: wire.Move) -> None:
        self.map.move(self, move)

    def hello(self, name: str) -> None:
        self.map.rename(self, name)

    def set_view(self, bbox: Optional[BBox], zoom: Optional[int] = None) -> None:
        self.map.set_view(self, bbox, zoom)

    def pause(self) -> None:
        """The transport's buffer is full: stop sending, remember what was missed."""
        self.map.pause(self)

    def resume(self) -> None:
        """The transport drained: send one catch-up update, then follow the ticks."""
        self.map.resume(self)

    def leave(self) -> None:
        self.map.leave(self)

    def send(self, payload: bytes) -> None:
        """
        A message for this member alone (an error, say). Dropped while the
        member is paused: nothing is written into a buffer known to be full.
        """
        if self.paused_at is not None or not self.active:
            self.map.hub.stats.dropped_while_paused += 1
            return
        self.map._send(self, payload)


