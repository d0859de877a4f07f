"""
The tick: a map's dirty pins turned into one encoded update per distinct
view, the same bytes handed to every subscriber of that view, and the
delta handed to the backplane.
"""

from __future__ import annotations

from typing import Optional

from .. import wire
from .flow import SlowConsumers
from .pins import Pin
from .clusters import ClusterGroup
from .views import ViewGroup
from ..wire import in_bbox


class Ticks(SlowConsumers):
    """The tick and sending of one map (a layer of MapState)."""

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
        elif self.tick_for_pass:
            # The tick due is the clusters' (up to a second away): a pin's
            # change goes at the pins' pace.
            self.tick_for_pass = False
            clock = self.hub.clock
            delay = max(0.0, self.last_tick + self.interval - clock.seconds())
            if self.tick_call.getTime() > clock.seconds() + delay:
                self.tick_call.reset(delay)


    def tick(self) -> None:
        """Send what changed since the last tick, once per distinct view."""
        self.tick_call = None
        self.tick_for_pass = False
        clock = self.hub.clock
        started = clock.seconds()
        self.last_tick = started
        stats = self.hub.stats
        stats.ticks += 1
        self.ticks_run += 1
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
        if self.groups or self.aggregates or self.cluster_groups or self.deferred:
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
            pin.sent_tile = pin.tile
        if self.deferred:
            self._schedule()
        if (self.aggregates or self.cluster_groups) and self._pass_due():
            self._schedule_pass()
        self.hub.tick_observer(clock.seconds() - started)
        self._forget_if_empty()

    @staticmethod
    def _last_sent(pin: Optional[Pin], old: Optional[Pin]) -> Optional[tuple[float, float]]:
        """Where an id was as of the last tick (a pin made again has no place yet)."""
        for candidate in (pin, old):
            if candidate is not None and candidate.sent_lat is not None:
                return candidate.sent_lat, candidate.sent_lng  # type: ignore[return-value]
        return None

    @staticmethod
    def _sent_tile(pin: Optional[Pin], old: Optional[Pin]) -> Optional[tuple[int, int]]:
        """The tile of `_last_sent`'s position."""
        for candidate in (pin, old):
            if candidate is not None and candidate.sent_lat is not None:
                return candidate.sent_tile
        return None

    def _fan_out_views(self, changed: list[Pin], gone: dict[str, Pin],
                       departed: list[Pin]) -> None:
        touched: set[ViewGroup] = set()
        index = self.view_index
        clustered = bool(self.cluster_views)
        for pin in changed:
            before = self._last_sent(pin, gone.get(pin.id))
            if clustered:
                self._route_clustered(pin, before, self._sent_tile(pin, gone.get(pin.id)),
                                      touched)
            for group in index.near(pin.lat, pin.lng, before):
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
            if clustered:
                self._route_departed_clustered(pin, before, touched)
            for groups in index.at(*before):
                for group in groups:
                    if not in_bbox(group.bbox, *before):
                        continue
                    group.gone.append(pin.id)
                    touched.add(group)
        if (self.aggregates or self.cluster_groups) and self._pass_due() and (
                self.hub.clock.seconds() >= self.last_pass + self.hub.cluster_interval - 1e-9):
            self._cluster_pass(touched)
        elif self.aggregates:
            self._decide_crowded(touched)
        if self.deferred:
            touched |= self.deferred
            self.deferred = set()
        # A big map's clustered groups are sent at most every few ticks, so
        # that a change waits at most cluster_flush_ticks base ticks (200 ms):
        # a map whose tick is stretched waits fewer of its ticks.
        every = 1
        if len(self.members) >= self.hub.big_map:
            every = max(1, int(self.hub.cluster_flush_ticks * self.hub.tick_interval
                               / self.interval + 1e-9))
        for group in touched:
            if isinstance(group, ClusterGroup):
                if self.ticks_run - group.last_flush < every:
                    # Sent to at most every `every` ticks: what it has to
                    # say waits in its scratch for a later tick.
                    self.deferred.add(group)
                    continue
                group.last_flush = self.ticks_run
                self._flush_clustered(group)
                continue
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
            if ids is None or member.paused_at is not None or not member.active:
                continue
            group = member.group
            if isinstance(group, ClusterGroup):
                # Cells may have changed hands in this tick's cluster pass:
                # whatever the group does not show now is gone for it.
                stale = [pin_id for pin_id in ids if pin_id not in pins
                         or not self._shows(group, pins[pin_id].tile)]
                if stale:
                    self._send(member, wire.encode_update(
                        [], stale, [], len(pins)))
                continue
            if bbox is None:
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


