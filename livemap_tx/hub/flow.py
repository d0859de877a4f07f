"""
Slow consumers: a member whose transport is congested is skipped by the
fan-out and remembers which pins it missed; when it drains it gets one
catch-up update (or a snapshot), and one stuck too long is closed.
"""

from __future__ import annotations

from .. import wire
from .views import Views
from .members import Member
from .pins import Pin
from ..privacy import map_label as log_name
from ..wire import in_bbox


class SlowConsumers(Views):
    """Pausing, catching up and closing slow members (a layer of MapState)."""

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
        if member.zoom is not None:
            # A clustered view's cells change hands while it waits: it is
            # caught up with a snapshot of what it shows then.
            member.resync = True
            member.missed = member.missed_gone = None
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
        self._set_pending(member, bbox is None, (pin.id for pin in pins), replace=False)
        # If this fills the buffer again, the transport pauses the member
        # from inside the write, and it stays paused.
        self._send(member, wire.encode_update([pin.json() for pin in pins], gone))


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
