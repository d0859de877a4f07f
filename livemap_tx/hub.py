"""
The hub: every map's pins and subscribers, and the fan-out tick.

Accepting a move only records the pin's latest state and marks it dirty.
A tick per map (scheduled only while something is dirty) turns the dirty
pins into one update per distinct view, encodes it once and hands the same
bytes to every subscriber of that view. A subscriber whose transport is
congested is skipped and remembers which pins it missed; when it drains it
gets one catch-up update with their latest states. A big map ticks a little
less often and sends to its whole-world subscribers in cohorts that tick in
turn (`MapState.interval`, `MapState._fit_cohorts`): fewer frames per pin
state, and no client waits for a whole ten-thousand-client broadcast.

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
from .privacy import map_label as log_name
from .wire import BBox, in_bbox

# Grid cell size, in degrees, of the spatial indexes of pins and views.
CELL_DEGREES = 10.0
_COLUMNS = int(360 / CELL_DEGREES)
_ROWS = int(180 / CELL_DEGREES)


# The origin of the pins fed by phone apps: they belong to a device, not to
# a node, so no node's loss takes them (no node id can contain "~").
DEVICES = "~devices"


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


class MapWatcher(Protocol):
    """What the hub tells a backplane about the maps it serves."""

    def map_in_use(self, map_name: str) -> None: ...

    def map_out_of_use(self, map_name: str) -> None: ...


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
        # Messages for one member (errors) not written because it was paused.
        self.dropped_while_paused = 0

    def reject(self, code: str) -> None:
        self.rejected[code] = self.rejected.get(code, 0) + 1


class Pin:
    """The latest accepted state of one connection's position."""

    __slots__ = ("id", "lat", "lng", "heading", "accuracy", "name", "seq", "ts",
                 "source", "battery", "origin", "version", "sent_lat", "sent_lng", "cell",
                 "born", "_json")

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
        self.cell: Optional[tuple[int, int]] = None
        # The hub's serial when it was made (see Member.paused_serial).
        self.born = 0
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


