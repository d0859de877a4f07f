"""
The hub: every map's pins and subscribers, and the fan-out tick.

Accepting a move only records the pin's latest state and marks it dirty.
A tick per map (scheduled only while something is dirty) turns the dirty
pins into one update per distinct view, encodes it once and hands the same
bytes to every subscriber of that view. A subscriber whose transport is
congested is skipped and remembers which pins it missed; when it drains it
gets one catch-up update with their latest states.

The hub knows nothing of WebSocket, SockJS or Redis: transports give it a
`Subscriber` and call the methods of the `Member` they get back.
"""

from __future__ import annotations

import math
import secrets
from typing import Callable, Iterable, Iterator, Optional, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from . import wire
from .wire import BBox, in_bbox

# Grid cell size, in degrees, of the spatial indexes of pins and views.
CELL_DEGREES = 10.0
_COLUMNS = int(360 / CELL_DEGREES)
_ROWS = int(180 / CELL_DEGREES)


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


class Stats:
    """Plain counters; metrics read them when scraped, so counting is cheap."""

    def __init__(self) -> None:
        self.connections_opened = 0
        self.connections_closed = 0
        self.moves_accepted = 0
        self.rejected: dict[str, int] = {}
        self.frames_sent = 0
        self.bytes_sent = 0
        self.ticks = 0
        self.slow_skips = 0
        self.slow_closes = 0

    def reject(self, code: str) -> None:
        self.rejected[code] = self.rejected.get(code, 0) + 1


class Pin:
    """The latest accepted state of one connection's position."""

    __slots__ = ("id", "lat", "lng", "heading", "accuracy", "name", "seq", "ts",
                 "origin", "version", "sent_lat", "sent_lng", "cell", "_json")

    def __init__(self, pin_id: str) -> None:
        self.id = pin_id
        self.lat = 0.0
        self.lng = 0.0
        self.heading: Optional[float] = None
        self.accuracy: Optional[float] = None
        self.name: Optional[str] = None
        self.seq: Optional[int] = None
        self.ts = 0
        # None for a pin of this process; else the node that owns it.
        self.origin: Optional[str] = None
        # Counts the owner's changes, so a stale remote state never wins.
        self.version = 0
        # Position as of the last tick, to tell which views it has left.
        self.sent_lat: Optional[float] = None
        self.sent_lng: Optional[float] = None
        self.cell: Optional[tuple[int, int]] = None
        self._json: Optional[bytes] = None

    def json(self) -> bytes:
        """The pin's encoding, made at most once per accepted state."""
        if self._json is None:
            self._json = wire.pin_json(self.id, self.lat, self.lng, self.heading,
                                       self.accuracy, self.name, self.seq, self.ts)
        return self._json

    def as_dict(self) -> dict:
        return {"id": self.id, "lat": self.lat, "lng": self.lng,
                "heading": self.heading, "accuracy": self.accuracy,
                "name": self.name, "seq": self.seq, "ts": self.ts}


