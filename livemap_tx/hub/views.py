"""
Views: which members watch which box, the spatial indexes that find the
view groups a moved pin concerns and the pins inside a box, and the
snapshots a new view is sent.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

from .. import wire
from .clusters import ClusterGroup, Clusters
from .mapcore import ViewGroup
from .members import Member
from .pins import Pin
from ..wire import BBox, in_bbox

__all__ = ["ViewGroup", "Views"]


class Views(Clusters):
    """Views, snapshots and the spatial indexes of one map (a layer of MapState)."""

    def set_view(self, member: Member, bbox: Optional[BBox], zoom: Optional[int] = None) -> None:
        if member.paused_at is not None:
            # Its buffer is full: the snapshot goes when it drains.
            member.view = bbox
            member.zoom = zoom
            member.resync = True
            member.missed = member.missed_gone = None
            member.pending = None
            self.pending_members.discard(member)
            return
        self._unsubscribe(member)
        member.view = bbox
        member.zoom = zoom
        self._subscribe(member)
        self._send_snapshot(member)

    def _send_snapshot(self, member: Member) -> None:
        self._send(member, self._picture(member, lambda pins, clusters, total: wire.encode_snapshot(
            pins, clusters, total)))

    def _picture(self, member: Member,
                 encode: Callable[[list[bytes], Optional[list[bytes]], int], bytes]) -> bytes:
        """
        What the member's view shows now, encoded (a snapshot or welcome),
        its early pins noted. Only a subscribed clustered member has a group.
        """
        bbox = member.view
        if member.zoom is None:
            pins = self.pins_in(bbox)
            self._set_pending(member, bbox is None, (pin.id for pin in pins))
            return encode([pin.json() for pin in pins], None, 0)
        group = member.group
        if not isinstance(group, ClusterGroup):
            group = self._cluster_group(member)
        pins, clusters = self._clustered_picture(group)
        if group.members:
            self._note_total_sent(group)
        else:
            self._drop_cluster_group(group)
        self._set_pending(member, False, (pin.id for pin in pins))
        return encode([pin.json() for pin in pins], clusters, len(self.pins))

    def _set_pending(self, member: Member, world: bool, ids: Iterable[str],
                     *, replace: bool = True) -> None:
        """
        Note the pins just sent to `member` in a state no tick has sent. In
        the world, every change and departure reaches every member, so
        nothing is pending there. In a box, departures are routed by where
        a pin was last sent, which a pin sent early may not be. A snapshot
        replaces what the member had; a catch-up adds to it.
        """
        if replace or world:
            member.pending = None
            self.pending_members.discard(member)
        if world or not self.dirty:
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
        pins = self.pins
        for pin_id in self.pin_grid.ids_in(bbox):
            pin = pins[pin_id]
            if in_bbox(bbox, pin.lat, pin.lng):
                found.append(pin)
        return found


    # Indexes

    def _subscribe(self, member: Member) -> None:
        bbox = member.view
        if member.zoom is not None:
            cluster_group = self._cluster_group(member)
            if not cluster_group.members:
                # Its first member was just sent the total in its picture.
                cluster_group.total_sent = len(self.pins)
            cluster_group.members.add(member)
            member.group = cluster_group
            return
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
            self.view_index.add(group, bbox)
        group.members.add(member)
        member.group = group

    def _unsubscribe(self, member: Member) -> None:
        bbox = member.view
        group, member.group = member.group, None
        if isinstance(group, ClusterGroup):
            group.members.discard(member)
            if not group.members:
                self._drop_cluster_group(group)
            return
        if member.zoom is not None:
            return  # not subscribed (paused, or joining)
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
            self.view_index.remove(group)

    def _index_pin(self, pin: Pin) -> None:
        self._place_pin(pin)
        cell = self.pin_grid.key(pin.lat, pin.lng)
        if cell != pin.cell:
            if pin.cell is not None:
                self.pin_grid.discard(pin.cell, pin.id)
            pin.cell = cell
            self.pin_grid.add(cell, pin.id)

    def _unindex_pin(self, pin: Pin) -> None:
        self._unplace_pin(pin)
        if pin.cell is not None:
            self.pin_grid.discard(pin.cell, pin.id)
            pin.cell = None
