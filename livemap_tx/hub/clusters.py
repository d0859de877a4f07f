"""
Clustered views (livemap's extension "clusters", docs/protocol.md): a view
that gives its zoom Z is cut into the Web Mercator tiles of level
min(Z + 1, 23); a tile holding more than K pins is sent as one cluster,
one with K or fewer as its pins.

Per level in use, an `Aggregate` keeps which pins are in which cell. Pins
in sparse cells travel with the map's tick as in v1; the cells themselves
are decided on a slower cadence, the cluster pass (at most once per
`Hub.cluster_interval`): a cell that goes over K, falls back, or whose
cluster changed enough is encoded once and the same bytes go to every
group that shows that cell. Views with the same tiles and zoom share a
`ClusterGroup` and one encoded frame per tick.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional

from .. import wire
from .cohorts import Cohorts
from .grid import ViewIndex
from .mapcore import ViewGroup
from .members import Member
from .pins import Pin
from ..wire import BBox

# Tiles are computed once per pin state at the finest level; coarser levels
# shift them.
TOP_LEVEL = 23
_TOP = 1 << TOP_LEVEL
# From this zoom up nothing is clustered (cells are a few streets wide).
NO_CLUSTERS_FROM = 18
_MAX_LAT = 85.0511287798066
# A published cluster is sent again when its centre moves more than this
# share of its cell.
CENTRE_MOVE = 1.0 / 8


def level_of(zoom: int) -> int:
    """The tile level of a zoom's cells: a 128-pixel square on the page's screen."""
    return min(zoom + 1, TOP_LEVEL)


def tile(lat: float, lng: float) -> tuple[int, int]:
    """The Web Mercator tile of a point at level 23 (beyond 85.05 degrees: the edge row)."""
    x = int((lng + 180.0) / 360.0 * _TOP)
    lat = max(-_MAX_LAT, min(_MAX_LAT, lat))
    sin = math.sin(math.radians(lat))
    y = int((0.5 - math.log((1.0 + sin) / (1.0 - sin)) / (4.0 * math.pi)) * _TOP)
    return min(max(x, 0), _TOP - 1), min(max(y, 0), _TOP - 1)


def _lat_of(share: float) -> float:
    return math.degrees(math.atan(math.sinh(math.pi * (1.0 - 2.0 * share))))


def tile_box(level: int, x: int, y: int) -> BBox:
    """A tile's box; the top and bottom rows reach the poles (every point is in a tile)."""
    n = 1 << level
    north = 90.0 if y == 0 else _lat_of(y / n)
    south = -90.0 if y == n - 1 else _lat_of((y + 1) / n)
    return (x / n * 360.0 - 180.0, south, (x + 1) / n * 360.0 - 180.0, north)


class TileRange:
    """The tiles of one level a view covers: a box widened to whole cells."""

    __slots__ = ("level", "shift", "x_lo", "x_hi", "y_lo", "y_hi", "wraps")

    def __init__(self, level: int, bbox: Optional[BBox]) -> None:
        self.level = level
        self.shift = TOP_LEVEL - level
        n = 1 << level
        if bbox is None:
            self.x_lo, self.x_hi, self.y_lo, self.y_hi, self.wraps = 0, n - 1, 0, n - 1, False
            return
        west, south, east, north = bbox
        self.x_lo = tile(0.0, west)[0] >> self.shift
        self.x_hi = tile(0.0, east)[0] >> self.shift
        self.y_lo = tile(north, 0.0)[1] >> self.shift
        self.y_hi = tile(south, 0.0)[1] >> self.shift
        self.wraps = west > east
        if self.wraps and self.x_lo <= self.x_hi + 1:
            # Across the antimeridian and all the way round: every column.
            self.x_lo, self.x_hi, self.wraps = 0, n - 1, False

    def key(self) -> tuple:
        return (self.level, self.x_lo, self.x_hi, self.y_lo, self.y_hi, self.wraps)

    def holds(self, x: int, y: int) -> bool:
        if not self.y_lo <= y <= self.y_hi:
            return False
        if self.wraps:
            return x >= self.x_lo or x <= self.x_hi
        return self.x_lo <= x <= self.x_hi

    def count(self) -> int:
        n = 1 << self.level
        columns = (n - self.x_lo + self.x_hi + 1) if self.wraps else (self.x_hi - self.x_lo + 1)
        return columns * (self.y_hi - self.y_lo + 1)

    def tiles(self) -> Iterator[tuple[int, int]]:
        n = 1 << self.level
        columns = ([*range(self.x_lo, n), *range(0, self.x_hi + 1)] if self.wraps
                   else range(self.x_lo, self.x_hi + 1))
        for y in range(self.y_lo, self.y_hi + 1):
            for x in columns:
                yield x, y

    def bbox(self) -> BBox:
        """The widened box: whole cells."""
        west = tile_box(self.level, self.x_lo, self.y_lo)[0]
        north = tile_box(self.level, self.x_lo, self.y_lo)[3]
        east = tile_box(self.level, self.x_hi, self.y_hi)[2]
        south = tile_box(self.level, self.x_hi, self.y_hi)[1]
        return (west, south, east, north)


