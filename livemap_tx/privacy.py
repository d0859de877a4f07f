"""
What the server keeps and writes about people: positions are coarsened
(--precision, and a client's own wish in `hello`) before they are stored,
so the true one is never kept or sent; map names are never written to logs
or metrics (`map_label`), nor in Redis's channels and keys (`map_digest`).
"""

from __future__ import annotations

import hashlib
import math
import secrets

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


# Map names in logs and metrics. A map's name is its only key (a private
# map's link is its name), so nothing the server writes may contain one.
# What is written instead is a keyed digest: the same map gets the same
# label for the life of the process, so an operator can follow it through
# the logs and /metrics, but the key is random and never written, so a
# label cannot be turned back into a name, even a guessable one.
_LABEL_KEY = secrets.token_bytes(16)


def map_label(name: str) -> str:
    """What logs and metrics call a map: `public` as is, any other as `~` + 10 hex digits."""
    if name == "public":
        return name
    digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=5,
                             key=_LABEL_KEY).hexdigest()
    return "~" + digest


def map_digest(name: str) -> str:
    """
    How Redis channels and keys name a map: SHA-1 in hex (Lua scripts compute
    it too, with redis.sha1hex), so a private map's name is in no channel name.
    """
    return hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()
