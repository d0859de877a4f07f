"""
A pin: the latest accepted state of one person's position on a map, and
its JSON, encoded at most once per state (every update joins these
fragments rather than encoding pins again).
"""

from __future__ import annotations

from typing import Optional

from .. import wire


# The origin of the pins fed by phone apps: they belong to a device, not to
# a node, so no node's loss takes them (no node id can contain "~").
DEVICES = "~devices"


class Pin:
    """The latest accepted state of one connection's position."""

    __slots__ = ("id", "lat", "lng", "heading", "accuracy", "name", "seq", "ts",
                 "source", "battery", "origin", "version", "sent_lat", "sent_lng", "cell",
                 "born", "tile", "sent_tile", "_json")

    def __init__(self, pin_id: str) -> None:
        self.id = pin_id
        self.lat = 0.0
        self.lng = 0.0
        self.heading: Optional[float] = None
        self.accuracy: Optional[float] = None
        self.name: Optional[str] = None
        self.seq: Optional[int] = None
        self.ts = 0
        # A phone app's pin: which app, and its battery (0-100) if known.
        self.source: Optional[str] = None
        self.battery: Optional[int] = None
        # None for a pin of this process; DEVICES for a phone app's pin
        # (it belongs to no node); else the node that owns it.
        self.origin: Optional[str] = None
        # Counts the owner's changes, so a stale remote state never wins.
        self.version = 0
        # Position as of the last tick, to tell which views it has left.
        self.sent_lat: Optional[float] = None
        self.sent_lng: Optional[float] = None
        # Its cell in the map's PinGrid.
        self.cell: Optional[int] = None
        # The hub's serial when it was made (see Member.paused_serial).
        self.born = 0
        # Its Web Mercator tile at level 23 (clusters.tile), once placed.
        self.tile: Optional[tuple[int, int]] = None
        self.sent_tile: Optional[tuple[int, int]] = None
        self._json: Optional[bytes] = None

    def json(self) -> bytes:
        """The pin's encoding, made at most once per accepted state."""
        if self._json is None:
            self._json = wire.pin_json(self.id, self.lat, self.lng, self.heading,
                                       self.accuracy, self.name, self.seq, self.ts,
                                       self.source, self.battery)
        return self._json

    def as_dict(self) -> dict:
        pin = {"id": self.id, "lat": self.lat, "lng": self.lng,
               "heading": self.heading, "accuracy": self.accuracy,
               "name": self.name, "seq": self.seq, "ts": self.ts}
        if self.source is not None:
            pin["source"] = self.source
            if self.battery is not None:
                pin["battery"] = self.battery
        return pin