class ClusterGroup(ViewGroup):
    """Clustered views with the same tiles and zoom: one encoded update serves them all."""

    __slots__ = ("key", "zoom", "tiles", "clustering", "upserts", "removed", "clusters",
                 "total_sent", "last_flush")

    def __init__(self, key: tuple, zoom: int, tiles: TileRange) -> None:
        super().__init__(tiles.bbox())
        self.key = key
        self.zoom = zoom
        self.tiles = tiles
        self.clustering = zoom < NO_CLUSTERS_FROM
        # Scratch space of one tick: the latest word on each id wins.
        self.upserts: dict[str, bytes] = {}
        self.removed: dict[str, None] = {}
        self.clusters: dict[str, bytes] = {}
        self.total_sent = -1
        # The map tick (MapState.ticks_run) of its last update.
        self.last_flush = -(1 << 30)

    def show(self, pin_id: str, json: bytes) -> None:
        self.removed.pop(pin_id, None)
        self.upserts[pin_id] = json

    def hide(self, pin_id: str) -> None:
        self.upserts.pop(pin_id, None)
        self.clusters.pop(pin_id, None)
        self.removed[pin_id] = None


class Cell:
    """One tile of an aggregate: its pins, and the cluster the views were last sent."""

    __slots__ = ("name", "ids", "sum_lat", "sum_lng", "cluster", "sent_count", "sent_lat",
                 "sent_lng", "sent_at")

    def __init__(self, name: str) -> None:
        self.name = name
        self.ids: set[str] = set()
        # Sums of its pins' positions, kept as they move (made exact again
        # whenever its cluster is encoded): its centre without a walk.
        self.sum_lat = 0.0
        self.sum_lng = 0.0
        # The published cluster (None: the cell is sent as its pins).
        self.cluster: Optional[bytes] = None
        self.sent_count = 0
        self.sent_lat = 0.0
        self.sent_lng = 0.0
        self.sent_at = -math.inf


class Aggregate:
    """Which pins are in which cell of one level, and what the views were told of each cell."""

    __slots__ = ("level", "shift", "limit", "cells", "where", "dirty", "crowded",
                 "unused_since")

    def __init__(self, level: int, limit: int) -> None:
        self.level = level
        self.shift = TOP_LEVEL - level
        self.limit = limit
        self.cells: dict[tuple[int, int], Cell] = {}
        self.where: dict[str, tuple[tuple[int, int], float, float]] = {}
        # Cells changed since the last cluster pass.
        self.dirty: set[tuple[int, int]] = set()
        # Cells sent as pins that went over K: they become clusters in the
        # tick they did, not at the next pass (their pins are not sent).
        self.crowded: set[tuple[int, int]] = set()
        self.unused_since: Optional[float] = None

    def place(self, pin_id: str, top: tuple[int, int], lat: float, lng: float) -> None:
        key = (top[0] >> self.shift, top[1] >> self.shift)
        old = self.where.get(pin_id)
        self.dirty.add(key)  # its centre moved, at least
        self.where[pin_id] = (key, lat, lng)
        if old is not None:
            if old[0] == key:
                same = self.cells[key]
                same.sum_lat += lat - old[1]
                same.sum_lng += lng - old[2]
                return
            self._take(old, pin_id)
        cell = self.cells.get(key)
        if cell is None:
            cell = self.cells[key] = Cell(f"c:{self.level}/{key[0]}/{key[1]}")
        cell.ids.add(pin_id)
        cell.sum_lat += lat
        cell.sum_lng += lng
        if cell.cluster is None and len(cell.ids) > self.limit:
            self.crowded.add(key)

    def remove(self, pin_id: str) -> None:
        old = self.where.pop(pin_id, None)
        if old is not None:
            self._take(old, pin_id)

    def _take(self, old: tuple[tuple[int, int], float, float], pin_id: str) -> None:
        key, lat, lng = old
        cell = self.cells[key]
        cell.ids.discard(pin_id)
        cell.sum_lat -= lat
        cell.sum_lng -= lng
        self.dirty.add(key)

    def clustered(self, key: tuple[int, int]) -> bool:
        cell = self.cells.get(key)
        return cell is not None and cell.cluster is not None


