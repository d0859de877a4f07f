"""
Coarsening of positions (--precision, and a client's own wish in `hello`):
applied before a position is stored, so the true one is never kept or sent.
"""

from __future__ import annotations

import math

METRES_PER_DEGREE = 111_320.0


def coarsen(lat: float, lng: float, metres: float) -> tuple[float, float]:
    """
    Snap a position to a grid about `metres` wide: latitude in steps of
    `metres`, longitude in steps that are `metres` wide at that latitude.
    """
    if metres <= 0:
        return lat, lng
    lat_step = metres / METRES_PER_DEGREE
    snapped_lat = max(-90.0, min(90.0, round(lat / lat_step) * lat_step))
    width = METRES_PER_DEGREE * math.cos(math.radians(snapped_lat))
    lng_step = min(360.0, metres / width) if width > 1e-6 else 360.0
    snapped_lng = round(lng / lng_step) * lng_step
    if snapped_lng > 180.0:
        snapped_lng -= 360.0
    if snapped_lng < -180.0:
        snapped_lng += 360.0
    return round(snapped_lat, 7), round(snapped_lng, 7)
