"""
The HTTP face of livemap: one Klein app on one port serving the page, its
assets, the JSON API, health, metrics, and mounting the WebSocket and
SockJS resources (PROTOCOL.md's table of paths).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import orjson
from klein import Klein
from prometheus_client import CollectorRegistry
from prometheus_client.twisted import MetricsResource
from twisted.web.resource import IResource, NoResource
from twisted.web.server import Request
from twisted.web.static import File

from . import wire
from .hub import Hub

WEB_ROOT = Path(__file__).resolve().parent.parent / "web"
CONFIG_PLACEHOLDER = b'{"livemap": "config"}'
OSM_TILES = "https://tile.openstreetmap.org/{z}/{x}/{y}.png"
OSM_ATTRIBUTION = ('&copy; <a href="https://www.openstreetmap.org/copyright">'
                   'OpenStreetMap</a> contributors')


class StaticFiles(File):
    """Static files without directory listings."""

    def directoryListing(self) -> IResource:  # noqa: N802 (Twisted's name)
        return NoResource()


def script_json(value: object) -> bytes:
    """JSON that is safe inside a <script> element (no `</script>` breakout)."""
    return (orjson.dumps(value).replace(b"<", b"\\u003c").replace(b">", b"\\u003e")
            .replace(b"&", b"\\u0026"))


class LiveMapSite:
    """Routes of one livemap server; state lives on the instance."""

    app = Klein()

    def __init__(self, hub: Hub, websocket: IResource, registry: CollectorRegistry, *,
                 tiles: str = OSM_TILES, attribution: str = OSM_ATTRIBUTION,
                 rate: float = 10.0, sockjs: Optional[IResource] = None,
                 web_root: Path = WEB_ROOT, health: Optional[dict] = None) -> None:
        self.hub = hub
        self.websocket = websocket
        self.sockjs = sockjs
        self.metrics = MetricsResource(registry=registry)
        self.tiles = tiles
        self.attribution = attribution
        self.rate = rate
        self.web_root = web_root
        self.page = (web_root / "index.html").read_bytes()
        if CONFIG_PLACEHOLDER not in self.page:
            raise ValueError(f"{web_root / 'index.html'} lacks the config placeholder")
        self.static = StaticFiles(str(web_root / "static"))
        self.vendor = {
            "leaflet": StaticFiles(str(web_root / "node_modules" / "leaflet" / "dist")),
            "sockjs-client": StaticFiles(str(web_root / "node_modules" / "sockjs-client" / "dist")),
        }

    def resource(self) -> IResource:
        return self.app.resource()

    @app.route("/", methods=["GET", "HEAD"])
    def root(self, request: Request) -> bytes:
        request.redirect(b"/m/" + wire.DEFAULT_MAP.encode())
        return b""

    @app.route("/m/<map_name>", methods=["GET", "HEAD"])
    def map_page(self, request: Request, map_name: str) -> object:
        if not wire.is_map_name(map_name):
            return NoResource("No such map.")
        config = {
            "map": map_name, "tiles": self.tiles, "attribution": self.attribution,
            "rate": self.rate, "wsPath": f"/ws/{map_name}",
            "sockjsPath": f"/sockjs/{map_name}", "maxZoom": 19,
        }
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Referrer-Policy", b"no-referrer")
        return self.page.replace(CONFIG_PLACEHOLDER, script_json(config))

    @app.route("/ws/<map_name>")
    def websocket_endpoint(self, request: Request, map_name: str) -> IResource:
        if not wire.is_map_name(map_name):
            return NoResource("No such map.")
        return self.websocket

    @app.route("/sockjs/<map_name>/", branch=True)
    def sockjs_endpoint(self, request: Request, map_name: str) -> IResource:
        if self.sockjs is None or not wire.is_map_name(map_name):
            return NoResource("No such map.")
        return self.sockjs

    @app.route("/api/maps/<map_name>/pins", methods=["GET", "HEAD"])
    def pins(self, request: Request, map_name: str) -> object:
        if not wire.is_map_name(map_name):
            return NoResource("No such map.")
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        return orjson.dumps({"pins": self.hub.pins(map_name)})

    @app.route("/healthz", methods=["GET", "HEAD"])
    def healthz(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        return b"ok"

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: Request) -> IResource:
        return self.metrics

    @app.route("/static/", branch=True)
    def static_files(self, request: Request) -> IResource:
        return self.static

    @app.route("/vendor/<package>/", branch=True)
    def vendor_files(self, request: Request, package: str) -> IResource:
        return self.vendor.get(package) or NoResource()

    @app.route("/favicon.ico", methods=["GET", "HEAD"])
    def favicon(self, request: Request) -> IResource:
        return StaticFiles(str(self.web_root / "static" / "favicon.svg"),
                           defaultType="image/svg+xml")
