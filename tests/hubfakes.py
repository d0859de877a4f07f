"""
A fake transport for hub tests that behaves like Twisted's: frames go into
a buffer while the client does not read, and the moment the buffer passes
its mark the transport pauses the member from inside the write, re-entrantly
(as `FileDescriptor.write` calls `pauseProducing`). It also plays the
client: it rebuilds the map from the messages it received alone, and checks
each message against the protocol as it arrives.
"""

from __future__ import annotations

from typing import Any, Optional

import orjson

from livemap_tx.hub import Frame, Hub, Member
from livemap_tx.wire import BBox, in_bbox


class ProtocolViolation(AssertionError):
    pass


class Viewer:
    """One connection as the hub sees it (a Subscriber), and as its client sees it."""

    def __init__(self, high_water: int = 64 * 1024) -> None:
        self.member: Optional[Member] = None
        self.high_water = high_water
        self.reading = True
        self.buffered = 0
        # Set while the transport has paused the member (its producer).
        self.paused = False
        self.closed: Optional[tuple[int, str]] = None
        self.messages: list[dict] = []
        # The client's own picture: pin id -> pin, from messages alone.
        self.pins: dict[str, dict] = {}
        self.id: Optional[str] = None
        self.view: Optional[BBox] = None
        self._seqs: dict[str, Any] = {}

    # Subscriber

    def send_frame(self, frame: Frame) -> None:
        if self.paused:
            raise ProtocolViolation(f"{self.id}: written to while paused")
        if self.closed is not None:
            return
        message = orjson.loads(frame.payload)
        self._receive(message)
        if not self.reading:
            self.buffered += len(frame.payload)
            if self.buffered > self.high_water and not self.paused:
                self.paused = True
                if self.member is not None:
                    self.member.pause()  # from inside the write, as Twisted does

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    # What the network does

    def stall(self) -> None:
        """The client stops reading: what is written from now on waits in the buffer."""
        self.reading = False

    def drain(self) -> None:
        """The client reads everything; the transport resumes the member."""
        self.reading = True
        self.buffered = 0
        if self.paused:
            self.paused = False
            if self.member is not None:
                self.member.resume()

    # The client

    def take(self) -> list[dict]:
        messages, self.messages = self.messages, []
        return messages

    def _receive(self, message: dict) -> None:
        kind = message.get("type")
        if not self.messages and self.id is None and kind != "welcome":
            raise ProtocolViolation(f"first message is {kind}, not welcome")
        self.messages.append(message)
        if kind == "welcome":
            if self.id is not None:
                raise ProtocolViolation("a second welcome")
            self.id = message["id"]
            self.pins = self._unique(message["pins"])
        elif kind == "snapshot":
            self.pins = self._unique(message["pins"])
        elif kind == "update":
            if set(message) != {"type", "pins", "gone"}:
                raise ProtocolViolation(f"update keys {sorted(message)}")
            pins = self._unique(message["pins"])
            gone = message["gone"]
            if len(set(gone)) != len(gone):
                raise ProtocolViolation(f"gone names a pin twice: {gone}")
            both = set(pins) & set(gone)
            if both:
                raise ProtocolViolation(f"update names {sorted(both)} in pins and gone")
            for pin_id in gone:
                self.pins.pop(pin_id, None)
            self.pins.update(pins)
        elif kind != "error":
            raise ProtocolViolation(f"unknown message {message}")

    def _unique(self, pins: list[dict]) -> dict[str, dict]:
        found: dict[str, dict] = {}
        for pin in pins:
            if pin["id"] in found:
                raise ProtocolViolation(f"pin {pin['id']} twice in one message")
            found[pin["id"]] = pin
            self._check_order(pin)
        return found

    def _check_order(self, pin: dict) -> None:
        # Tests give every move a larger seq than any before it: a pin's
        # states must never go back.
        seq = pin.get("seq")
        before = self._seqs.get(pin["id"])
        if seq is not None and before is not None and seq < before:
            raise ProtocolViolation(f"pin {pin['id']} went back from seq {before} to {seq}")
        if seq is not None:
            self._seqs[pin["id"]] = seq

    def sees(self) -> dict[str, dict]:
        """The pins this client shows, inside its view."""
        return dict(self.pins)


def join(hub: Hub, map_name: str = "m", high_water: int = 64 * 1024) -> tuple[Member, Viewer]:
    """
    A member on `map_name` with a Viewer transport. Like the real transports,
    a pause that came during the welcome (before the member existed) is
    passed on as soon as it does.
    """
    viewer = Viewer(high_water)
    member = hub.join(map_name, viewer)
    viewer.member = member
    if viewer.paused:
        member.pause()
    return member, viewer


def truth_in(pins: dict[str, dict], bbox: Optional[BBox]) -> dict[str, dict]:
    """The part of a map's true pins a view of `bbox` must show."""
    if bbox is None:
        return dict(pins)
    return {pin_id: pin for pin_id, pin in pins.items()
            if in_bbox(bbox, pin["lat"], pin["lng"])}
