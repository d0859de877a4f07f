"""
The HTTP face of devices: making and deleting them (the API), and the
endpoints the phone apps report to, each in its own format (apps.py), all
on the page's port. Answers are what each app expects; every refusal is a
4xx with a short reason (5xx only when the cluster's store is away), and a
refused report never changes a pin. A report is refused only for a bad
token or a body not in the app's format: one that comes too soon, or holds
points that cannot be used, is answered as taken (docs/protocol.md says
which answers make each app resend and which make it drop). Tokens are
never logged.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Callable, Optional
from urllib.parse import parse_qsl, quote, urlencode

import orjson
from klein import Klein
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.server import Request

from .. import wire
from ..admission import Admission, Refused
from .apps import (
    DEFAULT_MAX_FRIENDS,
    MAX_BATCH_BYTES,
    MAX_REPORT_BYTES,
    BadReport,
    Friends,
    owntracks_config,
    parse_osmand,
    parse_overland,
    parse_owntracks,
    parse_traccar_json,
)
from .devices import Device, DeviceError, Devices
from .token_misses import MissLimiter

JSON = b"application/json"


class TooLarge(Exception):
    pass


def _body(request: Request, limit: int) -> bytes:
    content = request.content
    if content is None:
        return b""
    content.seek(0, 2)
    size = content.tell()
    if size > limit:
        raise TooLarge()
    content.seek(0)
    return content.read()


def _answer(request: Request, status: int, body: bytes = b"", kind: bytes = JSON) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", kind)
    request.setHeader(b"Cache-Control", b"no-store")
    return body


def _error(request: Request, status: int, reason: str) -> bytes:
    return _answer(request, status, orjson.dumps({"error": reason}))


def initials(name: Optional[str]) -> str:
    """Two letters for OwnTracks' marker, from a name ("Ada Lovelace": AL)."""
    words = [word for word in (name or "").split() if word[:1].isalnum()]
    letters = "".join(word[0] for word in words[:2]) if len(words) > 1 else (
        words[0][:2] if words else "")
    return (letters.upper() + "LM")[:2]


