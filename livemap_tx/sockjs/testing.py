"""
Drive a SockJS resource in memory, through twisted.web's real HTTP channel.

Each request gets its own ``HTTPChannel`` over a ``StringTransport``, so
responses carry exactly the headers, chunking and connection handling a
real client sees, while streaming responses can be read frame by frame,
paused like a full TCP buffer, or aborted like a client that went away.
Time stays in the caller's hands: pass the same ``task.Clock`` the resource
was given.
"""

from __future__ import annotations

from typing import Mapping

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTime
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource
from twisted.web.server import Site

from .session import SockJSConnection

__all__ = ["HandlerLog", "MemoryClient", "MemoryResponse", "RecordingHandler"]


class MemoryResponse:
    """One request's response, parsed as the bytes arrive."""

    def __init__(self, channel: HTTPChannel, transport: StringTransport) -> None:
        self.channel = channel
        self.transport = transport
        self.status: int | None = None
        self.http_version = ""
        self._headers: list[tuple[str, str]] = []
        self.chunks: list[bytes] = []
        self.finished = False
        self._raw = b""
        self._head_done = False
        self._chunked = False
        self._length: int | None = None
        self._read_index = 0
        self.update()

    # -- parsing -------------------------------------------------------------

    def update(self) -> "MemoryResponse":
        """Parse whatever the server wrote since the last call."""
        data = self.transport.value()
        self.transport.clear()
        self._raw += data
        if not self._head_done:
            if b"\r\n\r\n" not in self._raw:
                return self
            head, self._raw = self._raw.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            version, status = lines[0].split(" ")[:2]
            self.http_version = version
            self.status = int(status)
            for line in lines[1:]:
                name, value = line.split(":", 1)
                self._headers.append((name.strip().lower(), value.strip()))
            self._head_done = True
            self._chunked = (self.header("transfer-encoding") or "").lower() == "chunked"
            length = self.header("content-length")
            self._length = int(length) if length is not None else None
            if self.status in (204, 304):
                self._length = 0
        if self._chunked:
            while True:
                if b"\r\n" not in self._raw:
                    break
                size_line, rest = self._raw.split(b"\r\n", 1)
                size = int(size_line.split(b";")[0], 16)
                if len(rest) < size + 2:
                    break
                self._raw = rest[size + 2 :]
                if size == 0:
                    self.finished = True
                    break
                self.chunks.append(rest[:size])
        elif self._raw:
            self.chunks.append(self._raw)
            self._raw = b""
        if not self._chunked and self._length is not None and len(self.body) >= self._length:
            self.finished = True
        if self.transport.disconnecting:
            self.finished = True
        return self

    def header(self, name: str) -> str | None:
        """The (last) value of a response header, or None."""
        values = self.headers(name)
        return values[-1] if values else None

    def headers(self, name: str) -> list[str]:
        name = name.lower()
        return [value for key, value in self._headers if key == name]

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def read(self) -> list[bytes]:
        """Chunks (one per ``request.write``) that arrived since the last read."""
        self.update()
        new = self.chunks[self._read_index :]
        self._read_index = len(self.chunks)
        return new

    # -- the client's side of the connection -------------------------------

    def abort(self) -> None:
        """The client goes away mid-response."""
        self.channel.connectionLost(Failure(ConnectionDone("client went away")))

    def pause(self) -> None:
        """The TCP send buffer filled up: the transport pauses its producer."""
        producer = self.transport.producer
        assert producer is not None
        producer.pauseProducing()

    def resume(self) -> None:
        """The TCP send buffer drained."""
        producer = self.transport.producer
        assert producer is not None
        producer.resumeProducing()


class MemoryClient:
    """Makes requests against a resource tree without sockets."""

    def __init__(self, root: IResource, clock: IReactorTime) -> None:
        self.site = Site(root, timeout=None, reactor=clock)
        self.peer = IPv4Address("TCP", "10.0.0.7", 50123)

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        http: str = "1.1",
    ) -> MemoryResponse:
        """Send one request on a fresh connection and return its response so far."""
        transport = StringTransport(peerAddress=self.peer)
        channel = self.site.buildProtocol(self.peer)
        assert channel is not None
        channel.makeConnection(transport)
        lines = [f"{method} {path} HTTP/{http}", "Host: sockjs.test"]
        sent = {k.lower() for k in (headers or {})}
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        if "content-length" not in sent and (body or method in ("POST", "PUT")):
            lines.append(f"Content-Length: {len(body)}")
        channel.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        return MemoryResponse(channel, transport)

    def get(self, path: str, **kwargs: object) -> MemoryResponse:
        return self.request("GET", path, **kwargs)  # type: ignore[arg-type]

    def post(self, path: str, body: bytes = b"", **kwargs: object) -> MemoryResponse:
        return self.request("POST", path, body=body, **kwargs)  # type: ignore[arg-type]

    def options(self, path: str, **kwargs: object) -> MemoryResponse:
        return self.request("OPTIONS", path, **kwargs)  # type: ignore[arg-type]


class RecordingHandler:
    """A handler that remembers what happened to its session (for tests)."""

    def __init__(self, conn: SockJSConnection, echo: bool = False) -> None:
        self.conn = conn
        self.echo = echo
        self.messages: list[str] = []
        self.lost: list[tuple[int, str]] = []
        self.flow: list[str] = []

    def message_received(self, message: str) -> None:
        self.messages.append(message)
        if self.echo:
            self.conn.send(message)

    def connection_lost(self, code: int, reason: str) -> None:
        self.lost.append((code, reason))

    def pause_writing(self) -> None:
        self.flow.append("pause")

    def resume_writing(self) -> None:
        self.flow.append("resume")


class HandlerLog:
    """A ``handler_factory`` that keeps every handler it made, newest last."""

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.handlers: list[RecordingHandler] = []

    def __call__(self, conn: SockJSConnection) -> RecordingHandler:
        handler = RecordingHandler(conn, echo=self.echo)
        self.handlers.append(handler)
        return handler

    @property
    def last(self) -> RecordingHandler:
        return self.handlers[-1]
