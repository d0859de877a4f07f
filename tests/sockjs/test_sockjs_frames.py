"""SockJS framing and payload decoding: pure functions."""

from __future__ import annotations

import json
import re

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from livemap_tx.sockjs import frames
from livemap_tx.sockjs.conformance import make_root
from livemap_tx.sockjs.testing import MemoryClient

# What the protocol suite says a server must escape.
ESCAPABLE_BY_SERVER = re.compile("[\x00-\x1f\u200c-\u200f\u2028-\u202f\u2060-\u206f\ufff0-\uffff]")


@given(st.text())
def test_quote_round_trips_and_escapes(message: str) -> None:
    encoded = frames.quote(message)
    assert json.loads(encoded) == message
    text = encoded.decode("utf-8")
    assert not ESCAPABLE_BY_SERVER.search(text)
    assert "<" not in text and ">" not in text


def test_quote_escapes_lone_surrogates() -> None:
    assert frames.quote("\ud800") == b'"\\ud800"'


@given(st.lists(st.text(), max_size=5))
def test_message_frame_joins_encoded_messages(messages: list[str]) -> None:
    frame = frames.message_frame([frames.quote(m) for m in messages])
    assert frame[:1] == b"a"
    assert json.loads(frame[1:]) == messages


def test_message_frame_does_not_reencode_orjson_bytes() -> None:
    encoded = orjson.dumps("é\u2028")
    assert frames.message_frame([encoded]) == b"a[" + encoded + b"]"


def test_close_frame() -> None:
    assert frames.close_frame(3000, "Go away!") == b'c[3000,"Go away!"]'
    assert frames.close_frame(2010, "Another connection still open") == b'c[2010,"Another connection still open"]'


@pytest.mark.parametrize(
    "data, expected",
    [(b'["a","b"]', ["a", "b"]), (b"[]", []), ('["é"]', ["é"]), (b' [ "x" ] ', ["x"])],
)
def test_decode_payload(data: bytes | str, expected: list[str]) -> None:
    assert frames.decode_payload(data) == expected


@pytest.mark.parametrize(
    "data, error",
    [
        (b"", "Payload expected."),
        (b"{}", "Payload expected."),
        (b"null", "Payload expected."),
        (b'"a"', "Payload expected."),
        (b'["a', "Broken JSON encoding."),
        (b"[1]", "Broken JSON encoding."),
        (b"[null]", "Broken JSON encoding."),
        (b"\xff", "Broken JSON encoding."),
        (b"[" * 100000 + b"]" * 100000, "Broken JSON encoding."),
    ],
)
def test_decode_payload_errors(data: bytes, error: str) -> None:
    with pytest.raises(frames.PayloadError) as e:
        frames.decode_payload(data)
    assert str(e.value) == error


def test_decode_websocket_payload() -> None:
    assert frames.decode_websocket_payload(b"") == []
    assert frames.decode_websocket_payload(b"[]") == []
    assert frames.decode_websocket_payload(b'"one"') == ["one"]
    assert frames.decode_websocket_payload(b'["a","b"]') == ["a", "b"]
    with pytest.raises(frames.PayloadError):
        frames.decode_websocket_payload(b'["a')
    with pytest.raises(frames.PayloadError):
        frames.decode_websocket_payload(b"42")


def test_conformance_tree_serves_the_suites_four_services() -> None:
    clock = Clock()
    client = MemoryClient(make_root(clock), clock)
    assert json.loads(client.get("/echo/info").body)["websocket"] is True
    assert json.loads(client.get("/disabled_websocket_echo/info").body)["websocket"] is False
    assert json.loads(client.get("/cookie_needed_echo/info").body)["cookie_needed"] is True
    assert client.post("/close/0/a/xhr").body == b"o\n"
    assert client.post("/close/0/a/xhr").body == b'c[3000,"Go away!"]\n'
    assert client.post("/echo/0/b/xhr").body == b"o\n"
    client.post("/echo/0/b/xhr_send", b'["hi"]')
    assert client.post("/echo/0/b/xhr").body == b'a["hi"]\n'
    # Streaming responses end after 4096 bytes, as the suite assumes.
    r = client.post("/echo/0/c/xhr_streaming")
    client.post("/echo/0/c/xhr_send", ('["' + "x" * 4096 + '"]').encode())
    assert r.update().finished
    clock.advance(60)
