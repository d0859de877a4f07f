"""Parsing and encoding rules of docs/protocol.md, including fuzzing of the parser."""

from __future__ import annotations

import json
import math

import orjson
import pytest
from hypothesis import given, settings, strategies as st

from livemap_tx import wire
from livemap_tx.wire import Hello, Move, ProtocolError, View, parse


def error_code(payload) -> str:
    with pytest.raises(ProtocolError) as info:
        parse(payload)
    return info.value.code


def test_move_with_every_field():
    move = parse(b'{"type":"move","lat":-90,"lng":180,"heading":359.9,"accuracy":0,"seq":7}')
    assert move == Move(-90.0, 180.0, 359.9, 0.0, 7)


def test_move_optional_fields_may_be_null_or_absent():
    assert parse('{"type":"move","lat":1,"lng":2,"heading":null}') == Move(1.0, 2.0, None, None, None)


def test_unknown_fields_are_ignored():
    assert parse(b'{"type":"move","lat":1,"lng":2,"colour":"red"}') == Move(1.0, 2.0, None, None, None)


@pytest.mark.parametrize("payload, code", [
    (b"", "bad_json"),
    (b"{", "bad_json"),
    (b'"move"', "bad_json"),
    (b"[]", "bad_json"),
    (b"null", "bad_json"),
    (b"{}", "bad_message"),
    (b'{"type": 3}', "bad_message"),
    (b'{"type": "teleport"}', "bad_message"),
    (b'{"type": "move", "lng": 1}', "bad_message"),
    (b'{"type": "move", "lat": 1}', "bad_message"),
    (b'{"type": "move", "lat": true, "lng": 1}', "bad_message"),
    (b'{"type": "move", "lat": "1", "lng": 1}', "bad_message"),
    (b'{"type": "move", "lat": 90.0001, "lng": 1}', "out_of_range"),
    (b'{"type": "move", "lat": 1, "lng": -180.5}', "out_of_range"),
    (b'{"type": "move", "lat": NaN, "lng": 1}', "out_of_range"),
    (b'{"type": "move", "lat": Infinity, "lng": 1}', "out_of_range"),
    (b'{"type": "move", "lat": 1, "lng": 1e400}', "out_of_range"),
    (b'{"type": "move", "lat": 1, "lng": 1, "heading": 360}', "out_of_range"),
    (b'{"type": "move", "lat": 1, "lng": 1, "heading": -1}', "out_of_range"),
    (b'{"type": "move", "lat": 1, "lng": 1, "accuracy": -0.1}', "out_of_range"),
    (b'{"type": "move", "lat": 1, "lng": 1, "seq": -1}', "out_of_range"),
    (b'{"type": "move", "lat": 1, "lng": 1, "seq": 9007199254740992}', "out_of_range"),
    (b'{"type": "move", "lat": 1, "lng": 1, "seq": 123456789012345678901234567890}', "out_of_range"),
    (b'{"type": "move", "lat": 1, "lng": 1, "seq": 1.5}', "bad_message"),
    (b'{"type": "move", "lat": 1, "lng": 1, "seq": "1"}', "bad_message"),
    (b'{"type": "hello"}', "bad_message"),
    (b'{"type": "hello", "name": 5}', "bad_message"),
    (b'{"type": "hello", "name": " \\t "}', "bad_message"),
    (b'{"type": "hello", "name": "' + b"n" * 65 + b'"}', "bad_message"),
    (b'{"type": "view"}', "bad_message"),
    (b'{"type": "view", "bbox": [1, 2, 3]}', "bad_message"),
    (b'{"type": "view", "bbox": "world"}', "bad_message"),
    (b'{"type": "view", "bbox": [0, 10, 1, 5]}', "out_of_range"),
    (b'{"type": "view", "bbox": [0, -91, 1, 5]}', "out_of_range"),
    (b'{"type": "view", "bbox": [0, 0, "1", 5]}', "bad_message"),
    (b"[" * 100_000, "bad_json"),
])
def test_errors_have_the_protocols_codes(payload, code):
    assert error_code(payload) == code


def test_hello_trims_and_keeps_64_characters():
    assert parse('{"type":"hello","name":"  Zoë  "}') == Hello("Zoë")
    name = "é" * 64
    assert parse(json.dumps({"type": "hello", "name": f" {name} "})) == Hello(name)


def test_view_null_is_the_world_and_antimeridian_boxes_parse():
    assert parse(b'{"type":"view","bbox":null}') == View(None)
    assert parse(b'{"type":"view","bbox":[170,-10,-170,10]}') == View((170.0, -10.0, -170.0, 10.0))


@pytest.mark.parametrize("bbox, lat, lng, inside", [
    ((0, 0, 10, 10), 5, 5, True),
    ((0, 0, 10, 10), 5, 11, False),
    ((0, 0, 10, 10), 11, 5, False),
    ((170, -10, -170, 10), 0, 175, True),
    ((170, -10, -170, 10), 0, -175, True),
    ((170, -10, -170, 10), 0, 0, False),
])
def test_in_bbox(bbox, lat, lng, inside):
    assert wire.in_bbox(bbox, lat, lng) is inside


def test_encoded_messages_are_the_protocols_json():
    pin = wire.pin_json("a", 1.5, 2.0, None, 3.0, "<b>", 4, 5)
    assert orjson.loads(pin) == {"id": "a", "lat": 1.5, "lng": 2.0, "heading": None,
                                 "accuracy": 3.0, "name": "<b>", "seq": 4, "ts": 5}
    assert orjson.loads(wire.encode_welcome("me", [pin])) == {
        "type": "welcome", "id": "me", "pins": [orjson.loads(pin)]}
    assert orjson.loads(wire.encode_update([], ["x"])) == {"type": "update", "pins": [], "gone": ["x"]}
    assert orjson.loads(wire.encode_snapshot([pin, pin]))["pins"][1]["id"] == "a"
    assert orjson.loads(wire.encode_error("bad_json", "nope")) == {
        "type": "error", "code": "bad_json", "message": "nope"}


