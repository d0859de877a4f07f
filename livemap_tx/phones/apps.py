"""
The phone apps' own formats, read as they send them: OwnTracks (HTTP
mode), the OsmAnd protocol (Traccar Client 10's form posts and the classic
client's queries, OsmAnd, GPSLogger's custom URL, and Traccar Client 9's
JSON body) and Overland's GeoJSON batches.

Pure functions: a request's parts in, a device token and `Fix`es out, or
`BadReport` with a short reason (answered 400). Units become livemap's:
degrees, metres, milliseconds since the epoch, battery in percent, a
heading in [0, 360) or None. Every number is checked against the range it
can have (wire.py's limits): a position out of range is refused, any other
number out of range is unknown, so that nothing one app sends can break
what the server sends anyone else. Also the OwnTracks answer that shows
the map's other people as Friends.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import heapq
import json
import math
import struct
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional
from urllib.parse import quote

import orjson

from .. import wire
from ..hub.grid import ring_cells
from .devices import MAX_FUTURE, Fix

# An Overland batch holds at most this many points.
MAX_BATCH = 1000
# Bodies read at most (413 over): one report, or one Overland batch.
MAX_REPORT_BYTES = 16 * 1024
MAX_BATCH_BYTES = 2 * 1024 * 1024
TID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
# Friends in one OwnTracks answer, nearest first (--max-friends).
DEFAULT_MAX_FRIENDS = 100
# A speed over this (in any app's unit) is nonsense: unknown.
MAX_SPEED = 10_000.0
# Times from before this are nonsense (a clock at zero), ms since the epoch.
EARLIEST_MS = 946_684_800_000  # 2000-01-01


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
    if isinstance(value, int):
        # A JSON integer may have any number of digits (10**400).
        number = float(value) if abs(value) < 2**1000 else math.inf
    elif isinstance(value, float):
        number = value
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


def _optional(value: Any, low: float, high: float) -> Optional[float]:
    """A number in [low, high], or None: absent, not a number, or out of range."""
    try:
        number = _number(value, "value")
    except BadReport:
        return None
    return number if number is not None and low <= number <= high else None


def _heading(value: Any, speed: Any = None) -> Optional[float]:
    """
    Degrees clockwise from north in [0, 360), or None where the app has
    none: its -1 or nonsense, a speed of 0 (standing still, the bearing is
    stale), or a bearing of exactly 0 without a speed above 0 (Android's
    Location gives 0 when it has no bearing, and OsmAnd, GPSLogger and
    OwnTracks Android send it as it is).
    """
    heading = _optional(value, 0.0, 360.0)
    moving = _optional(speed, 0.0, MAX_SPEED)
    if heading is None or moving == 0.0 or (heading == 0.0 and not moving):
        return None
    return heading % 360.0


def _accuracy(value: Any) -> Optional[float]:
    return _optional(value, 0.0, wire.MAX_ACCURACY)


def _percent(value: Any, fraction: bool = False) -> Optional[int]:
    """Battery in percent, from 0..100 or (`fraction`) 0..1; None if unknown."""
    level = _optional(value, 0.0, 1.0 if fraction else 100.0)
    if level is None:
        return None
    return int(round(level * 100 if fraction else level))


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
        return _in_time_range(moment.timestamp() * 1000, what)
    number = _number(value, what)
    if number is None:
        raise BadReport(f"{what} is required")
    if number < 0:
        raise BadReport(f"{what} must not be negative")
    return _in_time_range(number if number >= 2**31 - 1 else number * 1000, what)


def _in_time_range(milliseconds: float, what: str) -> int:
    if milliseconds < EARLIEST_MS:
        raise BadReport(f"{what} is before the year 2000")
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
        # orjson is strict; the standard parser also reads NaN, Infinity and
        # integers beyond 64 bits, so that a batch with one such number is
        # a batch with one bad point (skipped), not a body refused forever.
        try:
            decoded = json.loads(body)
        except (ValueError, RecursionError):
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
    # `vel` is km/h; Android sends `cog` 0 and `vel` 0 when it has neither.
    return Fix(lat, lng, timestamp_ms(message.get("tst"), "tst"), "owntracks",
               accuracy=_accuracy(message.get("acc")),
               heading=_heading(message.get("cog"), message.get("vel")),
               battery=_percent(message.get("batt")),
               tid=tid if isinstance(tid, str) and 1 <= len(tid) <= 2 else None)


TID_LENGTHS = (2, 3, 4, 6)


def _tid_candidates(pin_id: str, length: int, tries: int) -> Iterator[str]:
    """`tries` tids of `length` characters for a pin, drawn from its id."""
    base = len(TID_ALPHABET)
    for attempt in range(tries):
        digest = hashlib.sha256(f"{length}:{attempt}:{pin_id}".encode()).digest()
        number = int.from_bytes(digest[:8], "big") % base ** length
        tid = ""
        for _ in range(length):
            number, digit = divmod(number, base)
            tid += TID_ALPHABET[digit]
        yield tid


class MapTids:
    """
    The tids given out on one map, each to one pin only (the apps key a
    friend by its tid in HTTP mode: they make up `owntracks/http/TID` as its
    topic), kept while the pin lasts. Looking one up or giving one out costs
    the same whatever the map's size.
    """

    def __init__(self) -> None:
        self.of: dict[str, str] = {}
        self.owner: dict[str, str] = {}
        # Tids given out by length: a length three quarters full is skipped,
        # so a new tid takes a few tries on any map.
        self.used = dict.fromkeys(TID_LENGTHS, 0)

    def claim(self, pin_id: str, tid: str) -> None:
        """A device keeps the tid it sends; a pin that had it gets another when next shown."""
        if self.of.get(pin_id) == tid:
            return
        holder = self.owner.get(tid)
        if holder is not None:
            self._drop(holder)
        if pin_id in self.of:
            self._drop(pin_id)
        self._give(pin_id, tid)

    def tid(self, pin_id: str) -> str:
        tid = self.of.get(pin_id)
        if tid is None:
            tid = self._free(pin_id)
            self._give(pin_id, tid)
        return tid

    def _free(self, pin_id: str) -> str:
        base = len(TID_ALPHABET)
        for length in TID_LENGTHS:
            if self.used.get(length, 0) < base ** length * 3 // 4:
                for tid in _tid_candidates(pin_id, length, 8):
                    if tid not in self.owner:
                        return tid
        # Six characters are 2 billion tids: this ends in a try or two.
        attempt = 8
        while True:
            for tid in _tid_candidates(f"{attempt}/{pin_id}", 6, 8):
                if tid not in self.owner:
                    return tid
            attempt += 1

    def _give(self, pin_id: str, tid: str) -> None:
        self.of[pin_id] = tid
        self.owner[tid] = pin_id
        self.used[len(tid)] = self.used.get(len(tid), 0) + 1

    def _drop(self, pin_id: str) -> None:
        tid = self.of.pop(pin_id)
        del self.owner[tid]
        self.used[len(tid)] -= 1

    def prune(self, present: Mapping[str, Any]) -> None:
        """Forget the pins that left, once they make up half of the book (amortized)."""
        if len(self.of) > 2 * len(present) + 64:
            self.of = {pin_id: tid for pin_id, tid in self.of.items() if pin_id in present}
            self.owner = {tid: pin_id for pin_id, tid in self.of.items()}
            self.used = dict.fromkeys(TID_LENGTHS, 0)
            for tid in self.owner:
                self.used[len(tid)] = self.used.get(len(tid), 0) + 1


def _distance(lat: float, lng: float, pin: Any) -> float:
    """Degrees of latitude apart (equirectangular: good enough to rank neighbours)."""
    across = abs(lng - pin.lng)
    if across > 180.0:
        across = 360.0 - across
    return math.hypot(lat - pin.lat, across * math.cos(math.radians(lat)))


class Neighbours:
    """
    A map's pins in a grid, so that the nearest ones are found without
    walking every pin. Built in one pass (`Friends` rebuilds it at most
    every few seconds, or when the map's size changed by an eighth); the
    pins' own positions are read when asked, so a pin that moved since is
    ranked where it is now, only looked for in the cell it was in.
    """

    # Pins a cell holds on average, for a map spread evenly over its box.
    PER_CELL = 8

    def __init__(self, pins: Iterable[Any], built: float) -> None:
        self.built = built
        listed = list(pins)
        self.size = len(listed)
        self.cells: dict[tuple[int, int], list[Any]] = {}
        if not listed:
            self.cell = 1.0
            self.bounds = (0, 0, 0, 0)
            return
        south, north = min(p.lat for p in listed), max(p.lat for p in listed)
        west, east = min(p.lng for p in listed), max(p.lng for p in listed)
        area = max((north - south) * (east - west), 1e-8)
        self.cell = max(math.sqrt(area * self.PER_CELL / len(listed)), 1e-4)
        for pin in listed:
            self.cells.setdefault(self._key(pin.lat, pin.lng), []).append(pin)
        rows = [key[0] for key in self.cells]
        cols = [key[1] for key in self.cells]
        self.bounds = (min(rows), max(rows), min(cols), max(cols))

    def _key(self, lat: float, lng: float) -> tuple[int, int]:
        return math.floor(lat / self.cell), math.floor(lng / self.cell)

    def nearest(self, lat: float, lng: float, limit: int,
                wanted: Callable[[Any], bool]) -> list[Any]:
        """Up to `limit` pins for which `wanted` holds, nearest first, ring by ring."""
        if limit <= 0 or not self.cells:
            return []
        row, col = self._key(lat, lng)
        low_row, high_row, low_col, high_col = self.bounds
        last_ring = max(abs(row - low_row), abs(row - high_row),
                        abs(col - low_col), abs(col - high_col))
        scale = max(math.cos(math.radians(lat)), 1e-3)
        found: list[tuple[float, int, Any]] = []
        for ring in range(last_ring + 1):
            if (2 * ring + 1) ** 2 > 4 * len(self.cells):
                # The rings would visit more empty cells than there are
                # pins (an asker far from everyone, or a grid made when the
                # map was one spot): rank every pin instead, once.
                found = [(_distance(lat, lng, pin), n, pin)
                         for n, pin in enumerate(p for pins in self.cells.values()
                                                 for p in pins if wanted(p))]
                break
            for key in ring_cells(row, col, ring):
                for pin in self.cells.get(key, ()):
                    if wanted(pin):
                        found.append((_distance(lat, lng, pin), len(found), pin))
            if len(found) >= limit:
                # Every pin further out is at least this far.
                if heapq.nsmallest(limit, found)[-1][0] <= ring * self.cell * scale:
                    break
        return [pin for _, _, pin in heapq.nsmallest(limit, found)]


class Friends:
    """
    What an OwnTracks device is shown of its map: the `max_friends` people
    nearest to it, each under a tid of its own, never the device itself
    (the apps do not filter out their own entry: the user would see
    themself twice). Its cost does not grow with the map's size: neighbours
    come from a grid rebuilt at most every `refresh` seconds, tids from a
    per-map book (the maps least recently asked about go past `max_maps`).
    """

    def __init__(self, max_friends: int = DEFAULT_MAX_FRIENDS, refresh: float = 2.0,
                 max_maps: int = 10_000) -> None:
        self.max_friends = max_friends
        self.refresh = refresh
        self.max_maps = max_maps
        self.maps: dict[str, tuple[MapTids, Optional[Neighbours]]] = {}

    def answer(self, map_name: str, pins: Mapping[str, Any], own_id: str,
               own_tid: Optional[str], lat: float, lng: float, now: float) -> bytes:
        """`pins`: the map's pins by id (objects with the PIN's attributes and `as_dict()`)."""
        book, index = self.maps.pop(map_name, (MapTids(), None))
        if (index is None or now - index.built >= self.refresh
                or abs(len(pins) - index.size) > index.size // 8 + 8):
            index = Neighbours(pins.values(), now)
        self.maps[map_name] = (book, index)
        while len(self.maps) > self.max_maps:
            del self.maps[next(iter(self.maps))]
        book.prune(pins)
        if own_tid:
            book.claim(own_id, own_tid)
        else:
            book.tid(own_id)  # kept from the others, so that none shows under it
        nearest = index.nearest(
            lat, lng, self.max_friends,
            lambda pin: pin.id != own_id and pins.get(pin.id) is pin)
        shown = [pin.as_dict() for pin in nearest]
        return owntracks_friends(shown, {pin["id"]: book.tid(pin["id"]) for pin in shown})


def _whole(value: Any, low: float, high: float) -> Optional[int]:
    """An integer for iOS's schema, or None for what is not a finite number in range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return int(round(value)) if low <= value <= high else None


