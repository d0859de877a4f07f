"""
The phone apps' own formats, read as they send them: OwnTracks (HTTP
mode), the OsmAnd protocol (Traccar Client, OsmAnd, GPSLogger's custom
URL, and Traccar Client 9's JSON body) and Overland's GeoJSON batches.

Pure functions: a request's parts in, a device token and `Fix`es out, or
`BadReport` with a short reason (answered 400). Units become livemap's:
degrees, metres, milliseconds since the epoch, battery in percent, a
heading in [0, 360) or None. Also the OwnTracks answer that shows the
map's other people as Friends.
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
import zlib
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Optional
from urllib.parse import quote

import orjson

from .devices import Fix

# An Overland batch holds at most this many points.
MAX_BATCH = 1000
# Bodies read at most (413 over): one report, or one Overland batch.
MAX_REPORT_BYTES = 16 * 1024
MAX_BATCH_BYTES = 2 * 1024 * 1024
TID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


class BadReport(Exception):
    """A report that is not in the app's format: 400 with `reason`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# Values


def _number(value: Any, what: str) -> Optional[float]:
    """A finite number, from a JSON number or a decimal string; None if absent."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise BadReport(f"{what} must be a number")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str) and len(value) <= 64:
        try:
            number = float(value.strip())
        except ValueError:
            raise BadReport(f"{what} must be a number") from None
    else:
        raise BadReport(f"{what} must be a number")
    if not math.isfinite(number):
        raise BadReport(f"{what} must be finite")
    return number


def _position(lat: Any, lng: Any) -> tuple[float, float]:
    latitude, longitude = _number(lat, "latitude"), _number(lng, "longitude")
    if latitude is None or longitude is None:
        raise BadReport("latitude and longitude are required")
    if not -90.0 <= latitude <= 90.0 or not -180.0 <= longitude <= 180.0:
        raise BadReport("latitude must be in [-90, 90] and longitude in [-180, 180]")
    return latitude, longitude


def _heading(value: Any) -> Optional[float]:
    """Degrees clockwise from north in [0, 360); the apps' -1 (and nonsense) is unknown."""
    try:
        heading = _number(value, "heading")
    except BadReport:
        return None
    if heading is None or heading < 0 or heading > 3600:
        return None
    return heading % 360.0


def _accuracy(value: Any) -> Optional[float]:
    try:
        accuracy = _number(value, "accuracy")
    except BadReport:
        return None
    return accuracy if accuracy is not None and accuracy >= 0 else None


def _percent(value: Any, fraction: bool = False) -> Optional[int]:
    """Battery in percent, from 0..100 or (`fraction`) 0..1; None if unknown."""
    try:
        level = _number(value, "battery")
    except BadReport:
        return None
    if level is None or level < 0:
        return None
    if fraction:
        level *= 100
    return int(round(min(level, 100.0)))


def timestamp_ms(value: Any, what: str = "timestamp") -> int:
    """
    Epoch seconds, epoch milliseconds (any number from 2^31 up, as Traccar
    reads them), ISO 8601 or `yyyy-MM-dd HH:mm:ss` (a time without an
    offset is UTC).
    """
    if isinstance(value, str) and value.strip() and not _is_decimal(value.strip()):
        text = value.strip()
        if len(text) > 40:
            raise BadReport(f"{what} is not a time")
        try:
            moment = datetime.fromisoformat(text.replace(" ", "T", 1) if "T" not in text else text)
        except ValueError:
            raise BadReport(f"{what} is not an ISO 8601 time") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        return int(moment.timestamp() * 1000)
    number = _number(value, what)
    if number is None:
        raise BadReport(f"{what} is required")
    if number < 0:
        raise BadReport(f"{what} must not be negative")
    milliseconds = number if number >= 2**31 - 1 else number * 1000
    if milliseconds > 1e15:
        raise BadReport(f"{what} is too far in the future")
    return int(milliseconds)


