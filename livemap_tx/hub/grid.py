"""
The spatial indexes of a map: which view groups a point concerns, and which
pins lie inside a box.

Views are indexed on a grid of several levels (cells of 360/2^k degrees,
k = 0 to MAX_LEVEL): a view is put in the finest level at which its box
covers at most CELLS_PER_VIEW cells. A point is looked up once per level in
use, so a pin that moves in a street meets the groups of that street's
views, the groups of the neighbourhood views around it and those of the
city views, not every view of the city: the candidates it is tested
against are about the views that really show it.
"""

from __future__ import annotations

from typing import Generic, Iterable, Iterator, Optional, TypeVar

from ..wire import BBox

# Finest view level: cells of 360/2^18 degrees (about 150 m).
MAX_LEVEL = 18
# A view covers at most this many cells of the level it is indexed at.
CELLS_PER_VIEW = 64
# Pins are indexed at one level: cells of 360/2^14 degrees (about 2.4 km).
PIN_LEVEL = 14

T = TypeVar("T")


class Level:
    """One grid level: cells of `size` degrees, keyed by row * columns + column."""

    __slots__ = ("size", "columns", "rows")

    def __init__(self, k: int) -> None:
        self.size = 360.0 / (1 << k)
        self.columns = 1 << k
        self.rows = max(1, 1 << (k - 1)) if k else 1

    def column(self, lng: float) -> int:
        return min(int((lng + 180.0) // self.size), self.columns - 1)

    def row(self, lat: float) -> int:
        return min(int((lat + 90.0) // self.size), self.rows - 1)

    def key(self, lat: float, lng: float) -> int:
        return self.row(lat) * self.columns + self.column(lng)

    def columns_of(self, west: float, east: float) -> list[range]:
        """The column ranges of a box's span (two when it crosses the antimeridian)."""
        low, high = self.column(west), self.column(east)
        if west <= east:
            return [range(low, high + 1)]
        return [range(low, self.columns), range(0, high + 1)]

    def count(self, bbox: BBox) -> int:
        west, south, east, north = bbox
        rows = self.row(north) - self.row(south) + 1
        return rows * sum(len(span) for span in self.columns_of(west, east))

    def keys(self, bbox: BBox) -> Iterator[int]:
        west, south, east, north = bbox
        for row in range(self.row(south), self.row(north) + 1):
            base = row * self.columns
            for span in self.columns_of(west, east):
                for column in span:
                    yield base + column

    def bounds(self, key: int) -> BBox:
        """The box of a cell."""
        row, column = divmod(key, self.columns)
        west = column * self.size - 180.0
        south = row * self.size - 90.0
        return (west, south, min(180.0, west + self.size), min(90.0, south + self.size))


LEVELS = [Level(k) for k in range(MAX_LEVEL + 1)]


def ring_cells(row: int, column: int, ring: int) -> Iterator[tuple[int, int]]:
    """The (row, column) cells exactly `ring` steps (Chebyshev) from (row, column)."""
    if ring == 0:
        yield row, column
        return
    for c in range(column - ring, column + ring + 1):
        yield row - ring, c
        yield row + ring, c
    for r in range(row - ring + 1, row + ring):
        yield r, column - ring
        yield r, column + ring


def boxes_meet(a: BBox, b: BBox) -> bool:
    """Whether two boxes (either may cross the antimeridian) overlap."""
    if a[1] > b[3] or b[1] > a[3]:
        return False
    return any(lo1 <= hi2 and lo2 <= hi1
               for lo1, hi1 in _spans(a) for lo2, hi2 in _spans(b))


def _spans(box: BBox) -> list[tuple[float, float]]:
    west, _, east, _ = box
    return [(west, east)] if west <= east else [(west, 180.0), (-180.0, east)]


class ViewIndex(Generic[T]):
    """Groups of views by the cells their boxes cover, at the level that fits each box."""

    def __init__(self) -> None:
        # Per level: cell key -> the groups whose box covers that cell.
        self.cells: list[dict[int, set[T]]] = [{} for _ in LEVELS]
        # Levels that hold any group, coarsest first.
        self.active: list[int] = []
        self.placed: dict[T, tuple[int, list[int]]] = {}

    @staticmethod
    def level_for(bbox: BBox) -> int:
        for k in range(MAX_LEVEL, -1, -1):
            if LEVELS[k].count(bbox) <= CELLS_PER_VIEW:
                return k
        return 0

    def add(self, group: T, bbox: BBox) -> None:
        k = self.level_for(bbox)
        keys = list(LEVELS[k].keys(bbox))
        cells = self.cells[k]
        for key in keys:
            cells.setdefault(key, set()).add(group)
        self.placed[group] = (k, keys)
        if k not in self.active:
            self.active = sorted([*self.active, k])

    def remove(self, group: T) -> None:
        placed = self.placed.pop(group, None)
        if placed is None:
            return
        k, keys = placed
        cells = self.cells[k]
        for key in keys:
            found = cells[key]
            found.discard(group)
            if not found:
                del cells[key]
        if not cells:
            self.active = [level for level in self.active if level != k]

    def at(self, lat: float, lng: float) -> list[set[T]]:
        """The sets of groups whose cells hold this point (each group in at most one set)."""
        found = []
        for k in self.active:
            level = LEVELS[k]
            groups = self.cells[k].get(level.key(lat, lng))
            if groups:
                found.append(groups)
        return found

    def near(self, lat: float, lng: float, before: Optional[tuple[float, float]]) -> Iterable[T]:
        """The groups that may show a point now or at `before`, each once."""
        now = self.at(lat, lng)
        if before is None:
            if len(now) == 1:
                return now[0]
            return [group for groups in now for group in groups]
        was = self.at(*before)
        if len(was) == len(now) and all(a is b for a, b in zip(was, now)):
            return [group for groups in now for group in groups]
        return set().union(*now, *was)

    def empty(self) -> bool:
        return not self.placed and not any(self.cells)


class PinGrid:
    """Pin ids by cell, to find the pins inside a box without looking at every pin."""

    level = LEVELS[PIN_LEVEL]

    def __init__(self) -> None:
        self.cells: dict[int, set[str]] = {}

    def key(self, lat: float, lng: float) -> int:
        return self.level.key(lat, lng)

    def add(self, key: int, pin_id: str) -> None:
        self.cells.setdefault(key, set()).add(pin_id)

    def discard(self, key: int, pin_id: str) -> None:
        ids = self.cells[key]
        ids.discard(pin_id)
        if not ids:
            del self.cells[key]

    def ids_in(self, bbox: BBox) -> Iterator[str]:
        """Ids of the pins in the cells a box touches (the caller tests each pin)."""
        level = self.level
        if level.count(bbox) <= len(self.cells):
            for key in level.keys(bbox):
                yield from self.cells.get(key, ())
        else:
            for key, ids in self.cells.items():
                if boxes_meet(level.bounds(key), bbox):
                    yield from ids

    def __bool__(self) -> bool:
        return bool(self.cells)
