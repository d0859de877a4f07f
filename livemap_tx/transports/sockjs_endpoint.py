"""
The SockJS transport of livemap: SockJS sessions in, hub frames out.

The SockJS library (livemap_tx.sockjs) knows nothing of livemap; this
adapter turns each session into a `Client` on the map named by its mount
point (/sockjs/{map}), exactly as ws.py does for WebSocket.
"""

from __future__ import annotations

from typing import Callable, Optional, cast

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .. import wire
from ..admission import Admission, Refused
from .client import Client
from ..hub import Frame, Hub, MapFull
from ..privacy import map_label as log_name
from ..sockjs import SockJSConnection, SockJSResource, quote

SOCKJS_CLIENT_PATH = "/vendor/sockjs-client/sockjs.min.js"
# Frame.cache key: a broadcast is quoted into a SockJS string once per tick.
_QUOTED = object()


class SockJSClient:
    """One SockJS session as a livemap client (the hub's Subscriber)."""

    log = Logger()

    client: Optional[Client] = None
    address: Optional[str] = None

    def __init__(self, connection: SockJSConnection, hub: Hub, rate: float,
                 admission: Admission, precision: float = 0.0) -> None:
        self.connection = connection
        self.admission = admission
        self.map_name = connection.prefix[-1].decode("ascii")
        headers = connection.headers
        peer = connection.remote_address
        try:
            admission.check_origin(headers.get("origin"), headers.get("host"))
            address = admission.client_address(
                getattr(peer, "host", "unknown"), headers.get("x-forwarded-for"))
            admission.acquire(address)
        except Refused as refused:
            # SockJS has no way to refuse before the session opens: close it
            # at once with the policy code and the reason.
            self.log.info("refused a SockJS session on map {map}: {reason}",
                          map=log_name(self.map_name), reason=refused.reason)
            connection.close(wire.CLOSE_POLICY, refused.reason)
            return
        try:
            self.client = Client(hub, self.map_name, self, rate=rate, precision=precision)
        except MapFull as full:
            admission.release(address)
            connection.close(wire.CLOSE_POLICY, str(full))
            return
        self.address = address
        if connection.paused:
            # The welcome went over the high-water mark before the member
            # existed to be told.
            self.client.pause()
        self.log.info("client {client} opened on map {map} over SockJS {transport}",
                      client=self.client.id, map=log_name(self.map_name),
                      transport=connection.transport_name)

    # SockJSHandler

    def message_received(self, message: str) -> None:
        if self.client is not None:
            self.client.message_received(message)

    def connection_lost(self, code: int, reason: str) -> None:
        client, self.client = self.client, None
        address, self.address = self.address, None
        if address is not None:
            self.admission.release(address)
        if client is not None:
            client.connection_lost()
            self.log.info("client {client} closed on map {map}: {code} {reason}",
                          client=client.id, map=log_name(self.map_name), code=code,
                          reason=reason)

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.pause()

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.resume()

    # Subscriber

    def send_frame(self, frame: Frame) -> None:
        quoted = cast(Optional[bytes], frame.cache.get(_QUOTED))
        if quoted is None:
            quoted = frame.cache[_QUOTED] = quote(frame.payload.decode("utf-8"))
        self.connection.send_encoded(quoted)

    def close(self, code: int, reason: str) -> None:
        self.connection.close(code, reason)


def sockjs_resource(hub: Hub, clock: IReactorTime, *, rate: float, ping: float = 30.0,
                    precision: float = 0.0,
                    admission: Optional[Admission] = None) -> SockJSResource:
    """The SockJS service mounted at /sockjs/{map} (one resource for every map)."""
    shared = admission or Admission()
    factory: Callable[[SockJSConnection], SockJSClient] = (
        lambda connection: SockJSClient(connection, hub, rate, shared, precision))
    # The iframe transports load the client from this server, never a CDN.
    return SockJSResource(factory, clock, websocket_ping_interval=ping,
                          websocket_ping_timeout=ping, sockjs_url=SOCKJS_CLIENT_PATH)