def _cell(lat: float, lng: float) -> tuple[int, int]:
    col = min(int((lng + 180.0) // CELL_DEGREES), _COLUMNS - 1)
    row = min(int((lat + 90.0) // CELL_DEGREES), _ROWS - 1)
    return col, row


def _bbox_cells(bbox: BBox) -> Iterator[tuple[int, int]]:
    west, south, east, north = bbox
    row_lo, row_hi = _cell(south, 0.0)[1], _cell(north, 0.0)[1]
    col_lo, col_hi = _cell(0.0, west)[0], _cell(0.0, east)[0]
    cols: Iterable[int]
    if west <= east:
        cols = range(col_lo, col_hi + 1)
    else:
        cols = [*range(col_lo, _COLUMNS), *range(0, col_hi + 1)]
    for col in cols:
        for row in range(row_lo, row_hi + 1):
            yield col, row


class ViewGroup:
    """Subscribers that watch the same box: one encoded update serves them all."""

    __slots__ = ("bbox", "members", "pins", "gone")

    def __init__(self, bbox: BBox) -> None:
        self.bbox = bbox
        self.members: set[Member] = set()
        # Scratch space of one tick.
        self.pins: list[bytes] = []
        self.gone: list[str] = []


class Member:
    """
    One connection's place in a map. Transports call these methods; the
    member's pin (if it has moved) is shared with everyone on the map.
    """

    __slots__ = ("id", "map", "subscriber", "view", "pin", "name", "paused_at",
                 "missed", "last_version")

    def __init__(self, member_id: str, map_state: MapState, subscriber: Subscriber) -> None:
        self.id = member_id
        self.map = map_state
        self.subscriber = subscriber
        self.view: Optional[BBox] = None
        self.pin: Optional[Pin] = None
        self.name: Optional[str] = None
        self.paused_at: Optional[float] = None
        self.missed: set[str] = set()
        # The version of this member's last pin: a pin made again (after it
        # expired) goes on counting, so no node keeps an old state over it.
        self.last_version = 0

    def move(self, move: wire.Move) -> None:
        self.map.move(self, move)

    def hello(self, name: str) -> None:
        self.map.rename(self, name)

    def set_view(self, bbox: Optional[BBox]) -> None:
        self.map.set_view(self, bbox)

    def pause(self) -> None:
        """The transport's buffer is full: stop sending, remember what was missed."""
        self.map.pause(self)

    def resume(self) -> None:
        """The transport drained: send one catch-up update, then follow the ticks."""
        self.map.resume(self)

    def leave(self) -> None:
        self.map.leave(self)

    def send(self, payload: bytes) -> None:
        """A message for this member alone (an error, say), counted like the rest."""
        self.map._send(self, payload)


class MapState:
    """The pins and subscribers of one map."""

    log = Logger()

    def __init__(self, hub: Hub, name: str) -> None:
        self.hub = hub
        self.name = name
        self.pins: dict[str, Pin] = {}
        self.members: dict[str, Member] = {}
        self.dirty: set[str] = set()
        # Pins removed since the last tick (they know where they were last sent).
        self.gone: list[Pin] = []
        self.world: set[Member] = set()
        self.groups: dict[BBox, ViewGroup] = {}
        self.view_cells: dict[tuple[int, int], set[ViewGroup]] = {}
        self.pin_cells: dict[tuple[int, int], set[str]] = {}
        self.slow: set[Member] = set()
        self.tick_call: Optional[IDelayedCall] = None
        self.last_tick = -math.inf

    # Membership

    def join(self, subscriber: Subscriber) -> Member:
        if len(self.members) >= self.hub.max_members:
            raise MapFull("map full")
        member = Member(self.hub.new_id(), self, subscriber)
        self.members[member.id] = member
        self.world.add(member)
        self.hub.stats.connections_opened += 1
        self._send(member, wire.encode_welcome(
            member.id, [pin.json() for pin in self.pins.values()]))
        return member

    def leave(self, member: Member) -> None:
        if self.members.pop(member.id, None) is None:
            return
        self.hub.stats.connections_closed += 1
        self._unsubscribe(member)
        self.slow.discard(member)
        pin = member.pin
        if pin is not None:
            member.pin = None
            self.remove_pin(pin)
        self._forget_if_empty()

    def remove_pin(self, pin: Pin) -> None:
        del self.pins[pin.id]
        self.dirty.discard(pin.id)
        self._unindex_pin(pin)
        self.gone.append(pin)
        self._schedule()

    def _forget_if_empty(self) -> None:
        if not self.members and not self.pins:
            self.hub.forget(self)

    def apply_remote(self, origin: str, states: Iterable[dict], gone: Iterable[str]) -> None:
        """States and departures of pins owned by another node."""
        pins = self.pins
        for state in states:
            pin = pins.get(state["id"])
            if pin is None:
                pin = pins[state["id"]] = Pin(state["id"])
                pin.origin = origin
                pin.version = -1
            elif pin.origin != origin or state["version"] <= pin.version:
                continue
            pin.version = state["version"]
            pin.lat, pin.lng = state["lat"], state["lng"]
            pin.heading, pin.accuracy = state["heading"], state["accuracy"]
            pin.name, pin.seq, pin.ts = state["name"], state["seq"], state["ts"]
            pin._json = None
            self._index_pin(pin)
            self._mark(pin)
        for pin_id in gone:
            pin = pins.get(pin_id)
            if pin is not None and pin.origin == origin:
                self.remove_pin(pin)
        self._forget_if_empty()

    def expire_pins(self, older_than_ms: int) -> int:
        """Remove this node's pins whose last fix is older than a bound."""
        expired = [pin for pin in self.pins.values()
                   if pin.origin is None and pin.ts < older_than_ms]
        for pin in expired:
            member = self.members.get(pin.id)
            if member is not None:
                member.pin = None
                member.last_version = pin.version
            self.remove_pin(pin)
        self._forget_if_empty()
        return len(expired)

    def drop_origin(self, origin: str) -> int:
        """Remove every pin of a node that is gone; returns how many."""
        dropped = [pin for pin in self.pins.values() if pin.origin == origin]
        for pin in dropped:
            self.remove_pin(pin)
        self._forget_if_empty()
        return len(dropped)

    # Client messages

    def move(self, member: Member, move: wire.Move) -> None:
        pin = member.pin
        if pin is None:
            pin = member.pin = Pin(member.id)
            pin.name = member.name
            pin.version = member.last_version
            self.pins[pin.id] = pin
        pin.lat, pin.lng = move.lat, move.lng
        pin.heading, pin.accuracy, pin.seq = move.heading, move.accuracy, move.seq
        pin.ts = int(self.hub.clock.seconds() * 1000)
        pin.version += 1
        pin._json = None
        self._index_pin(pin)
        self.hub.stats.moves_accepted += 1
        self._mark(pin)

    def rename(self, member: Member, name: str) -> None:
        member.name = name
        pin = member.pin
        if pin is not None and pin.name != name:
            pin.name = name
            pin.version += 1
            pin._json = None
            self._mark(pin)

    def set_view(self, member: Member, bbox: Optional[BBox]) -> None:
        paused = member.paused_at is not None
        if not paused:
            self._unsubscribe(member)
        member.view = bbox
        if not paused:
            self._subscribe(member)
        self._send(member, wire.encode_snapshot(self.pins_in(bbox)))

    def pins_in(self, bbox: Optional[BBox]) -> list[bytes]:
        """The encoded pins inside a box, through the grid rather than every pin."""
        if bbox is None:
            return [pin.json() for pin in self.pins.values()]
        found = []
        for cell in _bbox_cells(bbox):
            for pin_id in self.pin_cells.get(cell, ()):
                pin = self.pins[pin_id]
                if in_bbox(bbox, pin.lat, pin.lng):
                    found.append(pin.json())
        return found

    # Flow control

    def pause(self, member: Member) -> None:
        if member.paused_at is not None or member.id not in self.members:
            return
        self._unsubscribe(member)
        member.paused_at = self.hub.clock.seconds()
        member.missed = set()
        self.slow.add(member)

    def resume(self, member: Member) -> None:
        if member.paused_at is None or member.id not in self.members:
            return
        member.paused_at = None
        self.slow.discard(member)
        missed, member.missed = member.missed, set()
        if missed:
            pins, gone = [], []
            for pin_id in missed:
                pin = self.pins.get(pin_id)
                if pin is not None and (member.view is None or
                                        in_bbox(member.view, pin.lat, pin.lng)):
                    pins.append(pin.json())
                else:
                    gone.append(pin_id)
            self._send(member, wire.encode_update(pins, gone))
        self._subscribe(member)

    # The tick

    def _mark(self, pin: Pin) -> None:
        self.dirty.add(pin.id)
        self._schedule()

    def _schedule(self) -> None:
        if self.tick_call is None:
            clock = self.hub.clock
            delay = max(0.0, self.last_tick + self.hub.tick_interval - clock.seconds())
            self.tick_call = clock.callLater(delay, self.tick)

    def tick(self) -> None:
        """Send what changed since the last tick, once per distinct view."""
        self.tick_call = None
        clock = self.hub.clock
        started = clock.seconds()
        self.last_tick = started
        stats = self.hub.stats
        stats.ticks += 1
        pins = self.pins
        changed = [pins[pin_id] for pin_id in self.dirty]
        gone = self.gone
        self.dirty = set()
        self.gone = []
        if self.world:
            self._broadcast(self.world, wire.encode_update(
                [pin.json() for pin in changed], [pin.id for pin in gone]))
        if self.groups:
            self._fan_out_views(changed, gone)
        if self.slow:
            self._note_missed(changed, gone, started)
        publisher = self.hub.publisher
        if publisher is not None:
            local = [pin for pin in changed if pin.origin is None]
            local_gone = [pin.id for pin in gone if pin.origin is None]
            if local or local_gone:
                publisher(self.name, local, local_gone)
        for pin in changed:
            pin.sent_lat, pin.sent_lng = pin.lat, pin.lng
        self.hub.tick_observer(clock.seconds() - started)

    def _fan_out_views(self, changed: list[Pin],
                       gone: list[Pin]) -> None:
        touched: set[ViewGroup] = set()
        cells = self.view_cells
        for pin in changed:
            groups = cells.get(_cell(pin.lat, pin.lng), set())
            if pin.sent_lat is not None and pin.sent_lng is not None:
                before = cells.get(_cell(pin.sent_lat, pin.sent_lng))
                if before and before is not groups:
                    groups = groups | before
            for group in groups:
                if in_bbox(group.bbox, pin.lat, pin.lng):
                    group.pins.append(pin.json())
                elif pin.sent_lat is not None and in_bbox(
                        group.bbox, pin.sent_lat, pin.sent_lng):  # type: ignore[arg-type]
                    group.gone.append(pin.id)
                else:
                    continue
                touched.add(group)
        for pin in gone:
            lat, lng = pin.sent_lat, pin.sent_lng
            if lat is None or lng is None:
                continue
            for group in cells.get(_cell(lat, lng), ()):
                if in_bbox(group.bbox, lat, lng):
                    group.gone.append(pin.id)
                    touched.add(group)
        for group in touched:
            self._broadcast(group.members, wire.encode_update(group.pins, group.gone))
            group.pins = []
            group.gone = []

    def _note_missed(self, changed: list[Pin],
                     gone: list[Pin],
                     now: float) -> None:
        ids = [pin.id for pin in changed]
        ids.extend(pin.id for pin in gone)
        stats = self.hub.stats
        timeout = self.hub.slow_timeout
        limit = self.hub.max_missed
        for member in list(self.slow):
            member.missed.update(ids)
            stats.slow_skips += 1
            assert member.paused_at is not None
            if now - member.paused_at >= timeout or len(member.missed) > limit:
                self.slow.discard(member)
                stats.slow_closes += 1
                self.log.info("closing slow client {member} on map {map}",
                              member=member.id, map=self.name)
                member.subscriber.close(wire.CLOSE_POLICY, "too slow: not reading")

    def _broadcast(self, members: Iterable[Member], payload: bytes) -> None:
        frame = Frame(payload)
        count = 0
        for member in members:
            member.subscriber.send_frame(frame)
            count += 1
        stats = self.hub.stats
        stats.frames_sent += count
        stats.bytes_sent += count * len(payload)

    def _send(self, member: Member, payload: bytes) -> None:
        stats = self.hub.stats
        stats.frames_sent += 1
        stats.bytes_sent += len(payload)
        member.subscriber.send_frame(Frame(payload))

    # Indexes

    def _subscribe(self, member: Member) -> None:
        bbox = member.view
        if bbox is None:
            self.world.add(member)
            return
        group = self.groups.get(bbox)
        if group is None:
            group = self.groups[bbox] = ViewGroup(bbox)
            for cell in _bbox_cells(bbox):
                self.view_cells.setdefault(cell, set()).add(group)
        group.members.add(member)

    def _unsubscribe(self, member: Member) -> None:
        bbox = member.view
        if bbox is None:
            self.world.discard(member)
            return
        group = self.groups.get(bbox)
        if group is None:
            return
        group.members.discard(member)
        if not group.members:
            del self.groups[bbox]
            for cell in _bbox_cells(bbox):
                cell_groups = self.view_cells[cell]
                cell_groups.discard(group)
                if not cell_groups:
                    del self.view_cells[cell]

    def _index_pin(self, pin: Pin) -> None:
        cell = _cell(pin.lat, pin.lng)
        if cell != pin.cell:
            self._unindex_pin(pin)
            pin.cell = cell
            self.pin_cells.setdefault(cell, set()).add(pin.id)

    def _unindex_pin(self, pin: Pin) -> None:
        if pin.cell is not None:
            ids = self.pin_cells[pin.cell]
            ids.discard(pin.id)
            if not ids:
                del self.pin_cells[pin.cell]
            pin.cell = None


class Hub:
    """All maps of this process."""

    log = Logger()

    def __init__(self, clock: IReactorTime, *, tick_interval: float = 0.1,
                 slow_timeout: float = 30.0, max_missed: int = 20_000,
                 max_members: int = 50_000, max_maps: int = 10_000,
                 tick_observer: Callable[[float], None] = lambda seconds: None,
                 new_id: Callable[[], str] = lambda: secrets.token_urlsafe(12)) -> None:
        self.clock = clock
        self.tick_interval = tick_interval
        self.slow_timeout = slow_timeout
        self.max_missed = max_missed
        self.max_members = max_members
        self.max_maps = max_maps
        self.tick_observer = tick_observer
        self.new_id = new_id
        # Set by a backplane: called once per map tick with this node's
        # changed pins and departed pin ids, to share them with other nodes.
        self.publisher: Optional[Callable[[str, list[Pin], list[str]], None]] = None
        self.maps: dict[str, MapState] = {}
        self.stats = Stats()

    def map(self, map_name: str, *, limited: bool = True) -> MapState:
        """The state of a map, made on demand (up to `max_maps` if `limited`)."""
        map_state = self.maps.get(map_name)
        if map_state is None:
            if limited and len(self.maps) >= self.max_maps:
                raise MapFull("too many maps")
            map_state = self.maps[map_name] = MapState(self, map_name)
        return map_state

    def can_join(self, map_name: str) -> bool:
        """Whether a new connection to this map would be admitted now."""
        map_state = self.maps.get(map_name)
        if map_state is None:
            return len(self.maps) < self.max_maps
        return len(map_state.members) < self.max_members

    def close_map(self, map_name: str, code: int, reason: str) -> None:
        """Close every connection of a map (it expired, say)."""
        map_state = self.maps.get(map_name)
        if map_state is not None:
            for member in list(map_state.members.values()):
                member.subscriber.close(code, reason)

    def expire_pins(self, max_age: float) -> int:
        """Remove pins whose last fix is older than `max_age` seconds."""
        bound = int((self.clock.seconds() - max_age) * 1000)
        return sum(m.expire_pins(bound) for m in list(self.maps.values()))

    def join(self, map_name: str, subscriber: Subscriber) -> Member:
        """Add a connection to a map; it is sent its welcome at once."""
        return self.map(map_name).join(subscriber)

    def apply_remote(self, map_name: str, origin: str, states: Iterable[dict],
                     gone: Iterable[str] = ()) -> None:
        """
        Pins owned by node `origin`: each state is a dict with the PIN keys
        plus `version`; older versions than the one held are ignored.
        """
        # Not limited: another node admitted these pins, and dropping them
        # here would leave this node's clients with a different map.
        self.map(map_name, limited=False).apply_remote(origin, states, gone)

    def drop_origin(self, origin: str) -> int:
        """A node died or was cut off: its pins leave every map."""
        return sum(m.drop_origin(origin) for m in list(self.maps.values()))

    def local_pins(self) -> Iterator[tuple[str, Pin]]:
        """This node's own pins, to publish again after a reconnect."""
        for map_state in self.maps.values():
            for pin in map_state.pins.values():
                if pin.origin is None:
                    yield map_state.name, pin

    def forget(self, map_state: MapState) -> None:
        """An empty map costs nothing: drop it (it is made again on demand)."""
        if self.maps.get(map_state.name) is map_state:
            if map_state.tick_call is not None and map_state.tick_call.active():
                map_state.tick_call.cancel()
            del self.maps[map_state.name]

    def pins(self, map_name: str) -> list[dict]:
        map_state = self.maps.get(map_name)
        if map_state is None:
            return []
        return [pin.as_dict() for pin in map_state.pins.values()]

    def members(self) -> Iterator[Member]:
        for map_state in list(self.maps.values()):
            yield from list(map_state.members.values())

    def connection_count(self) -> int:
        return sum(len(m.members) for m in self.maps.values())
