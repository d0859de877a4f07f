"""
The WebSocket endpoint reads small whole text frames itself and leaves the
rest to Autobahn (livemap_tx/transports/small_frames.py). Whatever bytes a
client sends, in whatever chunks, the endpoint must do exactly what
Autobahn alone does: the same messages reach the client's handler, the
same bytes go back (pongs, close frames), the same state at the end.
"""

from __future__ import annotations

import base64
import os
import struct

from hypothesis import given, settings, strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from livemap_tx.hub import Hub
from livemap_tx.transports.small_frames import (
    SMALL_FRAME_LIMIT, small_text_frame, text_frame, unmask)
from livemap_tx.transports.ws import LiveMapFactory, LiveMapProtocol


def reference_unmask(mask: bytes, payload: bytes) -> bytes:
    return bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@given(mask=st.binary(min_size=4, max_size=4), payload=st.binary(max_size=600))
def test_unmask_is_the_rfc_6455_xor(mask, payload):
    assert unmask(mask, payload) == reference_unmask(mask, payload)


@settings(max_examples=200)
@given(payload=st.one_of(st.binary(max_size=300),
                         st.sampled_from([125, 126, 127, 65535, 65536, 70000]).map(
                             lambda n: b"x" * n)))
def test_a_server_frame_is_what_autobahn_frames(payload):
    clock = Clock()
    factory = LiveMapFactory(Hub(clock), clock)
    assert text_frame(payload) == factory.prepareMessage(payload).payloadHybi


def frame(payload: bytes, *, opcode: int = 1, fin: bool = True, masked: bool = True,
          rsv: int = 0, mask: bytes = b"\x01\x02\x03\x04", long_form: bool = False) -> bytes:
    """A client frame, as a browser would send it (or as told not to)."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    length = len(payload)
    mask_bit = 0x80 if masked else 0
    if length < 126 and not long_form:
        header = bytes([first, mask_bit | length])
    elif length < 65536:
        header = bytes([first, mask_bit | 126]) + struct.pack("!H", length)
    else:
        header = bytes([first, mask_bit | 127]) + struct.pack("!Q", length)
    if not masked:
        return header + payload
    return header + mask + reference_unmask(mask, payload)


def test_a_small_text_frame_is_read_and_anything_else_is_left():
    move = b'{"type":"move","lat":1,"lng":2}'
    data = frame(move) + frame(b"x" * 300) + frame(b"ping", opcode=9)
    first = small_text_frame(data, 0)
    assert first is not None and first[0] == move
    second = small_text_frame(data, first[1])
    assert second is not None and second[0] == b"x" * 300
    assert small_text_frame(data, second[1]) is None  # a ping: Autobahn's
    assert small_text_frame(frame(b"\xff\xfe"), 0) is None  # not UTF-8
    assert small_text_frame(frame(move, masked=False), 0) is None
    assert small_text_frame(frame(move, fin=False), 0) is None
    assert small_text_frame(frame(move, opcode=2), 0) is None
    assert small_text_frame(frame(move, rsv=4), 0) is None
    assert small_text_frame(frame(move, long_form=True), 0) is None  # not minimal
    assert small_text_frame(frame(b"y" * (SMALL_FRAME_LIMIT + 1)), 0) is None
    assert small_text_frame(frame(move)[:-1], 0) is None  # not all in hand


class Recorder:
    """Stands in for the hub's client: records what reaches it."""

    closed = False

    def __init__(self) -> None:
        self.received: list[tuple[bytes, bool]] = []

    def message_received(self, payload: bytes, binary: bool = False) -> None:
        self.received.append((bytes(payload), binary))

    def connection_lost(self) -> None:
        pass

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass


class AutobahnOnly(LiveMapProtocol):
    """The endpoint without the small-frame reader: every byte through Autobahn."""

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self._dataReceived(data)


def opened(protocol_class: type) -> tuple[LiveMapProtocol, StringTransport, Recorder]:
    """An endpoint after a real opening handshake, its client replaced by a recorder."""
    clock = Clock()
    factory = LiveMapFactory(Hub(clock), clock, ping_interval=0, ping_timeout=0)
    if protocol_class is not LiveMapProtocol:
        factory.protocol = type("Under", (protocol_class, factory.protocol), {})
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
    protocol.makeConnection(transport)
    # As behind twisted.web's upgrade: the channel is the producer, which
    # the endpoint replaces with its own when it opens.
    transport.registerProducer(protocol, True)
    key = base64.b64encode(os.urandom(16)).decode()
    protocol.dataReceived((
        "GET /ws/fuzz HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode())
    assert protocol.state == protocol.STATE_OPEN, transport.value()
    recorder = Recorder()
    protocol.client = recorder  # type: ignore[assignment]
    transport.clear()
    return protocol, transport, recorder


texts = st.one_of(st.text(max_size=40).map(str.encode), st.binary(max_size=40),
                  st.sampled_from([b"\xff\xfe", b'{"a":"\xc3"}', "é".encode() * 70]),
                  st.integers(120, 140).map(lambda n: b"a" * n),
                  st.just(b"b" * (SMALL_FRAME_LIMIT + 3)))
frames = st.one_of(
    texts.map(frame),
    texts.map(lambda p: frame(p, long_form=True)),
    texts.map(lambda p: frame(p, masked=False)),
    texts.map(lambda p: frame(p, opcode=2)),
    texts.map(lambda p: frame(p, rsv=2)),
    st.tuples(texts, texts).map(lambda ab: frame(ab[0], fin=False) + frame(ab[1], opcode=0)),
    texts.map(lambda p: frame(p, fin=False)),
    texts.map(lambda p: frame(p[:100], opcode=9)),
    texts.map(lambda p: frame(p[:100], opcode=10)),
    st.just(frame(struct.pack("!H", 1000) + b"bye", opcode=8)),
    st.binary(min_size=1, max_size=12),
)


@settings(max_examples=300, deadline=None)
@given(stream=st.lists(frames, max_size=8), cuts=st.lists(st.integers(0, 10_000), max_size=6))
def test_the_endpoint_does_what_autobahn_alone_does(stream, cuts):
    data = b"".join(stream)
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    chunks = [data[a:b] for a, b in zip(points, points[1:])]
    outcomes = []
    for protocol_class in (LiveMapProtocol, AutobahnOnly):
        protocol, transport, recorder = opened(protocol_class)
        for chunk in chunks:
            protocol.dataReceived(chunk)
        outcomes.append((recorder.received, transport.value(), protocol.state,
                         transport.disconnecting))
    assert outcomes[0] == outcomes[1]


def test_moves_in_one_read_all_reach_the_client():
    protocol, transport, recorder = opened(LiveMapProtocol)
    moves = [f'{{"type":"move","lat":{i},"lng":2}}'.encode() for i in range(50)]
    protocol.dataReceived(b"".join(frame(m) for m in moves))
    assert [payload for payload, _ in recorder.received] == moves
    assert transport.value() == b""