def owntracks_friends(pins: list[dict], assigned: dict[str, str]) -> bytes:
    """
    The answer to a location: each pin as an OwnTracks `card` and
    `location`, so the map's people appear as Friends. iOS checks the whole
    answer against its schema (a card needs `face` and `name`, numbers are
    integers) and drops all of it if one object fails; a value out of its
    range is left out, so that one pin can never spoil the answer (a pin
    without a position is not shown). `assigned` holds each pin's tid.
    """
    answer: list[dict] = []
    for pin in pins:
        lat, lng = pin.get("lat"), pin.get("lng")
        if _whole(lat, -90.0, 90.0) is None or _whole(lng, -180.0, 180.0) is None:
            continue
        tid = assigned[pin["id"]]
        if pin.get("name"):
            answer.append({"_type": "card", "tid": tid, "name": pin["name"],
                           "face": face(pin["id"])})
        milliseconds = _whole(pin.get("ts"), 0.0, 1e15) or 0
        location: dict[str, Any] = {"_type": "location", "tid": tid, "lat": lat, "lon": lng,
                                    "tst": max(1, milliseconds // 1000)}
        extras = (("acc", pin.get("accuracy"), 0.0, wire.MAX_ACCURACY),
                  ("cog", pin.get("heading"), 0.0, 360.0),
                  ("batt", pin.get("battery"), 0.0, 100.0))
        for key, value, low, high in extras:
            number = _whole(value, low, high)
            if number is not None:
                location[key] = number % 360 if key == "cog" else number
        answer.append(location)
    return orjson.dumps(answer)


@functools.lru_cache(maxsize=20_000)
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
                      heading=_heading(params.get("bearing", params.get("heading")),
                                       params.get("speed")),
                      battery=_percent(params.get("batt")))


def parse_traccar_json(body: bytes) -> tuple[str, Fix]:
    """
    Traccar Client 9's JSON body (its Flutter app posts the background
    geolocation SDK's location as JSON, `device_id` beside it):
    `{"device_id", "location": {...}}`.
    """
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
                      heading=_heading(coords.get("heading"), coords.get("speed")),
                      battery=_percent(level, fraction=True))


