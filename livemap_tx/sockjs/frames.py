"""
SockJS framing: pure functions, no Twisted.

The protocol (0.3.3) has four frames the server sends:

- ``o``: the session is open (always the first frame of a session),
- ``h``: heartbeat, keeps proxies from closing an idle connection,
- ``a[...]``: an array of JSON-encoded messages,
- ``c[code,"reason"]``: the session is closed.

Messages are kept as already-encoded JSON string literals (``bytes``) from
the moment they are queued: a broadcast encodes once and every session joins
the same bytes into its ``a[...]`` frame.

Incoming payloads (``xhr_send``, ``jsonp_send`` and websocket frames) are a
JSON array of strings; a websocket frame may also hold one JSON string.
"""

from __future__ import annotations

import json
import re
from typing import Iterable, Sequence

__all__ = [
    "OPEN",
    "HEARTBEAT",
    "PayloadError",
    "close_frame",
    "decode_payload",
    "decode_websocket_payload",
    "message_frame",
    "quote",
    "unquote",
]

OPEN = b"o"
HEARTBEAT = b"h"

# Characters the server must escape in what it sends. JavaScript and some
# browsers mangle these when they travel raw (the sockjs-protocol suite's
# ``escapable_by_server``), and lone surrogates cannot be UTF-8 encoded at
# all. ``<``, ``>`` and ``&`` are escaped too: frames end up inside
# ``<script>`` blocks (htmlfile) and JavaScript callbacks (jsonp), where a
# raw ``</script>`` would let a message break out of the string.
_ESCAPE = re.compile("[\x00-\x1f\u200c-\u200f\u2028-\u202f\u2060-\u206f\ufff0-\uffff\ud800-\udfff<>&]")


def _escape_char(match: re.Match[str]) -> str:
    return "\\u%04x" % ord(match.group(0))


def quote(message: str) -> bytes:
    """
    Encode one message as a JSON string literal, as SockJS wants it.

    The result is what ``SockJSConnection.send_encoded`` takes: encode a
    broadcast once with this and hand the same bytes to every session.
    """
    # json.dumps escapes control characters and quotes; ensure_ascii=False
    # keeps the rest readable and compact. Then escape what SockJS clients
    # cannot take raw.
    text = json.dumps(message, ensure_ascii=False)
    return _ESCAPE.sub(_escape_char, text).encode("utf-8")


def unquote(encoded: bytes) -> str:
    """Decode a JSON string literal back to the message (raw websocket needs the text)."""
    value = json.loads(encoded)
    if not isinstance(value, str):
        raise ValueError("not a JSON string literal")
    return value


def message_frame(encoded: Sequence[bytes]) -> bytes:
    """Join encoded messages into one ``a[...]`` frame, never re-encoding them."""
    return b"a[" + b",".join(encoded) + b"]"


def close_frame(code: int, reason: str) -> bytes:
    """A ``c[code,"reason"]`` frame."""
    return b"c[%d," % (code,) + quote(reason) + b"]"


class PayloadError(ValueError):
    """
    An incoming payload the protocol rejects.

    ``str(error)`` is the exact text SockJS servers answer with
    ("Payload expected." or "Broken JSON encoding.").
    """


PAYLOAD_EXPECTED = "Payload expected."
BROKEN_JSON = "Broken JSON encoding."


def _loads(data: bytes | str) -> object:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise PayloadError(BROKEN_JSON) from None


def _strings(items: Iterable[object]) -> list[str]:
    messages = []
    for item in items:
        if not isinstance(item, str):
            # sockjs-client only ever sends strings; anything else is not a
            # SockJS payload.
            raise PayloadError(BROKEN_JSON)
        messages.append(item)
    return messages


def decode_payload(data: bytes | str) -> list[str]:
    """
    Decode an ``xhr_send``/``jsonp_send`` payload: a JSON array of strings.

    An empty body or a non-array is "Payload expected.", unparsable JSON is
    "Broken JSON encoding." (the texts the protocol test suite checks).
    """
    if not data:
        raise PayloadError(PAYLOAD_EXPECTED)
    value = _loads(data)
    if not isinstance(value, list):
        raise PayloadError(PAYLOAD_EXPECTED)
    return _strings(value)


def decode_websocket_payload(data: bytes) -> list[str]:
    """
    Decode one frame of the framed websocket transport.

    Empty frames are ignored (no messages); ``[...]`` is an array of
    messages, anything else one JSON-encoded message.
    """
    if not data:
        return []
    value = _loads(data)
    if isinstance(value, list):
        return _strings(value)
    return _strings([value])