class Cohort:
    """
    A share of a big map's whole-world subscribers, with its own tick: the
    cohorts of a map tick in turn, so each subscriber waits for its own
    share's send rather than for the whole map's (see MapState._cohorts).
    """

    __slots__ = ("members", "dirty", "gone", "tick_call", "last_tick", "phase", "alive")

    def __init__(self, phase: float) -> None:
        self.members: set[Member] = set()
        self.dirty: set[str] = set()
        self.gone: dict[str, Pin] = {}
        self.tick_call: Optional[IDelayedCall] = None
        # The slot of its last tick (scheduled time).
        self.last_tick = -math.inf
        # Its ticks fall at this offset within the cohorts' interval.
        self.phase = phase
        self.alive = True


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
                 "last_version", "active", "cohort")

    def __init__(self, member_id: str, map_state: MapState, subscriber: Subscriber) -> None:
        self.id = member_id
        self.map = map_state
        self.subscriber = subscriber
        self.view: Optional[BBox] = None
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
        """
        A message for this member alone (an error, say). Dropped while the
        member is paused: nothing is written into a buffer known to be full.
        """
        if self.paused_at is not None or not self.active:
            self.map.hub.stats.dropped_while_paused += 1
            return
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
        # Pins removed since the last tick, by id (the first one removed:
        # it knows where the id was last sent).
        self.gone: dict[str, Pin] = {}
        self.world: set[Member] = set()
        self.groups: dict[BBox, ViewGroup] = {}
        self.view_cells: dict[tuple[int, int], set[ViewGroup]] = {}
        self.pin_cells: dict[tuple[int, int], set[str]] = {}
        self.slow: set[Member] = set()
        # Pins of phone apps on this map (they count toward its places).
        self.device_pins = 0
        # A big map's world subscribers, in shares that tick in turn.
        self.cohorts: Optional[list[Cohort]] = None
        # Set while cohorts are made or merged (a send may pause a member,
        # which would refit them from inside).
        self._refitting = False
        # Members whose `pending` the next tick must check.
        self.pending_members: set[Member] = set()
        self.tick_call: Optional[IDelayedCall] = None
        self.last_tick = -math.inf

    # Membership

    def join(self, subscriber: Subscriber) -> Member:
        if len(self.members) + self.device_pins >= self.hub.max_members:
            raise MapFull("map full")
        member = Member(self.hub.new_id(), self, subscriber)
        self.members[member.id] = member
        self.hub.stats.connections_opened += 1
        if len(self.members) == 1 and self.hub.watcher is not None:
            self.hub.watcher.map_in_use(self.name)
        # The current pins: the world's next update covers whatever of them
        # no tick has sent yet.
        self._send(member, wire.encode_welcome(
            member.id, [pin.json() for pin in self.pins.values()]))
        # Subscribed after its welcome (nothing may come before it), unless
        # the welcome filled its buffer and its transport paused it.
        if member.paused_at is None and member.active:
            self._subscribe(member)
        return member

    def leave(self, member: Member) -> None:
        if self.members.pop(member.id, None) is None:
            return
        member.active = False
        self.hub.stats.connections_closed += 1
        self._unsubscribe(member)
        self.slow.discard(member)
        self.pending_members.discard(member)
        member.pending = None
        pin = member.pin
        if pin is not None:
            member.pin = None
            self.remove_pin(pin)
        if not self.members and self.hub.watcher is not None:
            self.hub.watcher.map_out_of_use(self.name)
        self._forget_if_empty()

    def new_pin(self, pin_id: str) -> Pin:
        """A pin that no member has been sent yet (see `pause`)."""
        pin = Pin(pin_id)
        pin.born = self.hub.next_serial()
        return pin

    def remove_pin(self, pin: Pin) -> None:
        del self.pins[pin.id]
        if pin.origin == DEVICES:
            self.device_pins -= 1
        self.dirty.discard(pin.id)
        self._unindex_pin(pin)
        self.gone.setdefault(pin.id, pin)
        if self.cohorts is not None:
            for cohort in self.cohorts:
                cohort.dirty.discard(pin.id)
                cohort.gone.setdefault(pin.id, pin)
                self._schedule_cohort(cohort)
        self._schedule()

    def _forget_if_empty(self) -> None:
        # Not while a tick is due: its departures must still reach the
        # other nodes (and a tick never dies half done).
        if (not self.members and not self.pins and not self.gone and not self.dirty
                and self.tick_call is None and self.cohorts is None):
            self.hub.forget(self)

    def apply_remote(self, origin: str, states: Iterable[dict], gone: Iterable[str]) -> None:
        """States and departures of pins owned by another node."""
        pins = self.pins
        # Departures first: a delta that names a pin in both (it left and
        # came back) leaves it present.
        for pin_id in gone:
            pin = pins.get(pin_id)
            if pin is not None and pin.origin == origin:
                self.remove_pin(pin)
        for state in states:
            pin = pins.get(state["id"])
            if pin is None:
                pin = pins[state["id"]] = self.new_pin(state["id"])
                pin.origin = origin
                pin.version = -1
                if origin == DEVICES:
                    self.device_pins += 1
            elif pin.origin != origin or state["version"] <= pin.version:
                continue
            pin.version = state["version"]
            pin.lat, pin.lng = state["lat"], state["lng"]
            pin.heading, pin.accuracy = state["heading"], state["accuracy"]
            pin.name, pin.seq, pin.ts = state["name"], state["seq"], state["ts"]
            pin.source, pin.battery = state.get("source"), state.get("battery")
            pin._json = None
            self._index_pin(pin)
            self._mark(pin)
        self._forget_if_empty()

    def expire_pins(self, older_than_ms: int) -> int:
        """
        Remove this node's pins, and phone apps' pins, whose last fix is
        older than a bound (every node expires the apps' pins by itself,
        at the same time: their `ts` is the fix's).
        """
        expired = [pin for pin in self.pins.values()
                   if (pin.origin is None or pin.origin == DEVICES) and pin.ts < older_than_ms]
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

    def drop_others(self) -> int:
        """Remove every pin this node does not own (it stopped serving the map)."""
        dropped = [pin for pin in self.pins.values() if pin.origin is not None]
        for pin in dropped:
            self.remove_pin(pin)
        self._forget_if_empty()
        return len(dropped)

    # Client messages

    def move(self, member: Member, move: wire.Move) -> None:
        pin = member.pin
        if pin is None:
            pin = member.pin = self.new_pin(member.id)
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
        if member.paused_at is not None:
            # Its buffer is full: the snapshot goes when it drains.
            member.view = bbox
            member.resync = True
            member.missed = member.missed_gone = None
            member.pending = None
            self.pending_members.discard(member)
            return
        self._unsubscribe(member)
        member.view = bbox
        self._subscribe(member)
        self._send_snapshot(member)

    def _send_snapshot(self, member: Member) -> None:
        bbox = member.view
        pins = self.pins_in(bbox)
        self._set_pending(member, bbox, (pin.id for pin in pins))
        self._send(member, wire.encode_snapshot([pin.json() for pin in pins]))

    def _set_pending(self, member: Member, bbox: Optional[BBox], ids: Iterable[str],
                     *, replace: bool = True) -> None:
        """
        Note the pins just sent to `member` in a state no tick has sent. In
        the world, every change and departure reaches every member, so
        nothing is pending there. In a box, departures are routed by where
        a pin was last sent, which a pin sent early may not be. A snapshot
        replaces what the member had; a catch-up adds to it.
        """
        if replace or bbox is None:
            member.pending = None
            self.pending_members.discard(member)
        if bbox is None or not self.dirty:
            return
        dirty = self.dirty
        early = {pin_id for pin_id in ids if pin_id in dirty}
        if early:
            if member.pending is None:
                member.pending = early
            else:
                member.pending |= early
            self.pending_members.add(member)

    def pins_in(self, bbox: Optional[BBox]) -> list[Pin]:
        """The pins inside a box, through the grid rather than every pin."""
        if bbox is None:
            return list(self.pins.values())
        found = []
        for cell in _bbox_cells(bbox):
            for pin_id in self.pin_cells.get(cell, ()):
                pin = self.pins[pin_id]
                if in_bbox(bbox, pin.lat, pin.lng):
                    found.append(pin)
        return found

    # Flow control

    def pause(self, member: Member) -> None:
        if member.paused_at is not None or not member.active:
            return
        cohort = member.cohort
        self._unsubscribe(member)
        member.paused_at = self.hub.clock.seconds()
        member.paused_serial = self.hub.next_serial()
        member.missed = set()
        member.missed_gone = set()
        if cohort is not None:
            # What its cohort has not sent yet, the map's tick may already
            # have passed: it is missed too.
            member.missed.update(cohort.dirty)
            member.missed_gone.update(cohort.gone)
        # `pending` stays: if the member drains before the next tick, that
        # tick must still settle it (else the tick notes it as missed).
        self.slow.add(member)

    def resume(self, member: Member) -> None:
        if member.paused_at is None or not member.active:
            return
        member.paused_at = None
        self.slow.discard(member)
        bbox = member.view
        if member.resync:
            member.resync = False
            member.missed = member.missed_gone = None
            self._subscribe(member)
            self._send_snapshot(member)
            return
        ids = (member.missed or set()) | (member.missed_gone or set())
        # Only a paused member keeps these (a few hundred bytes per idle
        # connection otherwise).
        member.missed = member.missed_gone = None
        self._subscribe(member)
        if member.cohort is not None:
            # Its new cohort sends only what changes after its own last tick;
            # what changed since the map's last tick it may have sent already.
            ids |= self.dirty
            ids.update(self.gone)
        if not ids:
            return
        pins, gone = [], []
        pins_now = self.pins
        for pin_id in ids:
            pin = pins_now.get(pin_id)
            if pin is not None and (bbox is None or in_bbox(bbox, pin.lat, pin.lng)):
                pins.append(pin)
            else:
                gone.append(pin_id)
        self._set_pending(member, bbox, (pin.id for pin in pins), replace=False)
        # If this fills the buffer again, the transport pauses the member
        # from inside the write, and it stays paused.
        self._send(member, wire.encode_update([pin.json() for pin in pins], gone))

    # The tick

    def _mark(self, pin: Pin) -> None:
        self.dirty.add(pin.id)
        if self.cohorts is not None:
            for cohort in self.cohorts:
                cohort.dirty.add(pin.id)
                self._schedule_cohort(cohort)
        self._schedule()

    @property
    def interval(self) -> float:
        """
        Seconds between this map's ticks. Almost all of a tick's cost is per
        frame, and a frame costs about the same with one pin or fifty: a
        map with many clients ticks a little less often, so each frame
        carries more pins (the latency stays within the protocol's second).
        """
        base = self.hub.tick_interval
        return base * 1.3 if self.hub.big_map <= len(self.members) < self.hub.cohort_min else base

    def _schedule(self) -> None:
        if self.tick_call is None:
            clock = self.hub.clock
            delay = max(0.0, self.last_tick + self.interval - clock.seconds())
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
        self.gone = {}
        # A pin that left and came back within the tick is a change, not a
        # departure: no update names a pin twice.
        departed = [pin for pin_id, pin in gone.items() if pin_id not in pins]
        if self.world and self.cohorts is None:
            self._broadcast(self.world, wire.encode_update(
                [pin.json() for pin in changed], [pin.id for pin in departed]))
        if self.groups:
            self._fan_out_views(changed, gone, departed)
        if self.pending_members:
            self._settle_pending(gone)
        if self.slow:
            self._note_missed(changed, gone, started)
        publisher = self.hub.publisher
        if publisher is not None:
            local = [pin for pin in changed if pin.origin is None]
            local_gone = [pin.id for pin in departed if pin.origin is None]
            if local or local_gone:
                publisher(self.name, local, local_gone)
        for pin in changed:
            pin.sent_lat, pin.sent_lng = pin.lat, pin.lng
        self.hub.tick_observer(clock.seconds() - started)
        self._forget_if_empty()

    @staticmethod
    def _last_sent(pin: Optional[Pin], old: Optional[Pin]) -> Optional[tuple[float, float]]:
        """Where an id was as of the last tick (a pin made again has no place yet)."""
        for candidate in (pin, old):
            if candidate is not None and candidate.sent_lat is not None:
                return candidate.sent_lat, candidate.sent_lng  # type: ignore[return-value]
        return None

    def _fan_out_views(self, changed: list[Pin], gone: dict[str, Pin],
                       departed: list[Pin]) -> None:
        touched: set[ViewGroup] = set()
        cells = self.view_cells
        nowhere: set[ViewGroup] = set()
        for pin in changed:
            groups = cells.get(_cell(pin.lat, pin.lng), nowhere)
            before = self._last_sent(pin, gone.get(pin.id))
            if before is not None:
                was = cells.get(_cell(*before))
                if was and was is not groups:
                    groups = groups | was
            for group in groups:
                if in_bbox(group.bbox, pin.lat, pin.lng):
                    group.pins.append(pin.json())
                elif before is not None and in_bbox(group.bbox, *before):
                    group.gone.append(pin.id)
                else:
                    continue
                touched.add(group)
        for pin in departed:
            before = self._last_sent(pin, None)
            if before is None:
                continue
            for group in cells.get(_cell(*before), ()):
                if in_bbox(group.bbox, *before):
                    group.gone.append(pin.id)
                    touched.add(group)
        for group in touched:
            self._broadcast(group.members, wire.encode_update(group.pins, group.gone))
            group.pins = []
            group.gone = []

    def _settle_pending(self, gone: dict[str, Pin]) -> None:
        """Tell members in a box about pins they got early and that their group's update missed."""
        members, self.pending_members = self.pending_members, set()
        pins = self.pins
        for member in members:
            ids, member.pending = member.pending, None
            bbox = member.view
            # A paused member is owed this tick's changes and departures
            # (which cover its pending pins: they were dirty) as missed.
            if ids is None or bbox is None or member.paused_at is not None or not member.active:
                continue
            stale = []
            for pin_id in ids:
                pin = pins.get(pin_id)
                if pin is not None and in_bbox(bbox, pin.lat, pin.lng):
                    continue  # its group was sent this state
                before = self._last_sent(pin, gone.get(pin_id))
                if before is not None and in_bbox(bbox, *before):
                    continue  # its group was told it left
                stale.append(pin_id)
            if stale:
                self._send(member, wire.encode_update([], stale))

    def _note_missed(self, changed: list[Pin], gone: dict[str, Pin], now: float) -> None:
        stats = self.hub.stats
        timeout = self.hub.slow_timeout
        limit = self.hub.max_missed
        for member in list(self.slow):
            stats.slow_skips += 1
            assert member.paused_at is not None
            if not member.resync:
                missed, missed_gone = member.missed, member.missed_gone
                assert missed is not None and missed_gone is not None
                for pin in gone.values():
                    missed.discard(pin.id)
                    # A pin made after the pause was never sent to it.
                    if pin.born < member.paused_serial:
                        missed_gone.add(pin.id)
                missed.update(pin.id for pin in changed)
            if (now - member.paused_at >= timeout
                    or len(member.missed or ()) + len(member.missed_gone or ()) > limit):
                self.slow.discard(member)
                member.resync = True
                member.missed = member.missed_gone = None
                stats.slow_closes += 1
                self.log.info("closing slow client {member} on map {map}",
                              member=member.id, map=log_name(self.name))
                member.subscriber.close(wire.CLOSE_POLICY, "too slow: not reading")

    def _broadcast(self, members: Iterable[Member], payload: bytes) -> None:
        frame = Frame(payload)
        count = 0
        # A copy: a write may pause (or close) a member from inside the
        # loop, as Twisted does when a socket buffer fills.
        for member in tuple(members):
            if member.paused_at is not None or not member.active:
                continue  # paused by an earlier write of this loop
            try:
                member.subscriber.send_frame(frame)
            except Exception:
                self._send_failed(member)
                continue
            count += 1
        stats = self.hub.stats
        stats.frames_sent += count
        stats.bytes_sent += count * len(payload)

    def _send(self, member: Member, payload: bytes) -> None:
        stats = self.hub.stats
        stats.frames_sent += 1
        stats.bytes_sent += len(payload)
        try:
            member.subscriber.send_frame(Frame(payload))
        except Exception:
            self._send_failed(member)

    def _send_failed(self, member: Member) -> None:
        # One broken transport never costs the others their update.
        self.log.failure("could not send to client {member} on map {map}",
                         member=member.id, map=log_name(self.name))
        try:
            member.subscriber.close(wire.CLOSE_INTERNAL_ERROR, "internal error")
        except Exception:
            self.log.failure("could not close client {member}", member=member.id)

    # Cohorts: a big map's world, sent to in turn

    def _fit_cohorts(self, size: int) -> None:
        """
        Split the world (of `size` members) into cohorts when it is big,
        merge them back when it is small again. One update broadcast to ten thousand clients takes
        tens of milliseconds, and the last client waits for all of them:
        cohorts ticking in turn, each every `cohort_interval`, carry more
        pins per frame (less CPU per pin state) while each client waits only
        for its own cohort's share of a broadcast.
        """
        hub = self.hub
        if self._refitting:
            return
        wanted = size // hub.cohort_size if size >= hub.cohort_min else 0
        if self.cohorts is None:
            if wanted >= 2:
                self._make_cohorts(wanted)
        elif size < hub.cohort_min // 2:
            self._dissolve_cohorts()
        elif wanted >= 2 * len(self.cohorts):
            # Grown to twice as many cohorts' worth: split again.
            self._dissolve_cohorts()
            self._make_cohorts(wanted)

    def _make_cohorts(self, count: int) -> None:
        self._refitting = True
        try:
            self._split(count)
        finally:
            self._refitting = False

    def _split(self, count: int) -> None:
        interval = self.hub.tick_interval * self.hub.cohort_stretch
        self.cohorts = [Cohort(index * interval / count) for index in range(count)]
        for index, member in enumerate(self.world):
            cohort = self.cohorts[index % count]
            cohort.members.add(member)
            member.cohort = cohort
        # What the world has not been sent yet, each cohort sends.
        for cohort in self.cohorts:
            cohort.dirty = set(self.dirty)
            cohort.gone = dict(self.gone)
            if cohort.dirty or cohort.gone:
                self._schedule_cohort(cohort)

    def _dissolve_cohorts(self) -> None:
        cohorts, self.cohorts = self.cohorts, None
        assert cohorts is not None
        self._refitting = True
        try:
            for cohort in cohorts:
                if cohort.tick_call is not None and cohort.tick_call.active():
                    cohort.tick_call.cancel()
                cohort.tick_call = None
                # Sent now what each was owed; the world ticks with the map again.
                self._cohort_tick(cohort)
                cohort.alive = False
                for member in cohort.members:
                    member.cohort = None
        finally:
            self._refitting = False

    def _schedule_cohort(self, cohort: Cohort) -> None:
        if cohort.tick_call is not None:
            return
        interval = self.hub.tick_interval * self.hub.cohort_stretch
        now = self.hub.clock.seconds()
        # The next of its slots after the last one it used (not after when
        # that tick ran: a tick runs a little late, and must not push the
        # next one a whole interval on): the cohorts' sends fall in turn.
        earliest = max(now, cohort.last_tick + interval)
        slot = cohort.phase + math.ceil((earliest - cohort.phase) / interval - 1e-9) * interval
        cohort.last_tick = slot
        cohort.tick_call = self.hub.clock.callLater(max(0.0, slot - now), self._cohort_tick,
                                                    cohort)

    def _cohort_tick(self, cohort: Cohort) -> None:
        cohort.tick_call = None
        if not cohort.alive:
            return
        pins = self.pins
        changed = [pins[pin_id] for pin_id in cohort.dirty]
        departed = [pin for pin_id, pin in cohort.gone.items() if pin_id not in pins]
        cohort.dirty = set()
        cohort.gone = {}
        if cohort.members and (changed or departed):
            self._broadcast(cohort.members, wire.encode_update(
                [pin.json() for pin in changed], [pin.id for pin in departed]))
        if self.cohorts is None:
            self._forget_if_empty()

    def settled(self) -> bool:
        """No tick of the map or of its cohorts is due: every member was sent everything."""
        return self.tick_call is None and (
            self.cohorts is None or all(c.tick_call is None for c in self.cohorts))

    # Indexes

    def _subscribe(self, member: Member) -> None:
        bbox = member.view
        if bbox is None:
            # Refit first: what a refit sends (what cohorts owed) must not
            # reach a member that is only now joining.
            self._fit_cohorts(len(self.world) + 1)
            self.world.add(member)
            if self.cohorts is not None:
                cohort = min(self.cohorts, key=lambda c: len(c.members))
                cohort.members.add(member)
                member.cohort = cohort
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
            if member.cohort is not None:
                member.cohort.members.discard(member)
                member.cohort = None
            self._fit_cohorts(len(self.world))
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
                 big_map: int = 800, cohort_min: int = 3000, cohort_size: int = 2500,
                 cohort_stretch: float = 2.0,
                 slow_timeout: float = 30.0, max_missed: int = 20_000,
                 max_members: int = 50_000, max_maps: int = 10_000,
                 tick_observer: Callable[[float], None] = lambda seconds: None,
                 new_id: Callable[[], str] = lambda: secrets.token_urlsafe(12)) -> None:
        self.clock = clock
        self.tick_interval = tick_interval
        # A map with at least `big_map` clients ticks 1.3 times less often;
        # one with at least `cohort_min` world subscribers sends to them in
        # cohorts of about `cohort_size`, each every `cohort_stretch` ticks
        # (MapState.interval, MapState._fit_cohorts).
        self.big_map = big_map
        self.cohort_min = cohort_min
        self.cohort_size = cohort_size
        self.cohort_stretch = cohort_stretch
        self.slow_timeout = slow_timeout
        self.max_missed = max_missed
        self.max_members = max_members
        self.max_maps = max_maps
        self.tick_observer = tick_observer
        self.new_id = new_id
        # Set by a backplane: called once per map tick with this node's
        # changed pins and departed pin ids, to share them with other nodes.
        self.publisher: Optional[Callable[[str, list[Pin], list[str]], None]] = None
        # Set by a backplane: told when a map gets its first local client and
        # loses its last, so a node serves only the maps it needs.
        self.watcher: Optional[MapWatcher] = None
        self.maps: dict[str, MapState] = {}
        self.stats = Stats()
        self._serial = 0

    def next_serial(self) -> int:
        """A number that only grows: orders pin births and pauses."""
        self._serial += 1
        return self._serial

    def map(self, map_name: str, *, limited: bool = True) -> MapState:
        """The state of a map, made on demand (up to `max_maps` if `limited`)."""
        map_state = self.maps.get(map_name)
        if map_state is None:
            if limited and len(self.maps) >= self.max_maps:
                raise MapFull("too many maps")
            map_state = self.maps[map_name] = MapState(self, map_name)
        return map_state

    def can_join(self, map_name: str) -> bool:
        """Whether a new connection (or device) would be admitted to this map now."""
        map_state = self.maps.get(map_name)
        if map_state is None:
            return len(self.maps) < self.max_maps
        return len(map_state.members) + map_state.device_pins < self.max_members

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

    def drop_others(self, map_name: str) -> int:
        """This node stopped serving a map: every pin it does not own goes."""
        map_state = self.maps.get(map_name)
        return 0 if map_state is None else map_state.drop_others()

    def local_pins(self) -> Iterator[tuple[str, Pin]]:
        """This node's own pins, to publish again after a reconnect."""
        for map_state in self.maps.values():
            for pin in map_state.pins.values():
                if pin.origin is None:
                    yield map_state.name, pin

    def forget(self, map_state: MapState) -> None:
        """
        An empty map costs nothing: drop it (it is made again on demand).
        Only once its last tick ran, or its last departures would never be
        published.
        """
        if self.maps.get(map_state.name) is map_state and map_state.settled():
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
