"""
The people search of big maps (`GET /api/maps/{map}/people`): a page that
is sent only what it shows still finds anyone on the map by name, nearest
first.

It runs on the reactor, so its cost must not grow with the map: each map
files its pins by folded name (`Names`, kept by membership.py on every
join, rename and departure), so a search reads the map's distinct names
once (at C speed) and only the pins they match. When a search matches many
(a short or empty `q`), the nearest are found ring by ring in the map's
pin grid around `near`, not by measuring every match.
"""

from __future__ import annotations

import heapq
import math
from itertools import chain, islice
from typing import Callable, Iterable, Mapping, Optional

from .grid import PinGrid, ring_cells
from .pins import Pin

DEFAULT_LIMIT = 50
MAX_LIMIT = 200
MAX_QUERY_CHARS = 64
# Searches one client address may make (GET /api/maps/{map}/people): a
# burst (a venue behind one NAT address, everyone typing a name), then
# SEARCH_RATE a second (--search-rate); past that 429 with a Retry-After.
SEARCH_BURST = 30
SEARCH_RATE = 5.0
# Up to this many matches are simply measured; past it the grid's rings
# find the nearest (measuring is cheaper than walking rings until then).
MEASURE_UP_TO = 1000


class BadQuery(ValueError):
    """A search parameter that cannot be read; the message says which."""


def parse(q: Optional[str], near: Optional[str],
          limit: Optional[str]) -> tuple[str, Optional[tuple[float, float]], int]:
    """The search's text, point and limit from the query string's values."""
    text = (q or "").strip()
    if len(text) > MAX_QUERY_CHARS:
        raise BadQuery(f"'q' must be at most {MAX_QUERY_CHARS} characters")
    point = None
    if near:
        parts = near.split(",")
        try:
            if len(parts) != 2:
                raise ValueError
            lat, lng = float(parts[0]), float(parts[1])
        except ValueError:
            raise BadQuery("'near' must be LAT,LNG") from None
        if not (-90.0 <= lat <= 90.0 and -180.0 <= lng <= 180.0):
            raise BadQuery("'near' must be a latitude in [-90, 90] and a longitude in [-180, 180]")
        point = (lat, lng)
    count = DEFAULT_LIMIT
    if limit:
        try:
            count = int(limit)
        except ValueError:
            raise BadQuery("'limit' must be an integer") from None
        if count < 1:
            raise BadQuery("'limit' must be at least 1")
        count = min(count, MAX_LIMIT)
    return text, point, count


def _distance(lat: float, lng: float, point: tuple[float, float]) -> float:
    """Squared equirectangular distance, in degrees: enough to order by."""
    dlng = abs(lng - point[1])
    dlng = min(dlng, 360.0 - dlng) * math.cos(math.radians((lat + point[0]) / 2))
    return (lat - point[0]) ** 2 + dlng ** 2


class Names:
    """A map's pins by folded name (unnamed: ""), kept current by the map's membership."""

    __slots__ = ("by_name", "filed")

    def __init__(self) -> None:
        self.by_name: dict[str, dict[str, Pin]] = {}
        # pin id -> (its name as filed, that name folded)
        self.filed: dict[str, tuple[Optional[str], str]] = {}

    def put(self, pin: Pin) -> None:
        """File a new pin, or one whose name may have changed."""
        was = self.filed.get(pin.id)
        if was is not None:
            if was[0] == pin.name:
                self.by_name[was[1]][pin.id] = pin
                return
            self.drop(pin)
        folded = pin.name.casefold() if pin.name else ""
        self.filed[pin.id] = (pin.name, folded)
        self.by_name.setdefault(folded, {})[pin.id] = pin

    def drop(self, pin: Pin) -> None:
        was = self.filed.pop(pin.id, None)
        if was is None:
            return
        group = self.by_name[was[1]]
        group.pop(pin.id, None)
        if not group:
            del self.by_name[was[1]]

    def matching(self, needle: str) -> list[dict[str, Pin]]:
        """The groups of pins whose folded name contains `needle` (folded)."""
        return [group for name, group in self.by_name.items() if needle in name]

    def folded(self, pin_id: str) -> str:
        was = self.filed.get(pin_id)
        return "" if was is None else was[1]


def search(pins: Mapping[str, Pin], names: Names, grid: PinGrid, text: str,
           point: Optional[tuple[float, float]], limit: int) -> list[dict]:
    """Pins whose name contains `text` (any case), nearest to `point` first, at most `limit`."""
    needle = text.casefold()
    if needle:
        groups = names.matching(needle)
        count = sum(map(len, groups))
        found: Iterable[Pin] = chain.from_iterable(group.values() for group in groups)
    else:
        count, found = len(pins), pins.values()
    if point is None:
        chosen = list(islice(found, limit))
    elif count <= MEASURE_UP_TO:
        chosen = heapq.nsmallest(limit, found, key=lambda pin: _distance(pin.lat, pin.lng, point))
    else:
        chosen = _nearest_in_grid(pins, grid, point, limit,
                                  lambda pin_id: needle in names.folded(pin_id), found)
    return [pin.as_dict() for pin in chosen]


def _nearest_in_grid(pins: Mapping[str, Pin], grid: PinGrid, point: tuple[float, float],
                     limit: int, wanted: Callable[[str], bool],
                     found: Iterable[Pin]) -> list[Pin]:
    """
    The `limit` nearest wanted pins, visiting the grid's cells ring by ring
    from `point`'s until no unvisited cell can hold a nearer one; measuring
    every match instead when the rings would visit more cells than the grid
    holds (the matches are spread far from `point`).
    """
    level = grid.level
    row, column = level.row(point[0]), level.column(point[1])
    cells = grid.cells
    # The nearest so far, as a max-heap (distances negated; then the order met).
    best: list[tuple[float, int, Pin]] = []
    met = 0
    ring = 0
    while True:
        if (2 * ring + 1) ** 2 > 4 * len(cells) or ring > level.columns // 2:
            return heapq.nsmallest(limit, found,
                                   key=lambda pin: _distance(pin.lat, pin.lng, point))
        for r, c in ring_cells(row, column, ring):
            if not 0 <= r < level.rows:
                continue
            for pin_id in cells.get(r * level.columns + c % level.columns, ()):
                pin = pins.get(pin_id)
                if pin is None or not wanted(pin_id):
                    continue
                met += 1
                entry = (-_distance(pin.lat, pin.lng, point), -met, pin)
                if len(best) < limit:
                    heapq.heappush(best, entry)
                elif entry[0] > best[0][0]:
                    heapq.heapreplace(best, entry)
        if len(best) >= limit:
            # Every unvisited cell is `ring` whole cells away or more, along
            # latitude or along longitude (shrunk by the cosine of the
            # highest latitude it may lie at).
            reach = (ring + 1) * level.size
            shrink = math.cos(math.radians(min(90.0, abs(point[0]) + reach)))
            if -best[0][0] <= (ring * level.size * shrink) ** 2:
                break
        ring += 1
    return [pin for _, _, pin in sorted(best, key=lambda entry: (-entry[0], -entry[1]))]
