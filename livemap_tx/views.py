"""
Views: which members watch which box, the spatial indexes that find the
view groups a moved pin concerns and the pins inside a box, and the
snapshots a new view is sent.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional

from . import wire
from .cohorts import Cohorts
from .members import Member
from .pins import Pin
from .wire import BBox, in_bbox

# Grid cell size, in degrees, of the spatial indexes of pins and views.
CELL_DEGREES = 10.0
_COLUMNS = int(360 / CELL_DEGREES)
_ROWS = int(180 / CELL_DEGREES)



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



class Views(Cohorts):
    """Views, snapshots and the spatial indexes of one map (a layer of MapState)."""

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
