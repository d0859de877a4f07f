"""
The people search of big maps (`GET /api/maps/{map}/people`): a page that
is sent only what it shows still finds anyone on the map by name, nearest
first. Pure functions over the hub's pins.
"""

from __future__ import annotations

import heapq
import math
from typing import Iterable, Optional

from .pins import Pin

DEFAULT_LIMIT = 50
MAX_LIMIT = 200
MAX_QUERY_CHARS = 64


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


def search(pins: Iterable[Pin], text: str, point: Optional[tuple[float, float]],
           limit: int) -> list[dict]:
    """Pins whose name contains `text` (any case), nearest to `point` first, at most `limit`."""
    needle = text.casefold()
    found = (pin for pin in pins
             if not needle or (pin.name is not None and needle in pin.name.casefold()))
    if point is None:
        chosen = []
        for pin in found:
            chosen.append(pin)
            if len(chosen) >= limit:
                break
    else:
        chosen = heapq.nsmallest(limit, found, key=lambda pin: _distance(pin.lat, pin.lng, point))
    return [pin.as_dict() for pin in chosen]