def _is_decimal(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _json_object(body: bytes, what: str) -> dict:
    try:
        decoded = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadReport(f"{what} is not JSON") from None
    if not isinstance(decoded, dict):
        raise BadReport(f"{what} must be a JSON object")
    return decoded


# OwnTracks, HTTP mode


def parse_owntracks(body: bytes) -> Optional[Fix]:
    """
    One OwnTracks message: a Fix for `_type: "location"`, None for any other
    type or an empty body (the app is answered `[]`).
    """
    if not body.strip():
        return None
    message = _json_object(body, "the body")
    if message.get("_type") != "location":
        return None
    lat, lng = _position(message.get("lat"), message.get("lon"))
    tid = message.get("tid")
    return Fix(lat, lng, timestamp_ms(message.get("tst"), "tst"), "owntracks",
               accuracy=_accuracy(message.get("acc")), heading=_heading(message.get("cog")),
               battery=_percent(message.get("batt")),
               tid=tid if isinstance(tid, str) and 1 <= len(tid) <= 2 else None)


def _tid_candidates(pin_id: str) -> Iterable[str]:
    """Every two-character tid, in an order drawn from the pin's id."""
    digest = hashlib.sha256(pin_id.encode()).digest()
    size = len(TID_ALPHABET) ** 2
    start = int.from_bytes(digest[:4], "big") % size
    # A step coprime with 36*36 visits every tid once (double hashing).
    step = (int.from_bytes(digest[4:8], "big") % (size // 6)) * 6 + 1
    for n in range(size):
        number = (start + n * step) % size
        yield TID_ALPHABET[number // len(TID_ALPHABET)] + TID_ALPHABET[number % len(TID_ALPHABET)]


def tids(pin_ids: Iterable[str], own_id: Optional[str], own_tid: Optional[str],
         before: Optional[dict[str, str]] = None) -> dict[str, str]:
    """
    A two-character tracker id for each pin, unique on the map (the apps
    key friends by it), the device itself keeping the one it sent. A pin
    keeps the tid it had `before` unless the device took it; a new pin
    takes the first free tid of a sequence drawn from its id, in the order
    of the ids, so that nodes that see the same pins give the same tids.
    """
    present = set(pin_ids)
    taken: dict[str, str] = {}
    used: set[str] = set()
    if own_id is not None and own_id in present and own_tid:
        taken[own_id] = own_tid
        used.add(own_tid)
    for pin_id, tid in sorted((before or {}).items()):
        if pin_id in present and pin_id not in taken and tid not in used:
            taken[pin_id] = tid
            used.add(tid)
    for pin_id in sorted(present - set(taken)):
        tid = next((t for t in _tid_candidates(pin_id) if t not in used), "??")
        taken[pin_id] = tid
        used.add(tid)
    return taken


class TidBook:
    """
    The tids given out on each map, so that they stay while their pins do
    (the maps least recently reported to are forgotten past `max_maps`).
    """

    def __init__(self, max_maps: int = 10_000) -> None:
        self.maps: dict[str, dict[str, str]] = {}
        self.max_maps = max_maps

    def assign(self, map_name: str, pin_ids: list[str], own_id: str,
               own_tid: Optional[str]) -> dict[str, str]:
        assigned = tids(pin_ids, own_id, own_tid, self.maps.pop(map_name, None))
        if assigned:
            self.maps[map_name] = assigned
            while len(self.maps) > self.max_maps:
                del self.maps[next(iter(self.maps))]
        return assigned


def owntracks_friends(pins: list[dict], assigned: dict[str, str]) -> bytes:
    """
    The answer to a location: every pin of the map as an OwnTracks `card`
    and `location`, so the map's people appear as Friends. The apps key a
    friend by its `tid` in HTTP mode (they make up `owntracks/http/TID` as
    its topic), so each pin gets its own; iOS checks the whole answer
    against its schema (a card needs `face` and `name`, numbers are
    integers) and drops all of it if one object fails. `assigned` holds
    each pin's tid (`TidBook`).
    """
    answer: list[dict] = []
    for pin in pins:
        tid = assigned[pin["id"]]
        if pin.get("name"):
            answer.append({"_type": "card", "tid": tid, "name": pin["name"],
                           "face": face(pin["id"])})
        location: dict[str, Any] = {"_type": "location", "tid": tid,
                                    "lat": pin["lat"], "lon": pin["lng"],
                                    "tst": max(1, int(pin["ts"] // 1000))}
        if pin.get("accuracy") is not None:
            location["acc"] = int(round(pin["accuracy"]))
        if pin.get("heading") is not None:
            location["cog"] = int(round(pin["heading"])) % 360
        if pin.get("battery") is not None:
            location["batt"] = int(pin["battery"])
        answer.append(location)
    return orjson.dumps(answer)


def face(pin_id: str, size: int = 40) -> str:
    """A card's picture: a square of a colour drawn from the pin's id, as base64 PNG."""
    red, green, blue = hashlib.sha256(pin_id.encode()).digest()[:3]
    row = b"\x00" + bytes((red // 2 + 64, green // 2 + 64, blue // 2 + 64)) * size
    raw = zlib.compress(row * size, 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    return base64.b64encode(png).decode()


def owntracks_config(url: str, device_name: Optional[str], tid: str) -> str:
    """
    The app's one-tap import of an HTTP-mode configuration with this
    device's URL (the token is in it, so no password is needed). Standard,
    padded base64 (iOS takes nothing else), percent-encoded for links.
    """
    config: dict[str, Any] = {"_type": "configuration", "mode": 3, "url": url,
                              "auth": False, "deviceId": "livemap", "tid": tid}
    inline = base64.b64encode(orjson.dumps(config)).decode()
    return "owntracks:///config?inline=" + quote(inline, safe="")


# The OsmAnd protocol (Traccar Client, OsmAnd, GPSLogger)


def parse_osmand(params: Mapping[str, str], now_ms: int) -> tuple[str, Fix]:
    """
    Query (or form) parameters: the device's token and its fix (at
    `now_ms` when it has no timestamp, as Traccar does).
    """
    token = params.get("id") or params.get("deviceid")
    if not token:
        raise BadReport("id (or deviceid) is required")
    if "lat" in params or "lon" in params:
        lat, lng = _position(params.get("lat"), params.get("lon"))
    elif "location" in params:
        parts = params["location"].split(",")
        if len(parts) != 2:
            raise BadReport("location must be LAT,LON")
        lat, lng = _position(parts[0], parts[1])
    else:
        raise BadReport("lat and lon are required")
    when = params.get("timestamp")
    # OsmAnd's own template sends its accuracy as `hdop`; Traccar Client's
    # older Android sends 0 for a GPS fix: unknown, not perfect.
    accuracy = _accuracy(params.get("accuracy", params.get("hdop")))
    return token, Fix(lat, lng, now_ms if when is None or when == "" else timestamp_ms(when),
                      "osmand", accuracy=accuracy or None,
                      heading=_heading(params.get("bearing", params.get("heading"))),
                      battery=_percent(params.get("batt")))


def parse_traccar_json(body: bytes) -> tuple[str, Fix]:
    """Traccar Client 9's JSON body: `{"device_id", "location": {...}}`."""
    message = _json_object(body, "the body")
    token = message.get("device_id")
    location = message.get("location")
    if not isinstance(token, str) or not token:
        raise BadReport("device_id is required")
    if not isinstance(location, dict):
        raise BadReport("location must be an object")
    coords = location.get("coords")
    if not isinstance(coords, dict):
        raise BadReport("location.coords must be an object")
    lat, lng = _position(coords.get("latitude"), coords.get("longitude"))
    battery = location.get("battery")
    level = battery.get("level") if isinstance(battery, dict) else None
    return token, Fix(lat, lng, timestamp_ms(location.get("timestamp")), "osmand",
                      accuracy=_accuracy(coords.get("accuracy")),
                      heading=_heading(coords.get("heading")),
                      battery=_percent(level, fraction=True))


# Overland


def parse_overland(body: bytes) -> Optional[Fix]:
    """
    A batch of GeoJSON points: the newest valid point (None if there is
    none). Only a body that is not a batch at all is refused.
    """
    message = _json_object(body, "the body")
    points = message.get("locations")
    if not isinstance(points, list):
        raise BadReport("locations must be a list")
    if len(points) > MAX_BATCH:
        raise BadReport(f"at most {MAX_BATCH} locations in a batch")
    newest: Optional[Fix] = None
    for point in points:
        fix = _overland_point(point)
        if fix is not None and (newest is None or fix.ts > newest.ts):
            newest = fix
    return newest


def _overland_point(point: Any) -> Optional[Fix]:
    """
    A point of the batch, or None for what is not one: the app also sends
    trip summaries and log actions (some without geometry), and a point it
    could not fix well. They are skipped, not refused: a refused batch is
    sent again forever.
    """
    if not isinstance(point, dict):
        return None
    geometry, properties = point.get("geometry"), point.get("properties")
    if not isinstance(geometry, dict) or not isinstance(properties, dict):
        return None
    coordinates = geometry.get("coordinates")
    if (geometry.get("type") != "Point" or not isinstance(coordinates, list)
            or len(coordinates) < 2 or properties.get("type") == "trip"):
        return None
    try:
        lat, lng = _position(coordinates[1], coordinates[0])
        when = timestamp_ms(properties.get("timestamp"))
    except BadReport:
        return None
    return Fix(lat, lng, when, "overland",
               accuracy=_accuracy(properties.get("horizontal_accuracy")),
               heading=_heading(properties.get("course")),
               battery=_percent(properties.get("battery_level"), fraction=True))
