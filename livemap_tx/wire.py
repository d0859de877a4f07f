"""
The livemap wire protocol (docs/protocol.md, version 1): parse and
validate client messages, encode server messages.

Pure functions and small value classes: nothing here knows about sockets or
Twisted, so the rules can be tested (and fuzzed) directly.

Encoding is built for fan-out: a pin's JSON is encoded once per accepted
state (`pin_json`) and whole messages are assembled by joining those
fragments, so one update serves every subscriber without re-encoding.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Union

import orjson

MAX_MESSAGE_BYTES = 4096
MAX_NAME_CHARS = 64
MAX_SEQ = 2**53
MAX_PRECISION = 100_000.0
# An accuracy (metres) beyond this says nothing: 10,000 km, a quarter of
# the Earth's circumference. Phone apps' larger values are unknown; a move's
# is out_of_range.
MAX_ACCURACY = 10_000_000.0
MAP_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
DEFAULT_MAP = "public"

# Error codes of the protocol's error table.
BAD_JSON = "bad_json"
BAD_MESSAGE = "bad_message"
OUT_OF_RANGE = "out_of_range"
RATE_LIMITED = "rate_limited"
TOO_BIG = "too_big"

# Close codes (RFC 6455) the protocol uses.
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011


def is_map_name(name: str) -> bool:
    """A map name is 1 to 64 characters of A-Z a-z 0-9 _ -."""
    return MAP_NAME.fullmatch(name) is not None


class ProtocolError(Exception):
    """A client message was rejected; `code` is the protocol's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


BBox = tuple[float, float, float, float]


@dataclass(frozen=True, slots=True)
class Move:
    lat: float
    lng: float
    heading: Optional[float]
    accuracy: Optional[float]
    seq: Optional[int]


@dataclass(frozen=True, slots=True)
class Hello:
    name: str
    # livemap's extension: the sender asks for its own positions to be
    # coarsened to about this many metres (docs/protocol.md).
    precision: Optional[float] = None


@dataclass(frozen=True, slots=True)
class View:
    """
    bbox is (west, south, east, north); None is the whole world. With a
    zoom (livemap's extension "clusters", docs/protocol.md) the view is
    clustered: dense cells of the view come as clusters.
    """

    bbox: Optional[BBox]
    zoom: Optional[int] = None


# The zooms a clustered view may give (the page's Web Mercator zoom).
MIN_ZOOM, MAX_ZOOM = 0, 22


Message = Union[Move, Hello, View]


def _loads(payload: Union[bytes, str]) -> object:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        # orjson is strict; the standard parser also reads NaN, Infinity and
        # integers beyond 64 bits, which must be answered with out_of_range
        # rather than bad_json.  Only the error path pays for it.
        try:
            return json.loads(payload)
        except (ValueError, RecursionError):
            raise ProtocolError(BAD_JSON, "frame is not valid JSON") from None


def _number(obj: dict, key: str, low: float, high: float, *,
            high_open: bool = False, optional: bool = False) -> Optional[float]:
    value = obj.get(key)
    if value is None:
        if optional:
            return None
        raise ProtocolError(BAD_MESSAGE, f"'{key}' is required")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(BAD_MESSAGE, f"'{key}' must be a number")
    if isinstance(value, int):
        value = float(value) if abs(value) < 2**63 else math.inf
    if not math.isfinite(value) or value < low or value > high or (
            high_open and value >= high):
        bound = ")" if high_open else "]"
        raise ProtocolError(
            OUT_OF_RANGE, f"'{key}' must be a finite number in [{low:g}, {high:g}{bound}")
    return value