class PhoneApps:
    """Routes of the device API and of the apps' endpoints (mounted at /apps/)."""

    app = Klein()
    log = Logger()

    def __init__(self, devices: Devices, admission: Admission, *,
                 max_friends: int = DEFAULT_MAX_FRIENDS) -> None:
        self.devices = devices
        self.admission = admission
        self.friends = Friends(max_friends)
        # Unknown tokens cost their sender (token_misses.py): every report finds its device here.
        self.misses = MissLimiter(devices, admission)
        # Fires once this node holds a map's pins (in a cluster, a report
        # makes its node serve the map for a while: the backplane's watch).
        self.map_ready: Callable[[str], defer.Deferred] = lambda name: defer.succeed(None)

    def resource(self) -> Any:
        return self.app.resource()

    # Where the apps reach this server

    def public_base(self, request: Request) -> str:
        """scheme://host as the client used it (a trusted proxy may say https)."""
        scheme = "https" if request.isSecure() else "http"
        peer = getattr(request.getClientAddress(), "host", "")
        forwarded = request.getHeader(b"x-forwarded-proto")
        if forwarded and self.admission._trusted(peer):
            first = forwarded.decode("ascii", "replace").split(",")[0].strip().lower()
            if first in ("http", "https"):
                scheme = first
        host = (request.getHeader(b"host") or b"localhost").decode("ascii", "replace")
        return f"{scheme}://{host}"

    def setup(self, request: Request, token: str, device: Device) -> dict:
        """What to enter in each app (ready to paste), for the API's answer."""
        base = self.public_base(request)
        tid = initials(device.name)
        owntracks_url = f"{base}/apps/owntracks/{token}"
        osmand = f"{base}/apps/osmand"
        overland = f"{base}/apps/overland"
        return {
            # HTTP mode; the token is in the URL, so no user or password.
            # The values in the order of the app's Connection screen.
            "owntracks": {"mode": "HTTP", "url": owntracks_url, "device_id": "livemap",
                          "tid": tid,
                          "config": owntracks_config(owntracks_url, device.name, tid)},
            # Traccar Client: its server URL, and the token as device identifier.
            # Its QR scanner takes the URL's origin and path as the server URL
            # and its `id` parameter as the identifier; its link
            # (org.traccar.client:) takes `url` and `id`.
            "traccar": {"server_url": osmand, "device_id": token,
                        "qr": f"{osmand}?id={token}",
                        "link": "org.traccar.client://setup?url="
                                f"{quote(osmand, safe='')}&id={token}"},
            # OsmAnd's online tracking template ({3} is its accuracy, {5}
            # speed, {11} battery).
            "osmand": {"url": f"{osmand}?id={token}&lat={{0}}&lon={{1}}&timestamp={{2}}"
                              "&hdop={3}&altitude={4}&speed={5}&bearing={6}&batt={11}"},
            "gpslogger": {"url": f"{osmand}?id={token}&lat=%LAT&lon=%LON&timestamp=%TIMESTAMP"
                                 "&accuracy=%ACC&altitude=%ALT&speed=%SPD&bearing=%DIR"
                                 "&batt=%BATT",
                          "method": "GET"},
            # Overland: its receiver endpoint and access token, or its setup link.
            "overland": {"url": f"{overland}/{token}", "endpoint": overland,
                         "token": token,
                         "config": "overland://setup?" + urlencode(
                             {"url": overland, "token": token, "device_id": device.id})},
        }

    # The device API (routed from web.py)

    def create_device(self, request: Request, map_name: str) -> defer.Deferred:
        """POST /api/maps/{map}/devices with JSON {"name": ...} (optional)."""
        return defer.Deferred.fromCoroutine(self._create(request, map_name))

    async def _create(self, request: Request, map_name: str) -> bytes:
        try:
            self.admission.check_origin(_header(request, b"origin"), _header(request, b"host"))
            address = self.admission.client_address(
                getattr(request.getClientAddress(), "host", "unknown"),
                _header(request, b"x-forwarded-for"))
        except Refused as refused:
            return _error(request, refused.status, refused.reason)
        try:
            body = _body(request, wire.MAX_MESSAGE_BYTES)
        except TooLarge:
            return _error(request, 413, f"body over {wire.MAX_MESSAGE_BYTES} bytes")
        name: Optional[str] = None
        if body.strip():
            try:
                asked = orjson.loads(body)
            except orjson.JSONDecodeError:
                return _error(request, 400, "the body must be JSON")
            if not isinstance(asked, dict):
                return _error(request, 400, "the body must be a JSON object")
            if asked.get("name") is not None:
                try:
                    hello = wire.parse(orjson.dumps({"type": "hello", "name": asked["name"]}))
                except wire.ProtocolError as error:
                    return _error(request, 400, error.message)
                assert isinstance(hello, wire.Hello)
                name = hello.name
        try:
            token, device = await self.devices.create(map_name, name, address)
        except DeviceError as error:
            return _error(request, error.status, error.reason)
        base = self.public_base(request)
        request.setHeader(b"Location", f"/api/devices/{token}".encode())
        return _answer(request, 201, orjson.dumps({
            "token": token, "id": device.id, "name": device.name, "map": map_name,
            "delete": f"{base}/api/devices/{token}",
            "apps": self.setup(request, token, device)}))

    def delete_device(self, request: Request, token: str) -> defer.Deferred:
        """DELETE /api/devices/{token}."""
        async def delete() -> bytes:
            try:
                await self.misses.find(request, token)  # a scanner's misses count here too
                await self.devices.delete(token)
            except DeviceError as error:
                return _error(request, error.status, error.reason)
            return _answer(request, 204)
        return defer.Deferred.fromCoroutine(delete())

    # The apps

    @app.route("/owntracks", methods=["POST"])
    def owntracks(self, request: Request) -> defer.Deferred:
        """OwnTracks in HTTP mode, the token as the Basic auth password."""
        return self._owntracks(request, _basic_password(request))

    @app.route("/owntracks/<token>", methods=["POST"])
    def owntracks_token(self, request: Request, token: str) -> defer.Deferred:
        return self._owntracks(request, token)

    def _owntracks(self, request: Request, token: Optional[str]) -> defer.Deferred:
        async def report() -> bytes:
            if not token:
                request.setHeader(b"WWW-Authenticate", b'Basic realm="livemap"')
                return _error(request, 401, "the device's token is the password")
            body = _body(request, MAX_REPORT_BYTES)
            fix = parse_owntracks(body)
            device = await self.misses.find(request, token)
            if fix is None:
                return _answer(request, 200, b"[]")
            await self.map_ready(device.map)
            await self.devices.report(device, fix)
            map_state = self.devices.hub.maps.get(device.map)
            answer = self.friends.answer(
                device.map, map_state.pins if map_state is not None else {}, device.id,
                fix.tid, fix.lat, fix.lng, self.devices.clock.seconds())
            return _answer(request, 200, answer)
        return self._guarded(request, report)

    @app.route("/osmand", methods=["GET", "POST"])
    def osmand(self, request: Request) -> defer.Deferred:
        """
        The OsmAnd protocol: query parameters (OsmAnd, GPSLogger, the
        classic Traccar Client), a form body (Traccar Client 10), or
        Traccar Client 9's JSON.
        """
        async def report() -> bytes:
            query = request.uri.split(b"?", 1)[1] if b"?" in request.uri else b""
            body = _body(request, MAX_REPORT_BYTES) if request.method == b"POST" else b""
            kind = (_header(request, b"content-type") or "").split(";")[0].strip().lower()
            if not query.strip() and (kind == "application/json" or body.lstrip()[:1] == b"{"):
                token, fix = parse_traccar_json(body)
            else:
                source = query if query.strip() else body
                try:
                    params = dict(parse_qsl(source.decode("utf-8"), keep_blank_values=True,
                                            max_num_fields=64))
                except (UnicodeDecodeError, ValueError):
                    raise BadReport("the parameters are not a query string") from None
                token, fix = parse_osmand(params, int(self.devices.clock.seconds() * 1000))
            device = await self.misses.find(request, token)
            await self.map_ready(device.map)
            await self.devices.report(device, fix)
            return _answer(request, 200, b"", b"text/plain")
        return self._guarded(request, report)

    @app.route("/overland", methods=["POST"])
    def overland(self, request: Request) -> defer.Deferred:
        """Overland: the token as ?token= or a Bearer token."""
        args: dict[bytes, list[bytes]] = request.args or {}
        token = (args.get(b"token") or [b""])[0].decode("utf-8", "replace") or _bearer(request)
        return self._overland(request, token)

    @app.route("/overland/<token>", methods=["POST"])
    def overland_token(self, request: Request, token: str) -> defer.Deferred:
        return self._overland(request, token)

    def _overland(self, request: Request, token: Optional[str]) -> defer.Deferred:
        async def report() -> bytes:
            if not token:
                return _error(request, 401, "the device's token is required")
            batch = parse_overland(_body(request, MAX_BATCH_BYTES),
                                   int(self.devices.clock.seconds() * 1000))
            device = await self.misses.find(request, token)
            self.devices.stats["skipped"] += batch.skipped
            if batch.fix is not None:
                await self.map_ready(device.map)
                await self.devices.report(device, batch.fix)
            # Exactly this, or the app keeps the batch and sends it again.
            return _answer(request, 200, b'{"result":"ok"}')
        return self._guarded(request, report)

    def _guarded(self, request: Request, report: Callable[[], Any]) -> defer.Deferred:
        async def guarded() -> bytes:
            try:
                return await report()
            except TooLarge:
                return _error(request, 413, "body too large")
            except BadReport as bad:
                return _error(request, 400, bad.reason)
            except DeviceError as error:
                return _error(request, error.status, error.reason)
        return defer.Deferred.fromCoroutine(guarded())


def _header(request: Request, name: bytes) -> Optional[str]:
    value = request.getHeader(name)
    return None if value is None else value.decode("latin-1")


def _basic_password(request: Request) -> Optional[str]:
    value = request.getHeader(b"authorization") or b""
    scheme, _, encoded = value.partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded.partition(":")[2] or None


def _bearer(request: Request) -> Optional[str]:
    value = (request.getHeader(b"authorization") or b"").decode("latin-1")
    scheme, _, token = value.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None
