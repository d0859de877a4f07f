"""
The SockJS transport of livemap: SockJS sessions in, hub frames out.

The SockJS library (livemap_tx.sockjs) knows nothing of livemap; this
adapter turns each session into a `Client` on the map named by its mount
point (/sockjs/{map}), exactly as ws.py does for WebSocket.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .client import Client
from .hub import Frame, Hub
from .sockjs import SockJSConnection, SockJSResource, quote

# Frame.cache key: a broadcast is quoted into a SockJS string once per tick.
_QUOTED = object()


class SockJSClient:
    """One SockJS session as a livemap client (the hub's Subscriber)."""

    log = Logger()

    def __init__(self, connection: SockJSConnection, hub: Hub, rate: float) -> None:
        self.connection = connection
        self.map_name = connection.prefix[-1].decode("ascii")
        self.client = Client(hub, self.map_name, self, rate=rate)
        self.log.info("client {client} opened on map {map} over SockJS {transport}",
                      client=self.client.id, map=self.map_name,
                      transport=connection.transport_name)

    # SockJSHandler

    def message_received(self, message: str) -> None:
        self.client.message_received(message)

    def connection_lost(self, code: int, reason: str) -> None:
        self.client.connection_lost()
        self.log.info("client {client} closed on map {map}: {code} {reason}",
                      client=self.client.id, map=self.map_name, code=code, reason=reason)

    def pause_writing(self) -> None:
        self.client.pause()

    def resume_writing(self) -> None:
        self.client.resume()

    # Subscriber

    def send_frame(self, frame: Frame) -> None:
        quoted = frame.cache.get(_QUOTED)
        if quoted is None:
            quoted = frame.cache[_QUOTED] = quote(frame.payload.decode("utf-8"))
        self.connection.send_encoded(quoted)

    def close(self, code: int, reason: str) -> None:
        self.connection.close(code, reason)


def sockjs_resource(hub: Hub, clock: IReactorTime, *, rate: float,
                    ping: float = 30.0) -> SockJSResource:
    """The SockJS service mounted at /sockjs/{map} (one resource for every map)."""
    factory: Callable[[SockJSConnection], SockJSClient] = (
        lambda connection: SockJSClient(connection, hub, rate))
    return SockJSResource(factory, clock, websocket_ping_interval=ping,
                          websocket_ping_timeout=ping)
