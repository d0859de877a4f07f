"""
A fake transport for hub tests that behaves like Twisted's: frames go into
a buffer while the client does not read, and the moment the buffer passes
its mark the transport pauses the member from inside the write, re-entrantly
(as `FileDescriptor.write` calls `pauseProducing`). It also plays the
client: it rebuilds the map from the messages it received alone, and checks
each message against the protocol as it arrives.
"""

from __future__ import annotations

import math
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
        # A clustered view's picture (extension "clusters"): cluster id ->
        # cluster, and the last `total`; None while the view is v1.
        self.clusters: Optional[dict[str, dict]] = None
        self.total: Optional[int] = None

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
            self._picture(message, {"type", "id", "pins"})
        elif kind == "snapshot":
            self._picture(message, {"type", "pins"})
        elif kind == "update":
            v1 = {"type", "pins", "gone"}
            if set(message) != (v1 if self.clusters is None else v1 | {"clusters", "total"}):
                raise ProtocolViolation(f"update keys {sorted(message)}")
            pins = self._unique(message["pins"])
            clusters = self._clusters(message.get("clusters", []))
            gone = message["gone"]
            if len(set(gone)) != len(gone):
                raise ProtocolViolation(f"gone names a pin twice: {gone}")
            both = (set(pins) | set(clusters)) & set(gone)
            if both:
                raise ProtocolViolation(f"update names {sorted(both)} in pins and gone")
            for pin_id in gone:
                self.pins.pop(pin_id, None)
                if self.clusters is not None:
                    self.clusters.pop(pin_id, None)
            self.pins.update(pins)
            if self.clusters is not None:
                self.clusters.update(clusters)
                self.total = message["total"]
        elif kind != "error":
            raise ProtocolViolation(f"unknown message {message}")

    def _picture(self, message: dict, v1: set[str]) -> None:
        """A welcome or snapshot: the whole picture, v1 or clustered."""
        if set(message) not in (v1, v1 | {"clusters", "total"}):
            raise ProtocolViolation(f"{message['type']} keys {sorted(message)}")
        self.pins = self._unique(message["pins"])
        if "clusters" in message:
            self.clusters = self._clusters(message["clusters"])
            self.total = message["total"]
        else:
            self.clusters = self.total = None

    def _clusters(self, clusters: list[dict]) -> dict[str, dict]:
        found: dict[str, dict] = {}
        for cluster in clusters:
            if set(cluster) != {"id", "lat", "lng", "count", "bbox"}:
                raise ProtocolViolation(f"cluster keys {sorted(cluster)}")
            if not cluster["id"].startswith("c:") or cluster["id"] in found:
                raise ProtocolViolation(f"cluster id {cluster['id']}")
            west, south, east, north = cluster["bbox"]
            if not (south <= cluster["lat"] <= north and west <= cluster["lng"] <= east):
                raise ProtocolViolation(f"cluster centre outside its pins' box: {cluster}")
            found[cluster["id"]] = cluster
        return found

    def _unique(self, pins: list[dict]) -> dict[str, dict]:
        found: dict[str, dict] = {}
        for pin in pins:
            if pin["id"].startswith("c:"):
                raise ProtocolViolation(f"pin id {pin['id']} looks like a cluster's")
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


# Clustered views, computed from scratch (extension "clusters")

_MAX_LAT = 85.0511287798066


def tile_of(lat: float, lng: float, level: int) -> tuple[int, int]:
    """A point's Web Mercator tile, written here apart from the server's."""
    n = 2 ** level
    x = min(max(int((lng + 180.0) / 360.0 * n), 0), n - 1)
    lat = max(-_MAX_LAT, min(_MAX_LAT, lat))
    y = int((1.0 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2.0 * n)
    return x, min(max(y, 0), n - 1)


def cell_size(level: int, y: int) -> tuple[float, float]:
    """A tile's width and height in degrees (the poles' rows reach the poles)."""
    n = 2 ** level

    def lat(row: int) -> float:
        if row <= 0:
            return 90.0
        if row >= n:
            return -90.0
        return math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * row / n))))
    return 360.0 / n, lat(y) - lat(y + 1)


def clustered_truth(pins: dict[str, dict], bbox: Optional[BBox], zoom: int,
                    limit: int) -> tuple[dict[str, dict], dict[str, tuple[int, list[dict]]]]:
    """
    What a view of `bbox` at `zoom` must show: the pins of its sparse cells,
    and per dense cell (more than `limit` pins) its cluster id with the
    count and pins. Its cells are the tiles of level min(zoom + 1, 23) that
    the box touches (the box widened to whole cells).
    """
    level = min(zoom + 1, 23)
    n = 2 ** level
    if bbox is None:
        west, south, east, north = -180.0, -90.0, 180.0, 90.0
    else:
        west, south, east, north = bbox
    x_lo, y_lo = tile_of(north, west, level)
    x_hi, y_hi = tile_of(south, east, level)
    wraps = west > east and x_lo > x_hi
    if west > east and not wraps:
        x_lo, x_hi = 0, n - 1

    def inside(x: int, y: int) -> bool:
        if not y_lo <= y <= y_hi:
            return False
        return (x >= x_lo or x <= x_hi) if wraps else x_lo <= x <= x_hi
    cells: dict[tuple[int, int], list[dict]] = {}
    for pin in pins.values():
        cell = tile_of(pin["lat"], pin["lng"], level)
        if inside(*cell):
            cells.setdefault(cell, []).append(pin)
    shown: dict[str, dict] = {}
    clusters: dict[str, tuple[int, list[dict]]] = {}
    for (x, y), members in cells.items():
        if zoom < 18 and len(members) > limit:
            clusters[f"c:{level}/{x}/{y}"] = (len(members), members)
        else:
            shown.update((pin["id"], pin) for pin in members)
    return shown, clusters


def check_clustered(viewer: Viewer, pins: dict[str, dict], bbox: Optional[BBox], zoom: int,
                    limit: int) -> None:
    """A settled clustered view matches the truth: its pins, its clusters' counts, the total."""
    shown, clusters = clustered_truth(pins, bbox, zoom, limit)
    assert viewer.clusters is not None, "a clustered view was sent no clusters"
    assert viewer.pins == shown, (bbox, zoom, viewer.pins, shown)
    assert set(viewer.clusters) == set(clusters), (bbox, zoom, viewer.clusters, clusters)
    for cluster_id, (count, members) in clusters.items():
        got = viewer.clusters[cluster_id]
        assert got["count"] == count, (cluster_id, got, count)
        level, _, y = (int(part) for part in cluster_id[2:].split("/"))
        width, height = cell_size(level, y)
        lat = sum(pin["lat"] for pin in members) / count
        lng = sum(pin["lng"] for pin in members) / count
        # Re-sent only when its centre moves more than 1/8 of its cell.
        assert abs(got["lat"] - lat) <= height / 8 + 1e-9, (got, lat)
        assert abs(got["lng"] - lng) <= width / 8 + 1e-9, (got, lng)
    assert viewer.total == len(pins), (viewer.total, len(pins))
