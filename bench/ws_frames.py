"""
What reading a move frame and framing an update cost the WebSocket endpoint,
in one process, no network: livemap's own small-frame reader and writer
(livemap_tx/transports/small_frames.py) against Autobahn's.

    .venv/bin/python bench/ws_frames.py --frames 20000

Prints microseconds of process time per frame, the median of --rounds.
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import time

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from livemap_tx.hub import Hub
from livemap_tx.transports.small_frames import text_frame
from livemap_tx.transports.ws import LiveMapFactory, LiveMapProtocol

MOVE = (b'{"type":"move","lat":48.8566123,"lng":2.3522456,"heading":123,'
        b'"accuracy":12,"seq":12345}')
UPDATE = (b'{"type":"update","pins":[' + b",".join(
    b'{"id":"p%05d","lat":48.85,"lng":2.35,"heading":90,"accuracy":5,"seq":1,"ts":1}' % k
    for k in range(6)) + b'],"gone":[],"total":4000}')


class Counting:
    """Stands in for the hub's client: counts what reaches it."""

    closed = False
    received = 0

    def message_received(self, payload: bytes, binary: bool = False) -> None:
        self.received += 1


class AutobahnOnly(LiveMapProtocol):
    """The endpoint with every byte through Autobahn's reader."""

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self._dataReceived(data)


def masked(payload: bytes, mask: bytes = b"\x11\x22\x33\x44") -> bytes:
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes((0x81, 0x80 | len(payload))) + mask + body


def opened(factory: LiveMapFactory, protocol_class: type) -> tuple[LiveMapProtocol, Counting]:
    """An endpoint after a real opening handshake, its client a counter."""
    if protocol_class is not LiveMapProtocol:
        factory.protocol = type("Under", (protocol_class, factory.protocol), {})
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
    protocol.makeConnection(transport)
    transport.registerProducer(protocol, True)
    key = base64.b64encode(os.urandom(16)).decode()
    protocol.dataReceived((
        "GET /ws/bench HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode())
    assert protocol.state == protocol.STATE_OPEN
    counter = Counting()
    protocol.client = counter  # type: ignore[assignment]
    return protocol, counter


def per_frame_us(work, count: int) -> float:
    started = time.process_time()
    work()
    return (time.process_time() - started) / count * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    frames = [masked(MOVE)] * args.frames
    results: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, cls in (("read: Autobahn", AutobahnOnly), ("read: livemap", LiveMapProtocol)):
            clock = Clock()
            protocol, counter = opened(LiveMapFactory(Hub(clock), clock), cls)
            results.setdefault(name, []).append(per_frame_us(
                lambda: [protocol.dataReceived(f) for f in frames], args.frames))
            assert counter.received == args.frames
        clock = Clock()
        factory = LiveMapFactory(Hub(clock), clock)
        results.setdefault("frame an update: Autobahn", []).append(per_frame_us(
            lambda: [factory.prepareMessage(UPDATE).payloadHybi for _ in range(args.frames)],
            args.frames))
        results.setdefault("frame an update: livemap", []).append(per_frame_us(
            lambda: [text_frame(UPDATE) for _ in range(args.frames)], args.frames))
    for name, values in results.items():
        print(f"{name}: {statistics.median(values):.2f} us a frame "
              f"(median of {len(values)}: {', '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()