# Overland


@dataclass(frozen=True)
class Batch:
    """What an Overland batch comes to: the newest usable fix, and how many points were not usable."""

    fix: Optional[Fix]
    skipped: int


def parse_overland(body: bytes, now_ms: int) -> Batch:
    """
    A batch of GeoJSON points, and `current` (the app's latest fix, which
    it adds when its queue holds more than one batch): the newest usable
    one. A point that cannot be used (no position, a bad time, more than
    MAX_FUTURE ahead of `now_ms`) is skipped and counted: a refused batch
    is sent again forever. Trip summaries and log actions are not points
    and are not counted. Only a body that is not a batch at all is refused.
    """
    message = _json_object(body, "the body")
    points = message.get("locations")
    if not isinstance(points, list):
        raise BadReport("locations must be a list")
    if len(points) > MAX_BATCH:
        raise BadReport(f"at most {MAX_BATCH} locations in a batch")
    newest: Optional[Fix] = None
    skipped = 0
    current = message.get("current")
    for point in [*points, current] if current is not None else points:
        try:
            fix = _overland_point(point)
        except BadReport:
            skipped += 1
            continue
        if fix is None:
            continue
        if fix.ts > now_ms + MAX_FUTURE * 1000:
            skipped += 1
        elif newest is None or fix.ts > newest.ts:
            newest = fix
    return Batch(newest, skipped)


def _overland_point(point: Any) -> Optional[Fix]:
    """
    A point of the batch; None for what is not one (the app also sends
    trip summaries and log actions, some without geometry); BadReport for
    a point that cannot be used.
    """
    if not isinstance(point, dict):
        raise BadReport("a location is not an object")
    geometry, properties = point.get("geometry"), point.get("properties")
    if not isinstance(properties, dict):
        raise BadReport("a location has no properties")
    if properties.get("type") == "trip" or "action" in properties:
        return None
    if not isinstance(geometry, dict):
        raise BadReport("a location has no geometry")
    coordinates = geometry.get("coordinates")
    if (geometry.get("type") != "Point" or not isinstance(coordinates, list)
            or len(coordinates) < 2):
        raise BadReport("a location is not a point")
    lat, lng = _position(coordinates[1], coordinates[0])
    return Fix(lat, lng, timestamp_ms(properties.get("timestamp")), "overland",
               accuracy=_accuracy(properties.get("horizontal_accuracy")),
               heading=_heading(properties.get("course"), properties.get("speed")),
               battery=_percent(properties.get("battery_level"), fraction=True))
