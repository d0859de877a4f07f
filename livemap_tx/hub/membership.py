"""
A map's membership: members joining and leaving, and the pins they (or
other nodes, or phone apps) put on it, up to the moment they are marked
dirty for the tick.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Optional, cast

from .. import wire
from .ticks import Ticks
from .members import MapFull, Member, Subscriber
from .pins import DEVICES, Pin

if TYPE_CHECKING:
    from . import MapState


class Membership(Ticks):
    """Joins, departures and pins of one map (a layer of MapState)."""

    def join(self, subscriber: Subscriber, view: Optional[wire.View] = None) -> Member:
        if len(self.members) + self.device_pins >= self.hub.max_members:
            raise MapFull("map full")
        # Only a whole MapState has members (this layer is never made alone).
        member = Member(self.hub.new_id(), cast("MapState", self), subscriber)
        self.members[member.id] = member
        self.hub.stats.connections_opened += 1
        if len(self.members) == 1 and self.hub.watcher is not None:
            self.hub.watcher.map_in_use(self.name)
        if view is None:
            # The current pins: the world's next update covers whatever of
            # them no tick has sent yet.
            self._send(member, wire.encode_welcome(
                member.id, [pin.json() for pin in self.pins.values()]))
        else:
            # A view asked for in the URL: the welcome is already for it.
            member.view, member.zoom = view.bbox, view.zoom
            self._send(member, self._picture(
                member, lambda pins, clusters, total: wire.encode_welcome(
                    member.id, pins, clusters, total)))
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
        self.names.drop(pin)
        self.totals_stale = True  # clustered views' `total`
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
                self.totals_stale = True
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
            self.names.put(pin)
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
            self.names.put(pin)
            self.totals_stale = True
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
            self.names.put(pin)
            pin.version += 1
            pin._json = None
            self._mark(pin)
