"""
The HTTP face of livemap: one Klein app on one port serving the page, its
assets, the JSON API, health, metrics, and mounting the WebSocket and
SockJS resources (docs/protocol.md's table of paths).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Optional

import orjson
from klein import Klein
from prometheus_client import CollectorRegistry
from prometheus_client.twisted import MetricsResource
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.logger import Logger
from twisted.web import pages
from twisted.web.resource import IResource
from twisted.web.server import Request
from twisted.web.static import File

import livemap_web

from .hub import people as people_search
from . import wire
from .admission import Admission, AddressRate
from .phones.app_routes import PhoneApps
from .hub import Hub
from .cluster.links import MapUnavailable
from .maps import DirectoryFull, DirectoryUnavailable, MapDirectory, PrivateMap, parse_ttl

# The page is the installed package livemap_web (web/ in the checkout), found
# beside its own __init__.py, never relative to a checkout. resolve() follows
# a development install's link (editable_mode=strict) back to web/, so a file
# added there is served without reinstalling.
WEB_ROOT = Path(livemap_web.__file__).resolve().parent
CONFIG_PLACEHOLDER = b'{"livemap": "config"}'
OSM_TILES = "https://tile.openstreetmap.org/{z}/{x}/{y}.png"
OSM_ATTRIBUTION = ('&copy; <a href="https://www.openstreetmap.org/copyright">'
                   'OpenStreetMap</a> contributors')


NO_SUCH_MAP = pages.notFound("No Such Map", "No map has this name.")
# A private map's name this node does not know, while the cluster's
# directory (Redis) cannot be asked: neither yes nor no.
DIRECTORY_UNAVAILABLE = pages.errorPage(
    503, "Service Unavailable",
    "This server cannot look this map up right now. Try again in a moment.")


class StaticFiles(File):
    """Static files without directory listings."""

    childNotFound = pages.notFound()  # type: ignore[assignment]

    def directoryListing(self) -> IResource:  # noqa: N802 (Twisted's name)
        return pages.notFound()


def script_json(value: object) -> bytes:
    """JSON that is safe inside a <script> element (no `</script>` breakout)."""
    return (orjson.dumps(value).replace(b"<", b"\\u003c").replace(b">", b"\\u003e")
            .replace(b"&", b"\\u0026"))


class LiveMapSite:
    """Routes of one livemap server; state lives on the instance."""

    app = Klein()
    log = Logger()

    def __init__(self, hub: Hub, websocket: IResource, registry: CollectorRegistry, *,
                 tiles: str = OSM_TILES, attribution: str = OSM_ATTRIBUTION,
                 rate: float = 10.0, sockjs: Optional[IResource] = None,
                 web_root: Path = WEB_ROOT, directory: Optional[MapDirectory] = None,
                 stale: float = 600.0, apps: Optional[PhoneApps] = None,
                 admission: Optional[Admission] = None,
                 search_rate: float = people_search.SEARCH_RATE) -> None:
        self.hub = hub
        self.apps = apps
        # Who a request comes from (a trusted proxy's X-Forwarded-For), and
        # the people searches each client address may still make.
        self.admission = admission or Admission()
        self.searches = AddressRate(hub.clock, people_search.SEARCH_BURST, 1.0 / search_rate)
        # Fires once this node holds a map's pins (a backplane's `watch`).
        self.map_ready: Callable[[str], defer.Deferred] = lambda name: defer.succeed(None)
        # name -> check returning None when fine, else what is wrong (the
        # Redis link, say): /healthz then says "degraded", still with 200.
        self.health_checks: dict[str, Callable[[], Optional[str]]] = {}
        # The same, for what makes this node refuse to serve (its Redis
        # servers differ from the other nodes'): /healthz then answers 503.
        self.refusals: dict[str, Callable[[], Optional[str]]] = {}
        self.directory = directory or MapDirectory(hub.clock)
        self.stale = stale
        self.websocket = websocket
        self.sockjs = sockjs
        self.metrics_resource = MetricsResource(registry=registry)
        self.tiles = tiles
        self.attribution = attribution
        self.rate = rate
        self.web_root = web_root
        self.page = (web_root / "index.html").read_bytes()
        if CONFIG_PLACEHOLDER not in self.page:
            raise ValueError(f"{web_root / 'index.html'} lacks the config placeholder")
        self.static = StaticFiles(str(web_root / "static"))
        self.vendor = {
            "leaflet": StaticFiles(str(web_root / "vendor" / "leaflet" / "dist")),
            "sockjs-client": StaticFiles(str(web_root / "vendor" / "sockjs-client" / "dist")),
            "uqr": StaticFiles(str(web_root / "vendor" / "uqr" / "dist")),
        }

    def resource(self) -> IResource:
        return self.app.resource()

    @app.route("/", methods=["GET", "HEAD"])
    def root(self, request: Request) -> bytes:
        request.redirect(b"/m/" + wire.DEFAULT_MAP.encode())
        return b""

    def _if_map(self, map_name: str, serve: Callable[[], Any], *,
                pins: bool = False) -> defer.Deferred:
        """
        `serve()` if the map exists, else a 404; a 503 if it may be a private
        map of the cluster that cannot be looked up now. With `pins`, once
        this node holds the map's pins (`map_ready`: in a cluster, a node
        serves only the maps it needs), so a first welcome is whole. Klein
        takes the Deferred, and renders the resource (the WebSocket upgrade
        too) when it fires.
        """
        def unavailable(failure: Failure) -> IResource:
            failure.trap(DirectoryUnavailable)
            return DIRECTORY_UNAVAILABLE

        def map_unavailable(failure: Failure) -> IResource:
            failure.trap(MapUnavailable)
            return pages.errorPage(503, "Service Unavailable", failure.value.reason)

        def exists(found: bool) -> Any:
            if not found:
                return NO_SUCH_MAP
            if not pins:
                return serve()
            return self.map_ready(map_name).addCallbacks(lambda _: serve(), map_unavailable)
        return self.directory.resolve(map_name).addCallbacks(exists, unavailable)

    @app.route("/m/<map_name>", methods=["GET", "HEAD"])
    def map_page(self, request: Request, map_name: str) -> defer.Deferred:
        def page() -> bytes:
            config = {
                "map": map_name, "tiles": self.tiles, "attribution": self.attribution,
                "rate": self.rate, "wsPath": f"/ws/{map_name}",
                "sockjsPath": f"/sockjs/{map_name}", "maxZoom": 19, "stale": self.stale,
            }
            request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
            request.setHeader(b"Cache-Control", b"no-cache")
            request.setHeader(b"X-Content-Type-Options", b"nosniff")
            request.setHeader(b"Referrer-Policy", b"no-referrer")
            return self.page.replace(CONFIG_PLACEHOLDER, script_json(config))
        return self._if_map(map_name, page)

    @app.route("/ws/<map_name>")
    def websocket_endpoint(self, request: Request, map_name: str) -> defer.Deferred:
        def upgrade() -> Any:
            if not self.hub.can_join(map_name):
                request.setResponseCode(503)
                return b"map full"
            return self.websocket
        return self._if_map(map_name, upgrade, pins=True)

    @app.route("/sockjs/<map_name>/", branch=True)
    def sockjs_endpoint(self, request: Request, map_name: str) -> Any:
        if self.sockjs is None:
            return NO_SUCH_MAP
        sockjs = self.sockjs
        return self._if_map(map_name, lambda: sockjs, pins=True)

    def refusing(self) -> Optional[str]:
        """Why this node refuses to serve (its Redis servers differ from the others'), or None."""
        for _, check in sorted(self.refusals.items()):
            problem = check()
            if problem is not None:
                return problem
        return None

    @app.route("/api/maps", methods=["POST"])
    def create_map(self, request: Request) -> Any:
        """A private map with an unguessable name; `?ttl=SECONDS` makes it expire."""
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        # A node that disagrees with the others on the sharding would put
        # the map where they never look.
        problem = self.refusing()
        if problem is not None:
            request.setResponseCode(503)
            return orjson.dumps({"error": "unavailable", "message": problem})
        args: dict[bytes, list[bytes]] = request.args or {}
        raw = args.get(b"ttl", [None])[0]  # type: ignore[list-item]
        try:
            ttl = parse_ttl(None if raw is None else raw.decode("ascii", "replace"),
                            self.directory.min_ttl)
        except ValueError as error:
            request.setResponseCode(400)
            return orjson.dumps({"error": "bad_ttl", "message": str(error)})

        def created(entry: PrivateMap) -> bytes:
            request.setResponseCode(201)
            path = f"/m/{entry.name}"
            request.setHeader(b"Location", path.encode())
            expires = None if entry.expires is None else int(entry.expires * 1000)
            return orjson.dumps({
                "map": entry.name, "path": path,
                "url": request.prePathURL().decode().rsplit("/api/", 1)[0] + path,
                "expires": expires})

        def refused(failure: Failure) -> bytes:
            # 503 either way: the page shows the message.
            error = failure.trap(DirectoryFull, DirectoryUnavailable)
            request.setResponseCode(503)
            return orjson.dumps({"error": "full" if error is DirectoryFull else "unavailable",
                                 "message": str(failure.value)})
        return self.directory.create_private(ttl).addCallbacks(created, refused)

    @app.route("/api/maps/<map_name>/devices", methods=["POST"])
    def create_device(self, request: Request, map_name: str) -> Any:
        """A phone app's device on this map (app_routes.PhoneApps)."""
        if self.apps is None:
            return NO_SUCH_MAP
        problem = self.refusing()
        if problem is not None:  # as a private map: it would be stored where no node looks
            request.setResponseCode(503)
            request.setHeader(b"Content-Type", b"application/json")
            return orjson.dumps({"error": "unavailable", "message": problem})
        return self.apps.create_device(request, map_name)

    @app.route("/api/devices/<token>", methods=["DELETE"])
    def delete_device(self, request: Request, token: str) -> Any:
        if self.apps is None:
            return NO_SUCH_MAP
        return self.apps.delete_device(request, token)

    @app.route("/apps/", branch=True)
    def phone_apps(self, request: Request) -> IResource:
        """The endpoints the phone apps report to."""
        if self.apps is None:
            return pages.notFound()
        return self.apps.resource()

    @app.route("/api/maps/<map_name>/pins", methods=["GET", "HEAD"])
    def pins(self, request: Request, map_name: str) -> defer.Deferred:
        def pins() -> bytes:
            request.setHeader(b"Content-Type", b"application/json")
            request.setHeader(b"Cache-Control", b"no-store")
            return orjson.dumps({"pins": self.hub.pins(map_name)})
        return self._if_map(map_name, pins, pins=True)

    @app.route("/api/maps/<map_name>/people", methods=["GET", "HEAD"])
    def people(self, request: Request, map_name: str) -> defer.Deferred:
        """Search the people of a map by name, nearest first (extension "clusters")."""
        address = self.admission.client_address(
            getattr(request.getClientAddress(), "host", "unknown"),
            (request.getHeader(b"x-forwarded-for") or b"").decode("latin-1") or None)
        wait = self.searches.take(address)
        if wait > 0:
            request.setResponseCode(429)
            request.setHeader(b"Content-Type", b"application/json")
            request.setHeader(b"Retry-After", b"%d" % math.ceil(wait))
            return defer.succeed(orjson.dumps({
                "error": "too_many_searches",
                "message": f"too many searches from this address; retry in {math.ceil(wait)} s"}))

        def found() -> bytes:
            request.setHeader(b"Content-Type", b"application/json")
            request.setHeader(b"Cache-Control", b"no-store")
            args: dict[bytes, list[bytes]] = request.args or {}

            def arg(name: bytes) -> Optional[str]:
                values = args.get(name)
                return values[0].decode("utf-8", "replace") if values else None
            try:
                text, point, limit = people_search.parse(arg(b"q"), arg(b"near"), arg(b"limit"))
            except people_search.BadQuery as error:
                request.setResponseCode(400)
                return orjson.dumps({"error": "bad_query", "message": str(error)})
            total, pins = self.hub.people(map_name, text, point, limit)
            return orjson.dumps({"total": total, "people": pins})
        return self._if_map(map_name, found, pins=True)

    @app.route("/healthz", methods=["GET", "HEAD"])
    def healthz(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        refusals = [f"{name}: {problem}" for name, check in sorted(self.refusals.items())
                    if (problem := check()) is not None]
        if refusals:
            request.setResponseCode(503)
            return ("refusing\n" + "\n".join(refusals) + "\n").encode()
        problems = [f"{name}: {problem}" for name, check in sorted(self.health_checks.items())
                    if (problem := check()) is not None]
        if problems:
            return ("degraded\n" + "\n".join(problems) + "\n").encode()
        return b"ok"

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: Request) -> IResource:
        return self.metrics_resource

    @app.route("/static/", branch=True)
    def static_files(self, request: Request) -> IResource:
        return self.static

    @app.route("/vendor/<package>/", branch=True)
    def vendor_files(self, request: Request, package: str) -> IResource:
        return self.vendor.get(package) or pages.notFound()

    @app.route("/favicon.ico", methods=["GET", "HEAD"])
    def favicon(self, request: Request) -> IResource:
        return StaticFiles(str(self.web_root / "static" / "favicon.svg"),
                           defaultType="image/svg+xml")
