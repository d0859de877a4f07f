"""Naive Autobahn/Twisted broadcast peer for the livemap fan-out benchmark.

It speaks livemap's wire protocol (docs/protocol.md) the way the Autobahn
broadcast examples do: every accepted move is encoded once and handed to
``sendMessage`` of every client of the map, one message per move per client,
with no tick, no coalescing, no per-client buffer bound and no views (a
``view`` is answered with a snapshot of every pin, unfiltered).  bench/run.py
runs it beside livemap so the table shows what livemap's design buys over the
obvious server written with the same libraries.

usage: python bench/peers/naive_autobahn.py --port PORT [--host 127.0.0.1]
"""

from __future__ import annotations

import argparse
import math
import re
import resource
import secrets
import sys
from typing import Any

import orjson
import txaio
from autobahn.twisted.websocket import (
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

MAP_PATH = re.compile(r"^/ws/([A-Za-z0-9_-]{1,64})$")
MAX_MESSAGE = 4096


class NaiveMap:
    """One map: its clients and their latest pins, nothing else."""

    def __init__(self) -> None:
        self.clients: set[NaiveProtocol] = set()
        self.pins: dict[str, dict[str, Any]] = {}

    def broadcast(self, message: dict[str, Any]) -> None:
        """The naive part: one ``sendMessage`` per client per change."""
        payload = orjson.dumps(message)
        for client in self.clients:
            client.sendMessage(payload)


class NaiveProtocol(WebSocketServerProtocol):
    """A client connection: frames in, calls on its map, frames out."""

    factory: NaiveFactory

    def onConnect(self, request: ConnectionRequest) -> None:
        match = MAP_PATH.match(request.path)
        if match is None:
            raise ConnectionDeny(404, "no such map")
        self.map_name = match.group(1)

    def onOpen(self) -> None:
        self.pin_id = secrets.token_urlsafe(12)
        self.pin_name: str | None = None
        self.map = self.factory.map_named(self.map_name)
        self.map.clients.add(self)
        self._send(
            {"type": "welcome", "id": self.pin_id, "pins": list(self.map.pins.values())}
        )

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self._error("bad_message", "binary frames are not accepted")
            return
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self._error("bad_json", "not JSON")
            return
        if not isinstance(message, dict):
            self._error("bad_json", "not a JSON object")
            return
        kind = message.get("type")
        if kind == "move":
            self._move(message)
        elif kind == "hello":
            self._hello(message)
        elif kind == "view":
            self._send({"type": "snapshot", "pins": list(self.map.pins.values())})
        else:
            self._error("bad_message", "unknown type")

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        naive_map = getattr(self, "map", None)
        if naive_map is None:
            return
        naive_map.clients.discard(self)
        if naive_map.pins.pop(self.pin_id, None) is not None:
            naive_map.broadcast({"type": "update", "pins": [], "gone": [self.pin_id]})
        if not naive_map.clients:
            self.factory.maps.pop(self.map_name, None)

    def _move(self, message: dict[str, Any]) -> None:
        lat, lng = message.get("lat"), message.get("lng")
        if not (_finite(lat) and _finite(lng)):
            self._error("bad_message", "lat/lng must be numbers")
            return
        if not (-90 <= lat <= 90 and -180 <= lng <= 180):
            self._error("out_of_range", "lat/lng out of range")
            return
        heading = message.get("heading")
        accuracy = message.get("accuracy")
        seq = message.get("seq")
        pin = {
            "id": self.pin_id,
            "lat": lat,
            "lng": lng,
            "heading": heading if _finite(heading) and 0 <= heading < 360 else None,
            "accuracy": accuracy if _finite(accuracy) and accuracy >= 0 else None,
            "name": self.pin_name,
            "seq": seq if type(seq) is int and 0 <= seq < 2**53 else None,
            "ts": int(self.factory.clock.seconds() * 1000),
        }
        self.map.pins[self.pin_id] = pin
        self.map.broadcast({"type": "update", "pins": [pin], "gone": []})

    def _hello(self, message: dict[str, Any]) -> None:
        name = message.get("name")
        if not isinstance(name, str) or not 1 <= len(name.strip()) <= 64:
            self._error("bad_message", "name must be 1 to 64 characters")
            return
        self.pin_name = name.strip()
        pin = self.map.pins.get(self.pin_id)
        if pin is not None:
            pin["name"] = self.pin_name
            self.map.broadcast({"type": "update", "pins": [pin], "gone": []})

    def _send(self, message: dict[str, Any]) -> None:
        self.sendMessage(orjson.dumps(message))

    def _error(self, code: str, text: str) -> None:
        self._send({"type": "error", "code": code, "message": text})


def _finite(value: object) -> bool:
    return type(value) in (int, float) and math.isfinite(value)  # type: ignore[arg-type]


class NaiveFactory(WebSocketServerFactory):
    """Holds the maps; one per listening port."""

    protocol = NaiveProtocol

    def __init__(self, url: str, clock: IReactorTime) -> None:
        super().__init__(url)
        self.clock = clock
        self.maps: dict[str, NaiveMap] = {}
        self.setProtocolOptions(
            maxMessagePayloadSize=MAX_MESSAGE,
            maxFramePayloadSize=MAX_MESSAGE,
            perMessageCompressionAccept=lambda offers: None,
        )

    def map_named(self, name: str) -> NaiveMap:
        naive_map = self.maps.get(name)
        if naive_map is None:
            naive_map = self.maps[name] = NaiveMap()
        return naive_map


def main(argv: list[str] | None = None) -> None:
    """Listen on 127.0.0.1 and serve until killed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    from twisted.internet import reactor

    # Info and up, as twistd would: Autobahn's per-frame debug events are
    # costly to format and would make the peer look slower than it is.
    txaio.set_global_log_level("info")
    globalLogBeginner.beginLoggingTo([
        FilteringLogObserver(
            textFileLogObserver(sys.stderr),
            [LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)],
        )
    ])
    factory = NaiveFactory(f"ws://{args.host}:{args.port}", reactor)  # type: ignore[arg-type]
    tcp: IReactorTCP = reactor  # type: ignore[assignment]
    tcp.listenTCP(args.port, factory, backlog=4096, interface=args.host)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
