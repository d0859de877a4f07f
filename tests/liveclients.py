"""
Test clients that keep their own picture of a map, as a real client would:
`MapView` over a WebSocket, `SockJSPoller` over SockJS xhr-polling, and
ways to make a client stop reading the way a stalled phone does.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable, Optional

import orjson
import treq
from twisted.internet import reactor
from twisted.web.client import HTTPConnectionPool

from wsclient import WSClient, connect

WAIT = 10.0


class MapView:
    """What one client believes the map is, from the messages it was sent."""

    def __init__(self, client: WSClient) -> None:
        self.client = client
        self.id: Optional[str] = None
        self.pins: dict[str, tuple] = {}
        self.states: dict[str, dict] = {}

    def _apply(self, message: dict) -> None:
        kind = message["type"]
        if kind == "welcome":
            self.id = message["id"]
        if kind in ("welcome", "snapshot"):
            self.pins = {}
            self.states = {}
        pin_ids = [pin["id"] for pin in message.get("pins", ())]
        gone = message.get("gone", ())
        assert len(set(pin_ids)) == len(pin_ids), f"a pin twice in {message}"
        assert not set(pin_ids) & set(gone), f"a pin in pins and gone: {message}"
        for pin in message.get("pins", ()):
            self.pins[pin["id"]] = (pin["lat"], pin["lng"], pin["name"])
            self.states[pin["id"]] = pin
        for pin_id in gone:
            self.pins.pop(pin_id, None)
            self.states.pop(pin_id, None)

    def take_messages(self) -> None:
        while self.client.messages:
            self._apply(self.client.messages.pop(0))

    async def until(self, predicate: Callable[[dict], bool], timeout: float = WAIT) -> dict:
        deadline = reactor.seconds() + timeout
        while True:
            self.take_messages()
            if self.id is not None and predicate(self.pins):
                return self.pins
            remaining = deadline - reactor.seconds()
            if remaining <= 0:
                raise AssertionError(f"the view never got there: {self.pins}")
            try:
                self._apply(await self.client.next(timeout=remaining))
            except AssertionError:
                if self.client.closed.called:
                    raise

    def move(self, lat: float, lng: float, **extra: Any) -> None:
        self.client.send({"type": "move", "lat": lat, "lng": lng, **extra})

    def hello(self, name: str) -> None:
        self.client.send({"type": "hello", "name": name})


async def open_view(url: str) -> MapView:
    view = MapView(await connect(url))
    await view.until(lambda pins: True)
    return view


def stop_reading(client: WSClient) -> None:
    """
    The client stops reading its socket, with small socket buffers, so that
    what the server writes next piles up in the server's own buffer soon.
    """
    assert client.protocol is not None and client.protocol.transport is not None
    transport: Any = client.protocol.transport
    transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    transport.pauseProducing()


def start_reading(client: WSClient) -> None:
    """The client reads again, at full speed (a tiny window trickles on loopback)."""
    assert client.protocol is not None and client.protocol.transport is not None
    transport: Any = client.protocol.transport
    transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    transport.resumeProducing()


class SockJSPoller:
    """A SockJS xhr-polling session, each request on a fresh TCP connection."""

    def __init__(self, url: str, session: str, pool: Optional[HTTPConnectionPool] = None,
                 map_name: str = "public") -> None:
        self.base = f"{url}/sockjs/{map_name}/000/{session}"
        self.pool = pool
        self.view = MapView(WSClient())
        self.closed: Optional[list] = None

    async def poll(self) -> list[dict]:
        response = await treq.post(f"{self.base}/xhr", pool=self.pool)
        body = (await response.text()).strip()
        assert response.code == 200, body
        messages = []
        if body.startswith("a"):
            messages = [orjson.loads(item) for item in orjson.loads(body[1:])]
            for message in messages:
                self.view._apply(message)
        elif body.startswith("c"):
            self.closed = orjson.loads(body[1:])
        return messages

    async def send(self, message: dict) -> None:
        response = await treq.post(f"{self.base}/xhr_send", pool=self.pool,
                                   data=orjson.dumps([orjson.dumps(message).decode()]))
        assert response.code == 204, await response.text()


async def sockjs_session(url: str, session: str, pool: Optional[HTTPConnectionPool] = None,
                         map_name: str = "public") -> SockJSPoller:
    poller = SockJSPoller(url, session, pool, map_name)
    assert await poller.poll() == [], "the session opens with 'o'"
    return poller


class StalledSocket:
    """
    A WebSocket client on a plain non-blocking socket whose receive buffer
    is made tiny before it connects, and that never reads: what a phone
    that stopped reading looks like to a server in another process. It can
    still send (masked frames), and `drain` reads what arrived at last.
    """

    def __init__(self, port: int, path: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        self.sock.setblocking(False)
        self.sock.connect_ex(("127.0.0.1", port))
        self.path = path
        self.port = port
        self.received = b""

    async def open(self) -> None:
        """Send the upgrade and read the answer head (and nothing more)."""
        from conftest import deferLater

        request = (f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                   "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                   "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                   "Sec-WebSocket-Version: 13\r\n\r\n").encode()
        await self._send_all(request)
        for _ in range(500):
            try:
                chunk = self.sock.recv(1)
            except BlockingIOError:
                await deferLater(0.01)
                continue
            if not chunk:
                raise ConnectionError("closed during the upgrade")
            self.received += chunk
            if self.received.endswith(b"\r\n\r\n"):
                assert self.received.startswith(b"HTTP/1.1 101"), self.received
                self.received = b""
                return
        raise AssertionError("no upgrade answer")

    async def send(self, message: dict) -> None:
        payload = orjson.dumps(message)
        mask = os.urandom(4)
        head = bytes([0x81])
        if len(payload) < 126:
            head += bytes([0x80 | len(payload)])
        else:
            head += bytes([0x80 | 126]) + len(payload).to_bytes(2, "big")
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        await self._send_all(head + mask + masked)

    async def _send_all(self, data: bytes) -> None:
        from conftest import deferLater

        while data:
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                await deferLater(0.01)
                continue
            data = data[sent:]

    def drain(self) -> bytes:
        """Read whatever is there now (non-blocking); b'' once closed."""
        chunks = []
        while True:
            try:
                chunk = self.sock.recv(65536)
            except BlockingIOError:
                break
            except ConnectionError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        data = b"".join(chunks)
        self.received += data
        return data

    def messages(self) -> list[dict]:
        """Every whole text message received so far (server frames are unmasked)."""
        found, data = [], self.received
        while len(data) >= 2:
            opcode, length, at = data[0] & 0x0F, data[1] & 0x7F, 2
            if length == 126:
                length, at = int.from_bytes(data[2:4], "big"), 4
            elif length == 127:
                length, at = int.from_bytes(data[2:10], "big"), 10
            if len(data) < at + length:
                break
            if opcode == 1:
                found.append(orjson.loads(data[at:at + length]))
            data = data[at + length:]
        return found

    def close(self) -> None:
        self.sock.close()
