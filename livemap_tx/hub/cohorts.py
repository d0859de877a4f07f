"""
Cohorts: a big map's whole-world subscribers, in shares that tick in
turn, so that each client waits for its own share's send rather than for
a ten-thousand-client broadcast.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

from twisted.internet.interfaces import IDelayedCall

from .. import wire
from .mapcore import MapCore

if TYPE_CHECKING:
    from .members import Member
    from .pins import Pin


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



class Cohorts(MapCore):
    """The cohorts of one map (a layer of MapState)."""

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