@pytest.mark.parametrize("name, ok", [("public", True), ("a", True), ("A-z_09", True),
                                      ("x" * 64, True), ("x" * 65, False), ("", False),
                                      ("a.b", False), ("a/b", False), ("é", False)])
def test_map_names(name, ok):
    assert wire.is_map_name(name) is ok


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=256))
def test_fuzz_arbitrary_bytes_only_ever_raise_protocol_errors(payload):
    try:
        parse(payload)
    except ProtocolError as error:
        assert error.code in {"bad_json", "bad_message", "out_of_range"}


@settings(max_examples=400, deadline=None)
@given(st.fixed_dictionaries({"type": st.sampled_from(["move", "hello", "view", "x"])},
                             optional={"lat": json_values, "lng": json_values, "heading": json_values,
                                       "accuracy": json_values, "seq": json_values,
                                       "name": json_values, "bbox": json_values}))
def test_fuzz_messages_parse_to_valid_values_or_errors(obj):
    try:
        message = parse(json.dumps(obj))
    except ProtocolError as error:
        assert error.code in {"bad_message", "out_of_range"}
        return
    if isinstance(message, Move):
        assert -90 <= message.lat <= 90 and -180 <= message.lng <= 180
        assert message.heading is None or 0 <= message.heading < 360
        assert message.accuracy is None or (message.accuracy >= 0 and math.isfinite(message.accuracy))
        assert message.seq is None or 0 <= message.seq < 2**53
    elif isinstance(message, Hello):
        assert 1 <= len(message.name) <= 64 and message.name == message.name.strip()


# Extension "clusters": a view's zoom, and the view in a connection's URL


def test_a_view_with_a_zoom_is_clustered_and_without_one_is_v1():
    assert parse(b'{"type":"view","bbox":[2,48,3,49],"zoom":12}') == View((2.0, 48.0, 3.0, 49.0), 12)
    assert parse(b'{"type":"view","bbox":null,"zoom":0}') == View(None, 0)
    assert parse(b'{"type":"view","bbox":null,"zoom":22.0}') == View(None, 22)
    assert parse(b'{"type":"view","bbox":null,"zoom":null}') == View(None)
    assert parse(b'{"type":"view","bbox":null}') == View(None, None)


@pytest.mark.parametrize("zoom, code", [
    (23, wire.OUT_OF_RANGE), (-1, wire.OUT_OF_RANGE), ("1e999", wire.OUT_OF_RANGE),
    (1e300, wire.OUT_OF_RANGE), (12.5, wire.BAD_MESSAGE), ('"12"', wire.BAD_MESSAGE),
    ("true", wire.BAD_MESSAGE), ("[12]", wire.BAD_MESSAGE),
])
def test_a_zoom_that_is_not_an_integer_in_0_to_22_is_refused(zoom, code):
    assert error_code(f'{{"type":"view","bbox":null,"zoom":{zoom}}}') == code


@pytest.mark.parametrize("params, view", [
    ({"bbox": ["2,48,3,49"], "zoom": ["12"]}, View((2.0, 48.0, 3.0, 49.0), 12)),
    ({"bbox": ["170,-10,-170,10"]}, View((170.0, -10.0, -170.0, 10.0))),
    ({"zoom": ["3"]}, View(None, 3)),
    ({}, None),
    # Bad values: ignored, the connection gets v1's whole world.
    ({"bbox": ["2,48,3"], "zoom": ["12"]}, None),
    ({"bbox": ["2,49,3,48"], "zoom": ["12"]}, None),
    ({"bbox": ["2,48,3,49"], "zoom": ["23"]}, None),
    ({"bbox": ["2,48,3,49"], "zoom": ["twelve"]}, None),
    ({"bbox": ["nan,48,3,49"], "zoom": ["1"]}, None),
    ({"bbox": ["1" * 300 + ",48,3,49"]}, None),
    ({"zoom": ["9" * 50]}, None),
])
def test_the_view_in_a_connection_url(params, view):
    assert wire.view_from_query(params) == view


def test_clustered_messages_carry_clusters_and_total_and_v1_ones_do_not():
    cluster = wire.cluster_json("c:3/4/2", 48.5, 2.5, 7, (2.0, 48.0, 3.0, 49.0))
    assert orjson.loads(cluster) == {"id": "c:3/4/2", "lat": 48.5, "lng": 2.5, "count": 7,
                                     "bbox": [2.0, 48.0, 3.0, 49.0]}
    pin = wire.pin_json("p", 1.0, 2.0, None, None, None, None, 0)
    assert orjson.loads(wire.encode_update([pin], ["c:3/4/3"], [cluster], 12)) == {
        "type": "update", "pins": [orjson.loads(pin)], "gone": ["c:3/4/3"],
        "clusters": [orjson.loads(cluster)], "total": 12}
    assert set(orjson.loads(wire.encode_snapshot([], [], 0))) == {"type", "pins", "clusters",
                                                                 "total"}
    assert set(orjson.loads(wire.encode_welcome("me", [], [cluster], 1))) == {
        "type", "id", "pins", "clusters", "total"}
    assert set(orjson.loads(wire.encode_update([pin], []))) == {"type", "pins", "gone"}
    assert set(orjson.loads(wire.encode_snapshot([pin]))) == {"type", "pins"}
