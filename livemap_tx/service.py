"""
Options to one MultiService: the only place that wires livemap's parts
together (hub, WebSocket, web site, metrics, pirate echo).
"""

from __future__ import annotations

import resource
from typing import Any, Optional

from autobahn.twisted.resource import WebSocketResource
from twisted.application import service, strports
from twisted.internet import defer, endpoints
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.server import Site

from . import wire
from .client import DEFAULT_RATE
from .hub import Hub
from .metrics import make_registry
from .pirate import PirateFactory
from .sockjs_endpoint import sockjs_resource
from .web import OSM_ATTRIBUTION, OSM_TILES, LiveMapSite
from .ws import LiveMapFactory

log = Logger()

LISTEN_BACKLOG = 1024
SHUTDOWN_GRACE = 3.0


def _positive(name: str, low: float = 0.0, high: float = float("inf")):
    def coerce(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise usage.UsageError(f"--{name} must be a number, not {value!r}") from None
        if not low < number <= high:
            raise usage.UsageError(f"--{name} must be in ({low:g}, {high:g}], not {value!r}")
        return number
    coerce.coerceDoc = f"A number in ({low:g}, {high:g}]."  # type: ignore[attr-defined]
    return coerce


class Options(usage.Options):
    """twistd livemap [options]"""

    synopsis = "[options]"
    longdesc = ("Serve the livemap page, its WebSocket (/ws/MAP) and SockJS (/sockjs/MAP) "
                "endpoints on one port, and the pirate-speak echo on another.")
    optParameters: list[list[Any]] = [
        ["port", "p", "tcp:8080",
         "Endpoint of the page, WebSocket and SockJS (e.g. tcp:8080, "
         "ssl:8443:privateKey=key.pem:certKey=cert.pem)."],
        ["pirate", None, "tcp:8007",
         "Endpoint of the pirate-speak echo for telnet, or 'none' to disable."],
        ["tiles", None, OSM_TILES, "Map tile URL template with {z}, {x} and {y}."],
        ["attribution", None, OSM_ATTRIBUTION,
         "Attribution HTML the tile provider requires."],
        ["rate", None, DEFAULT_RATE, "Moves per second allowed per connection.",
         _positive("rate", 0.0, 1000.0)],
        ["tick", None, 0.1, "Seconds between fan-out ticks per map.",
         _positive("tick", 0.0, 5.0)],
        ["ping", None, 30.0, "Seconds between WebSocket pings; a connection that does "
         "not answer within another such interval is closed.",
         _positive("ping", 0.0, 3600.0)],
        ["slow-timeout", None, 30.0,
         "Seconds a client that does not read may stay before it is closed.",
         _positive("slow-timeout", 0.0, 3600.0)],
    ]

    def postOptions(self) -> None:  # noqa: N802 (Twisted's name)
        from twisted.internet import reactor
        for name in ("port", "pirate"):
            value = self[name]
            if name == "pirate" and value == "none":
                continue
            try:
                endpoints.serverFromString(reactor, value)
            except (ValueError, TypeError, KeyError) as error:
                raise usage.UsageError(f"--{name}: bad endpoint {value!r}: {error}") from None
        if not all(part in self["tiles"] for part in ("{z}", "{x}", "{y}")):
            raise usage.UsageError("--tiles must contain {z}, {x} and {y}")


def with_backlog(description: str, backlog: int = LISTEN_BACKLOG) -> str:
    """Raise the listen backlog of tcp/ssl endpoints that do not set one."""
    kind = description.split(":", 1)[0]
    if kind in ("tcp", "ssl", "tcp6") and "backlog=" not in description:
        return f"{description}:backlog={backlog}"
    return description


def raise_open_file_limit() -> Optional[int]:
    """A real-time server runs out of descriptors first: take all we may."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ValueError, OSError):
        log.failure("could not raise the open-file limit")
        return None
    log.info("open-file limit is {limit}", limit=soft)
    return soft


class GracefulClose(service.Service):
    """On stop, close every client with 1001 and give them a moment to go."""

    def __init__(self, factory: LiveMapFactory, clock: Any, grace: float = SHUTDOWN_GRACE):
        self.factory = factory
        self.clock = clock
        self.grace = grace

    def stopService(self) -> defer.Deferred:  # noqa: N802
        super().stopService()
        self.factory.close_all(wire.CLOSE_GOING_AWAY, "server shutting down")
        return self._wait(self.clock.seconds() + self.grace)

    def _wait(self, deadline: float) -> defer.Deferred:
        done: defer.Deferred = defer.Deferred()

        def check() -> None:
            if not self.factory.protocols or self.clock.seconds() >= deadline:
                done.callback(None)
            else:
                self.clock.callLater(0.05, check)
        check()
        return done


def make_server(reactor: Any, options: Options) -> tuple[Hub, LiveMapFactory, LiveMapSite]:
    """The hub, WebSocket factory and site of one server, wired together."""
    hub = Hub(reactor, tick_interval=options["tick"], slow_timeout=options["slow-timeout"])
    registry, tick_seconds = make_registry(hub)
    hub.tick_observer = tick_seconds.observe
    factory = LiveMapFactory(hub, reactor, rate=options["rate"],
                             ping_interval=options["ping"], ping_timeout=options["ping"])
    sockjs = sockjs_resource(hub, reactor, rate=options["rate"], ping=options["ping"])
    site = LiveMapSite(hub, WebSocketResource(factory), registry, tiles=options["tiles"],
                       attribution=options["attribution"], rate=options["rate"],
                       sockjs=sockjs)
    return hub, factory, site


def makeService(options: Options) -> service.MultiService:  # noqa: N802 (twistd's name)
    from twisted.internet import reactor
    raise_open_file_limit()
    top = service.MultiService()
    hub, factory, site = make_server(reactor, options)
    http = strports.service(with_backlog(options["port"]), Site(site.resource()))
    http.setServiceParent(top)
    if options["pirate"] != "none":
        pirate = strports.service(with_backlog(options["pirate"]), PirateFactory(reactor))
        pirate.setServiceParent(top)
    # Stopped first (MultiService stops children in reverse): clients hear
    # 1001 while the listeners are closing.
    GracefulClose(factory, reactor).setServiceParent(top)
    return top