def _parse_move(obj: dict) -> Move:
    lat = _number(obj, "lat", -90.0, 90.0)
    lng = _number(obj, "lng", -180.0, 180.0)
    heading = _number(obj, "heading", 0.0, 360.0, high_open=True, optional=True)
    accuracy = _number(obj, "accuracy", 0.0, MAX_ACCURACY, optional=True)
    seq = obj.get("seq")
    if seq is not None:
        # A JSON number with an integral value is an integer, however written
        # (5.0, or a huge integer that the parser read as a float).
        if isinstance(seq, float) and seq.is_integer():
            seq = int(seq) if seq < MAX_SEQ else MAX_SEQ
        if isinstance(seq, bool) or not isinstance(seq, int):
            raise ProtocolError(BAD_MESSAGE, "'seq' must be an integer")
        if not 0 <= seq < MAX_SEQ:
            raise ProtocolError(OUT_OF_RANGE, "'seq' must be in [0, 2^53)")
    assert lat is not None and lng is not None
    return Move(lat, lng, heading, accuracy, seq)


def _parse_hello(obj: dict) -> Hello:
    name = obj.get("name")
    if not isinstance(name, str):
        raise ProtocolError(BAD_MESSAGE, "'name' must be a string")
    name = name.strip()
    if not 1 <= len(name) <= MAX_NAME_CHARS:
        raise ProtocolError(
            BAD_MESSAGE, f"'name' must be 1 to {MAX_NAME_CHARS} characters after trimming")
    precision = _number(obj, "precision", 0.0, MAX_PRECISION, optional=True)
    return Hello(name, precision)


def _parse_zoom(obj: dict) -> Optional[int]:
    zoom = obj.get("zoom")
    if zoom is None:
        return None
    if isinstance(zoom, float) and not math.isfinite(zoom):
        raise ProtocolError(OUT_OF_RANGE, f"'zoom' must be in [{MIN_ZOOM}, {MAX_ZOOM}]")
    if isinstance(zoom, float) and zoom.is_integer():
        zoom = int(zoom) if abs(zoom) < 2**53 else MAX_ZOOM + 1
    if isinstance(zoom, bool) or not isinstance(zoom, int):
        raise ProtocolError(BAD_MESSAGE, "'zoom' must be an integer")
    if not MIN_ZOOM <= zoom <= MAX_ZOOM:
        raise ProtocolError(OUT_OF_RANGE, f"'zoom' must be in [{MIN_ZOOM}, {MAX_ZOOM}]")
    return zoom


def _parse_view(obj: dict) -> View:
    if "bbox" not in obj:
        raise ProtocolError(BAD_MESSAGE, "'bbox' is required (null for the whole world)")
    bbox = obj["bbox"]
    zoom = _parse_zoom(obj)
    if bbox is None:
        return View(None, zoom)
    if not isinstance(bbox, list) or len(bbox) != 4:
        raise ProtocolError(BAD_MESSAGE, "'bbox' must be [west, south, east, north] or null")
    box = {"west": bbox[0], "south": bbox[1], "east": bbox[2], "north": bbox[3]}
    west = _number(box, "west", -180.0, 180.0)
    south = _number(box, "south", -90.0, 90.0)
    east = _number(box, "east", -180.0, 180.0)
    north = _number(box, "north", -90.0, 90.0)
    assert west is not None and south is not None and east is not None and north is not None
    if south > north:
        raise ProtocolError(OUT_OF_RANGE, "'bbox' south must not be above north")
    return View((west, south, east, north), zoom)


def view_from_query(params: dict[str, list[str]]) -> Optional[View]:
    """
    The view a connection asks for in its URL (`?bbox=W,S,E,N&zoom=Z`), or
    None when it gives none or a bad one: bad values are ignored, and the
    connection gets the whole world, as from a server that knows no query.
    """
    bbox_values, zoom_values = params.get("bbox"), params.get("zoom")
    if not bbox_values and not zoom_values:
        return None
    obj: dict = {"bbox": None}
    try:
        if bbox_values:
            parts = bbox_values[0].split(",")
            if len(parts) != 4 or len(bbox_values[0]) > 200:
                return None
            obj["bbox"] = [float(part) for part in parts]
        if zoom_values:
            if len(zoom_values[0]) > 10:
                return None
            obj["zoom"] = int(zoom_values[0])
        return _parse_view(obj)
    except (ValueError, ProtocolError):
        return None