class Clusters(Cohorts):
    """Clustered views and their aggregates (a layer of MapState)."""

    # Groups and aggregates

    def _cluster_group(self, member: Member) -> ClusterGroup:
        zoom = member.zoom
        assert zoom is not None
        tiles = TileRange(level_of(zoom), member.view)
        key = (*tiles.key(), zoom)
        group = self.cluster_groups.get(key)
        if group is None:
            group = self.cluster_groups[key] = ClusterGroup(key, zoom, tiles)
            if group.clustering:
                # Made before the group is indexed: making it tells nobody.
                self._aggregate(tiles.level).unused_since = None
            views = self.cluster_views.get(tiles.level)
            if views is None:
                views = self.cluster_views[tiles.level] = ViewIndex()
            views.add(group, _widened(group.bbox))
        return group

    def _drop_cluster_group(self, group: ClusterGroup) -> None:
        del self.cluster_groups[group.key]
        self.deferred.discard(group)
        level = group.tiles.level
        views = self.cluster_views[level]
        views.remove(group)
        if views.empty():
            del self.cluster_views[level]
            aggregate = self.aggregates.get(level)
            if aggregate is not None:
                aggregate.unused_since = self.hub.clock.seconds()

    def _aggregate(self, level: int) -> Aggregate:
        """The aggregate of a level, made (with every pin, cells decided) when first needed."""
        aggregate = self.aggregates.get(level)
        if aggregate is None:
            aggregate = self.aggregates[level] = Aggregate(level, self.hub.cluster_size)
            for pin in self.pins.values():
                if pin.tile is not None:
                    aggregate.place(pin.id, pin.tile, pin.lat, pin.lng)
            # No view of this level exists yet: its cells are decided now,
            # and nobody is told.
            self._decide_cells(aggregate, set())
        return aggregate

    def _place_pin(self, pin: Pin) -> None:
        pin.tile = tile(pin.lat, pin.lng)
        for aggregate in self.aggregates.values():
            aggregate.place(pin.id, pin.tile, pin.lat, pin.lng)

    def _unplace_pin(self, pin: Pin) -> None:
        for aggregate in self.aggregates.values():
            aggregate.remove(pin.id)

    # What a clustered view shows

    def _clustered_picture(self, group: ClusterGroup) -> tuple[list[Pin], list[bytes]]:
        """The pins and clusters a view of this group shows now."""
        tiles = group.tiles
        pins = self.pins
        found: list[Pin] = []
        clusters: list[bytes] = []
        if not group.clustering:
            shift = tiles.shift
            for pin_id in self.pin_grid.ids_in(_widened(group.bbox)):
                pin = pins[pin_id]
                if pin.tile is not None and tiles.holds(pin.tile[0] >> shift, pin.tile[1] >> shift):
                    found.append(pin)
            return found, clusters
        cells = self.aggregates[tiles.level].cells
        if tiles.count() <= len(cells):
            shown = [cell for cell in map(cells.get, tiles.tiles()) if cell is not None]
        else:
            shown = [cell for key, cell in cells.items() if tiles.holds(*key)]
        for cell in shown:
            if cell.cluster is not None:
                clusters.append(cell.cluster)
            else:
                found.extend(pins[pin_id] for pin_id in cell.ids)
        return found, clusters

    def _shows(self, group: ClusterGroup, top: Optional[tuple[int, int]]) -> bool:
        """Whether the group shows a pin at this tile as a pin (not in a cluster)."""
        if top is None:
            return False
        shift = group.tiles.shift
        key = (top[0] >> shift, top[1] >> shift)
        if not group.tiles.holds(*key):
            return False
        return not group.clustering or not self.aggregates[group.tiles.level].clustered(key)

    # The tick: pins of sparse cells

    def _route_clustered(self, pin: Pin, before: Optional[tuple[float, float]],
                         was: Optional[tuple[int, int]], touched: set[ViewGroup]) -> None:
        """
        A changed pin to the clustered groups that show it (as a pin) now or
        did; `was` is the tile of `before`, where it was last sent.
        """
        now = pin.tile
        assert now is not None
        aggregates = self.aggregates
        pin_id = pin.id
        json = pin.json()
        for level, views in self.cluster_views.items():
            shift = TOP_LEVEL - level
            x_now, y_now = now[0] >> shift, now[1] >> shift
            aggregate = aggregates.get(level)
            if aggregate is None:
                now_shown = True
            else:
                cell = aggregate.cells.get((x_now, y_now))
                now_shown = cell is None or cell.cluster is None
            was_shown = False
            x_was = y_was = -1
            if was is not None:
                x_was, y_was = was[0] >> shift, was[1] >> shift
                if aggregate is None:
                    was_shown = True
                else:
                    cell = aggregate.cells.get((x_was, y_was))
                    was_shown = cell is None or cell.cluster is None
            if not now_shown and not was_shown:
                continue  # in clusters at this level, before and now
            if now_shown and was_shown:
                candidates = views.near(pin.lat, pin.lng, before)
            elif now_shown:
                candidates = [g for groups in views.at(pin.lat, pin.lng) for g in groups]
            else:
                assert before is not None
                candidates = [g for groups in views.at(*before) for g in groups]
            # The hot loop of a big map: once per moved pin and group that
            # may show it (tens per pin on a crowded street).
            add = touched.add
            for group in candidates:
                tiles = group.tiles
                if now_shown and tiles.y_lo <= y_now <= tiles.y_hi and (
                        (x_now >= tiles.x_lo or x_now <= tiles.x_hi) if tiles.wraps
                        else tiles.x_lo <= x_now <= tiles.x_hi):
                    if group.removed:
                        group.removed.pop(pin_id, None)
                    group.upserts[pin_id] = json
                    add(group)
                elif was_shown and tiles.y_lo <= y_was <= tiles.y_hi and (
                        (x_was >= tiles.x_lo or x_was <= tiles.x_hi) if tiles.wraps
                        else tiles.x_lo <= x_was <= tiles.x_hi):
                    group.hide(pin_id)
                    add(group)

    def _route_departed_clustered(self, pin: Pin, before: tuple[float, float],
                                  touched: set[ViewGroup]) -> None:
        was = tile(*before)
        for views in self.cluster_views.values():
            for groups in views.at(*before):
                for group in groups:
                    if self._shows(group, was):
                        group.hide(pin.id)
                        touched.add(group)

    # The cluster pass: cells, on a slower cadence

    def _pass_due(self) -> bool:
        if any(aggregate.dirty for aggregate in self.aggregates.values()):
            return True
        return bool(self.cluster_groups) and self.totals_stale

    def _schedule_pass(self) -> None:
        """A tick for the cluster pass alone, at its own cadence."""
        if self.tick_call is None:
            clock = self.hub.clock
            delay = max(0.0, self.last_pass + self.hub.cluster_interval - clock.seconds())
            self.tick_call = clock.callLater(delay, self.tick)
            self.tick_for_pass = True

    def _note_total_sent(self, group: ClusterGroup) -> None:
        """
        A member of the group was just sent the total in a picture: if the
        group's others hold another, the next pass sends it to them all.
        """
        if group.total_sent != len(self.pins):
            group.total_sent = -1
            self.totals_stale = True
            self._schedule_pass()

    def _cluster_pass(self, touched: set[ViewGroup]) -> None:
        """Decide the dirty cells of every level; tell the groups that show them."""
        now = self.hub.clock.seconds()
        self.last_pass = now
        for level, aggregate in list(self.aggregates.items()):
            if aggregate.unused_since is not None and now - aggregate.unused_since >= 10.0:
                # No view of this level for a while: stop keeping it.
                del self.aggregates[level]
                continue
            self._decide_cells(aggregate, touched)
        total = len(self.pins)
        self.totals_stale = False
        for group in self.cluster_groups.values():
            if group.total_sent != total:
                touched.add(group)

    def _decide_crowded(self, touched: set[ViewGroup]) -> None:
        """Cells that went over K since the last tick become clusters now."""
        for aggregate in self.aggregates.values():
            if aggregate.crowded:
                crowded, aggregate.crowded = aggregate.crowded, set()
                self._decide_cells(aggregate, touched, crowded)

    def _decide_cells(self, aggregate: Aggregate, touched: set[ViewGroup],
                      keys: Optional[set[tuple[int, int]]] = None) -> None:
        """Decide the cells of `keys` (by default every dirty cell, which clears them)."""
        limit = self.hub.cluster_size
        pins = self.pins
        level = aggregate.level
        views = self.cluster_views.get(level)
        cells = aggregate.cells
        if keys is None:
            keys, aggregate.dirty = aggregate.dirty, set()
            aggregate.crowded = set()
        now = self.hub.clock.seconds()
        # A cluster is sent again at most once per cluster_interval: a cell
        # that changed sooner after its last send waits for the next pass.
        later = set()
        for key in keys:
            cell = cells.get(key)
            if cell is None:
                continue
            count = len(cell.ids)
            if count > limit:
                if cell.cluster is not None and count == cell.sent_count:
                    west, south, east, north = tile_box(level, *key)
                    # The kept sums may drift by far less than this margin.
                    if (abs(cell.sum_lat / count - cell.sent_lat)
                            <= (north - south) * CENTRE_MOVE * 0.999
                            and abs(cell.sum_lng / count - cell.sent_lng)
                            <= (east - west) * CENTRE_MOVE * 0.999):
                        continue
                if cell.cluster is not None and now - cell.sent_at < (
                        self.hub.cluster_interval - 1e-9):
                    later.add(key)
                    continue
                members = [pins[pin_id] for pin_id in cell.ids]
                cell.sum_lat = sum(pin.lat for pin in members)
                cell.sum_lng = sum(pin.lng for pin in members)
                lat, lng = cell.sum_lat / count, cell.sum_lng / count
                became = cell.cluster is None
                cell.cluster = wire.cluster_json(
                    cell.name, lat, lng, count,
                    (min(pin.lng for pin in members), min(pin.lat for pin in members),
                     max(pin.lng for pin in members), max(pin.lat for pin in members)))
                cell.sent_count, cell.sent_lat, cell.sent_lng = count, lat, lng
                cell.sent_at = now
                if views is not None:
                    for group in self._groups_of_cell(views, level, key):
                        group.clusters[cell.name] = cell.cluster
                        group.removed.pop(cell.name, None)
                        if became:
                            for pin_id in cell.ids:
                                group.hide(pin_id)
                        touched.add(group)
                continue
            if cell.cluster is not None:
                cell.cluster = None
                if views is not None:
                    for group in self._groups_of_cell(views, level, key):
                        group.hide(cell.name)
                        for pin_id in cell.ids:
                            group.show(pin_id, pins[pin_id].json())
                        touched.add(group)
            if count == 0:
                del cells[key]
        if later:
            aggregate.dirty |= later

    @staticmethod
    def _groups_of_cell(views: ViewIndex[ClusterGroup], level: int,
                        key: tuple[int, int]) -> list[ClusterGroup]:
        west, south, east, north = tile_box(level, *key)
        lat, lng = (south + north) / 2, (west + east) / 2
        return [group for groups in views.at(lat, lng) for group in groups
                if group.tiles.holds(*key)]

    def _flush_clustered(self, group: ClusterGroup) -> None:
        total = len(self.pins)
        payload = wire.encode_update(list(group.upserts.values()), list(group.removed),
                                     list(group.clusters.values()), total)
        group.upserts, group.removed, group.clusters = {}, {}, {}
        group.total_sent = total
        self._broadcast(group.members, payload)


def _widened(bbox: BBox) -> BBox:
    """A box a hair wider, so that points on its edges are found by the degree grids."""
    west, south, east, north = bbox
    margin = 1e-7
    if west <= east and west <= -180.0 + margin and east >= 180.0 - margin:
        return (-180.0, max(-90.0, south - margin), 180.0, min(90.0, north + margin))
    return (max(-180.0, west - margin), max(-90.0, south - margin),
            min(180.0, east + margin), min(90.0, north + margin))
