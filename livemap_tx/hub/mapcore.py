"""
The state of one map (its pins, members, views, dirty set), and sending
to its members: the layer every other part of MapState builds on, in the
order cohorts.py, views.py, flow.py, ticks.py, membership.py.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable, Optional

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from .. import wire
from .grid import PinGrid, ViewIndex
from .members import Frame, Member
from .people import Names
from .pins import Pin
from ..privacy import map_label as log_name
from ..wire import BBox

if TYPE_CHECKING:
    from .cohorts import Cohort
    from . import Hub
    from .clusters import Aggregate, ClusterGroup


class ViewGroup:
    """Subscribers that watch the same box: one encoded update serves them all."""

    __slots__ = ("bbox", "members", "pins", "gone")

    def __init__(self, bbox: BBox) -> None:
        self.bbox = bbox
        self.members: set[Member] = set()
        # Scratch space of one tick.
        self.pins: list[bytes] = []
        self.gone: list[str] = []


class MapCore:
    """The state of one map, and sending to its members (MapState's lowest layer)."""

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
        self.view_index: ViewIndex[ViewGroup] = ViewIndex()
        self.pin_grid = PinGrid()
        # Its pins by name, for the people search (membership.py keeps it).
        self.names = Names()
        # Clustered views (extension "clusters"): their groups by key, an
        # index of them per cell level, and the cells' aggregates per level.
        self.cluster_groups: dict[tuple, ClusterGroup] = {}
        self.cluster_views: dict[int, ViewIndex[ClusterGroup]] = {}
        self.aggregates: dict[int, Aggregate] = {}
        self.last_pass = -math.inf
        # Set while the tick due is one for the clusters only (see _schedule).
        self.tick_for_pass = False
        # Clustered groups whose update waits for a later tick, and the
        # count of ticks that tells when (Hub.cluster_flush_ticks).
        self.deferred: set[ClusterGroup] = set()
        self.ticks_run = 0
        # The pin count changed, or a clustered member was sent a total its
        # group's others were not: the next cluster pass sends `total`.
        self.totals_stale = False
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


    def tick(self) -> None:
        """Send what changed since the last tick (the Ticks layer's)."""
        raise NotImplementedError

    def _forget_if_empty(self) -> None:
        # Not while a tick is due: its departures must still reach the
        # other nodes (and a tick never dies half done).
        if (not self.members and not self.pins and not self.gone and not self.dirty
                and self.tick_call is None and self.cohorts is None):
            self.hub.forget(self)

    def settled(self) -> bool:
        """No tick of the map or of its cohorts is due: every member was sent everything."""
        return self.tick_call is None and (
            self.cohorts is None or all(c.tick_call is None for c in self.cohorts))

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