_PARSERS: dict[str, Callable[[dict], Message]] = {
    "move": _parse_move, "hello": _parse_hello, "view": _parse_view}


def parse(payload: Union[bytes, str]) -> Message:
    """
    Parse one client frame into a message, or raise ProtocolError with the
    protocol's code. The size limit is the transport's job (it must answer
    before buffering a huge frame); this function assumes a bounded input.
    """
    obj = _loads(payload)
    if not isinstance(obj, dict):
        raise ProtocolError(BAD_JSON, "frame is not a JSON object")
    kind = obj.get("type")
    parser = _PARSERS.get(kind) if isinstance(kind, str) else None
    if parser is None:
        raise ProtocolError(BAD_MESSAGE, "unknown or missing 'type'")
    return parser(obj)


def in_bbox(bbox: BBox, lat: float, lng: float) -> bool:
    """Whether a point is inside a box; WEST > EAST crosses the antimeridian."""
    west, south, east, north = bbox
    if not south <= lat <= north:
        return False
    if west <= east:
        return west <= lng <= east
    return lng >= west or lng <= east


# Encoding.  Messages are assembled from pre-encoded pin fragments.

def pin_json(pin_id: str, lat: float, lng: float, heading: Optional[float],
             accuracy: Optional[float], name: Optional[str], seq: Optional[int],
             ts: int, source: Optional[str] = None, battery: Optional[int] = None) -> bytes:
    """
    One PIN object, encoded once per accepted state. A pin fed by a phone
    app adds `source` and, when known, `battery` (livemap's extension,
    docs/protocol.md); a browser's pin has exactly the protocol's keys.
    """
    pin: dict = {"id": pin_id, "lat": lat, "lng": lng, "heading": heading,
                 "accuracy": accuracy, "name": name, "seq": seq, "ts": ts}
    if source is not None:
        pin["source"] = source
        if battery is not None:
            pin["battery"] = battery
    return orjson.dumps(pin)


def _clustered(clusters: Optional[Iterable[bytes]], total: int) -> bytes:
    """What a clustered view's messages carry beside v1's keys; nothing for v1."""
    if clusters is None:
        return b"}"
    return b"".join((b',"clusters":[', b",".join(clusters), b'],"total":',
                     str(total).encode(), b"}"))


def encode_welcome(client_id: str, pins: Iterable[bytes],
                   clusters: Optional[Iterable[bytes]] = None, total: int = 0) -> bytes:
    return b"".join((b'{"type":"welcome","id":', orjson.dumps(client_id),
                     b',"pins":[', b",".join(pins), b"]", _clustered(clusters, total)))


def encode_update(pins: Iterable[bytes], gone: list[str],
                  clusters: Optional[Iterable[bytes]] = None, total: int = 0) -> bytes:
    return b"".join((b'{"type":"update","pins":[', b",".join(pins),
                     b'],"gone":', orjson.dumps(gone), _clustered(clusters, total)))


def encode_snapshot(pins: Iterable[bytes], clusters: Optional[Iterable[bytes]] = None,
                    total: int = 0) -> bytes:
    return b"".join((b'{"type":"snapshot","pins":[', b",".join(pins), b"]",
                     _clustered(clusters, total)))


def cluster_json(cluster_id: str, lat: float, lng: float, count: int, bbox: BBox) -> bytes:
    """One CLUSTER object (extension "clusters"), encoded once per cell and state."""
    return orjson.dumps({"id": cluster_id, "lat": lat, "lng": lng, "count": count,
                         "bbox": list(bbox)})


def encode_error(code: str, message: str) -> bytes:
    return orjson.dumps({"type": "error", "code": code, "message": message})
