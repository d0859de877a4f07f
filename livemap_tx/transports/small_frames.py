"""
The WebSocket frames livemap reads and writes itself: the small, whole,
masked text frames its clients send most (a move is about 80 bytes), and
the server's own text frames (unmasked, never compressed: their bytes are
the header and the payload).

Autobahn reads every frame through a dozen method calls, a masker object
and an incremental UTF-8 validator: about 30 microseconds a frame, which at
10,000 moves a second is a quarter of a core. This reads only the frames
that need none of that (FIN set, no RSV bits, opcode text, masked, payload
under SMALL_FRAME_LIMIT in the minimal length encoding, all of it in hand,
valid UTF-8) and leaves everything else, from the first byte it does not
take, to Autobahn: control frames, fragments, binary frames, partial
frames, and every kind of violation, so that errors and close codes are
Autobahn's own.
"""

from __future__ import annotations

from typing import Optional

# Larger frames are rare (a `hello` with a long name, a `view`) and go
# through Autobahn.
SMALL_FRAME_LIMIT = 4096
_FIN_TEXT = 0x81


def text_frame(payload: bytes) -> bytes:
    """A whole server-to-client text frame (RFC 6455 section 5.2), as Autobahn would frame it."""
    length = len(payload)
    if length < 126:
        return bytes((_FIN_TEXT, length)) + payload
    if length < 65536:
        return bytes((_FIN_TEXT, 126)) + length.to_bytes(2, "big") + payload
    return bytes((_FIN_TEXT, 127)) + length.to_bytes(8, "big") + payload


def unmask(mask: bytes, payload: bytes) -> bytes:
    """RFC 6455 section 5.3: XOR with the 4-byte mask, repeated."""
    length = len(payload)
    if not length:
        return b""
    key = (mask * ((length >> 2) + 1))[:length]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
        length, "little")


def small_text_frame(data: bytes, pos: int) -> Optional[tuple[bytes, int]]:
    """
    The unmasked payload of the small text frame at `pos` and where the next
    frame starts, or None if the bytes there are anything else (which
    Autobahn then reads, with its own errors).
    """
    available = len(data) - pos
    if available < 6 or data[pos] != _FIN_TEXT:
        return None
    second = data[pos + 1]
    if not second & 0x80:
        return None  # unmasked: a violation, Autobahn's to report
    length = second & 0x7F
    start = pos + 6
    if length == 126:
        if available < 8:
            return None
        length = (data[pos + 2] << 8) | data[pos + 3]
        if length < 126 or length > SMALL_FRAME_LIMIT:
            return None  # not the minimal encoding, or not small
        start = pos + 8
    elif length == 127:
        return None
    end = start + length
    if end > len(data):
        return None
    payload = unmask(data[start - 4:start], data[start:end])
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return None  # Autobahn closes with 1007
    return payload, end
