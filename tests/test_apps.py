"""
The phone apps' formats (livemap_tx/apps.py), read from payloads recorded
from the apps' own documentation, source and test suites (tests/apps/,
each file's origin in tests/apps/README.md), and fuzzed.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from urllib.parse import parse_qsl, unquote

import orjson
import pytest
from hypothesis import given, settings, strategies as st

from livemap_tx.apps import (
    BadReport,
    TidBook,
    face,
    owntracks_config,
    owntracks_friends,
    parse_osmand,
    parse_overland,
    parse_owntracks,
    parse_traccar_json,
    tids,
    timestamp_ms,
)
from livemap_tx.devices import Fix

APPS = Path(__file__).parent / "apps"
NOW_MS = 1_800_000_000_000


def recorded(name: str) -> bytes:
    return (APPS / name).read_bytes()


def query(name: str) -> dict[str, str]:
    line = [ln for ln in recorded(name).decode().splitlines() if ln.startswith("/?")][0]
    return dict(parse_qsl(line[2:], keep_blank_values=True))


# OwnTracks


@pytest.mark.parametrize("name, expected", [
    ("owntracks_location_android.json",
     Fix(51.0, 0.0, 1709037003000, "owntracks", accuracy=5.0, battery=100, tid="aa")),
    ("owntracks_location_ios_style.json",
     Fix(-25.762245, 126.074502, 1721896446000, "owntracks", accuracy=5.0, heading=277.0,
         battery=34, tid="AA")),
    ("owntracks_location_android_http_log.json",
     Fix(48.85833, 2.29513, 1737558539000, "owntracks", accuracy=4.0, heading=0.0, battery=6,
         tid="64")),
    ("owntracks_location_minimal_booklet.json",
     Fix(48.85833, 2.29513, 1497476456000, "owntracks", tid="JJ")),
    ("owntracks_location_topic_no_tid_android.json",
     Fix(0.0, 0.0, 1778266175000, "owntracks", accuracy=15.0)),
])
def test_owntracks_locations_as_the_apps_send_them(name, expected):
    assert parse_owntracks(recorded(name)) == expected


@pytest.mark.parametrize("name", [
    "owntracks_transition_booklet.json", "owntracks_transition_android.json",
    "owntracks_waypoint_android.json", "owntracks_waypoints_booklet.json",
    "owntracks_card_android.json", "owntracks_card_with_face_android.json",
    "owntracks_encrypted_android.json", "owntracks_lwt_booklet.json",
    "owntracks_cmd_reportLocation.json",
])
def test_owntracks_messages_other_than_locations_are_no_fix(name):
    assert parse_owntracks(recorded(name)) is None


def test_an_empty_owntracks_post_is_no_fix():
    assert parse_owntracks(b"") is None and parse_owntracks(b"  \n") is None


@pytest.mark.parametrize("body", [
    b"not json", b"[]", b'{"_type":"location"}', b'{"_type":"location","lat":1,"lon":2}',
    b'{"_type":"location","lat":91,"lon":2,"tst":1}', b'{"_type":"location","lat":"x","lon":2,"tst":1}',
    b'{"_type":"location","lat":1,"lon":2,"tst":"yesterday"}',
])
def test_broken_owntracks_locations_are_refused(body):
    with pytest.raises(BadReport):
        parse_owntracks(body)


def test_tids_are_unique_stable_and_keep_the_devices_own():
    ids = [f"pin{n}" for n in range(300)]
    first = tids(ids, "pin7", "AL")
    assert first["pin7"] == "AL"
    assert len(set(first.values())) == 300
    assert all(len(tid) == 2 for tid in first.values())
    assert tids(reversed(ids), "pin7", "AL") == first  # any order, same answer


def test_a_tid_stays_while_its_pin_does():
    book = TidBook()
    ids = [f"pin{n}" for n in range(300)]
    first = book.assign("m", ids, "pin7", "AL")
    fewer = book.assign("m", ids[:50], "pin7", "AL")
    assert all(fewer[i] == first[i] for i in ids[:50])
    more = book.assign("m", ids[:50] + ["new1", "new2"], "pin7", "AL")
    assert all(more[i] == first[i] for i in ids[:50])
    assert len(set(more.values())) == 52
    # The device takes back the tid it sends, whoever had it.
    other = next(i for i in ids[:50] if i != "pin7")
    moved = book.assign("m", ids[:50], "pin7", first[other])
    assert moved["pin7"] == first[other] and moved[other] != first[other]
    assert len(set(moved.values())) == 50
    assert book.assign("m", [], "pin7", "AL") == {} and "m" not in book.maps


def test_the_friends_answer_is_what_the_apps_validate():
    pins = [
        {"id": "a", "lat": 52.5, "lng": 13.4, "heading": 359.6, "accuracy": 4.4, "name": "Ada",
         "seq": None, "ts": 1_800_000_000_123, "source": "owntracks", "battery": 80},
        {"id": "b", "lat": 1.5, "lng": 2.5, "heading": None, "accuracy": None, "name": None,
         "seq": 3, "ts": 1_800_000_001_999},
    ]
    answer = orjson.loads(owntracks_friends(pins, tids(["a", "b"], "a", "ZZ")))
    assert [m["_type"] for m in answer] == ["card", "location", "location"]
    card, mine, theirs = answer
    assert (card["tid"], card["name"]) == ("ZZ", "Ada")
    assert base64.b64decode(card["face"]).startswith(b"\x89PNG\r\n\x1a\n")
    assert mine == {"_type": "location", "tid": "ZZ", "lat": 52.5, "lon": 13.4,
                    "tst": 1_800_000_000, "acc": 4, "cog": 0, "batt": 80}
    assert theirs["tid"] != "ZZ" and theirs["tst"] == 1_800_000_001
    assert set(theirs) == {"_type", "tid", "lat", "lon", "tst"}
    # iOS's schema: integers are integers.
    for message in answer:
        for key in ("tst", "acc", "cog", "batt"):
            assert key not in message or type(message[key]) is int


def test_owntracks_configuration_link_imports_on_both_apps():
    link = owntracks_config("https://maps.example/apps/owntracks/TOKEN", "Ada", "AL")
    assert link.startswith("owntracks:///config?inline=")
    encoded = unquote(link.split("inline=", 1)[1])
    # Standard alphabet with padding: what iOS's NSData decoder accepts.
    config = json.loads(base64.b64decode(encoded, validate=True))
    assert config == {"_type": "configuration", "mode": 3,
                      "url": "https://maps.example/apps/owntracks/TOKEN", "auth": False,
                      "deviceId": "livemap", "tid": "AL"}
    assert type(config["mode"]) is int


def test_face_is_a_png_of_a_colour_of_the_pin():
    assert face("a") != face("b") and face("a") == face("a")


# The OsmAnd protocol


@pytest.mark.parametrize("name, expected", [
    ("osmand_query_minimal.txt", Fix(60.0, 30.0, 1377177267000, "osmand")),
    ("osmand_query_iso_timestamp.txt",
     Fix(42.06288, -88.23412, 1453920947000, "osmand", accuracy=6.0)),
    ("osmand_query_millis_timestamp.txt",
     Fix(42.06288, -88.23412, 1442068686579, "osmand", accuracy=6.0)),
    ("osmand_query_space_datetime.txt", Fix(49.60688, 6.15788, 1401873011000, "osmand")),
    ("osmand_query_seconds_bearing_hdop.txt",
     Fix(60.0, 30.0, 1377177267000, "osmand", heading=0.0)),
    ("osmand_query_deviceid_heading_no_timestamp.txt",
     Fix(60.0, 30.0, NOW_MS, "osmand", heading=0.0)),
    ("osmand_query_batt_no_timestamp.txt",
     Fix(41.666667, -0.883333, NOW_MS, "osmand", battery=87)),
    ("osmand_query_location_param.txt", Fix(60.0, 30.0, 1377177267000, "osmand")),
    ("osmand_query_extra_attributes.txt",
     Fix(40.7232948571, -74.0061408571, 1504763810000, "osmand", heading=7.19889788244)),
])
def test_osmand_queries_as_traccars_own_tests_send_them(name, expected):
    token, fix = parse_osmand(query(name), NOW_MS)
    assert token and fix == expected


@pytest.mark.parametrize("name", ["osmand_query_missing_id_rejected.txt",
                                  "osmand_query_cell_wifi_no_latlon.txt"])
def test_osmand_queries_without_an_id_or_a_position_are_refused(name):
    with pytest.raises(BadReport):
        parse_osmand(query(name), NOW_MS)


def test_gpsloggers_expanded_template_reads_as_a_fix():
    # GPSLogger's own test expansion (tests/apps/gpslogger_placeholder_expansions.txt),
    # with the template livemap gives (id, %TIMESTAMP, %BATT as 91.0, %DIR as 359.0).
    params = dict(parse_qsl("id=TOKEN&lat=12.193&lon=19.111&timestamp=1457205869"
                            "&accuracy=8.0&altitude=45.0&bearing=359.0&batt=91.0"))
    token, fix = parse_osmand(params, NOW_MS)
    assert (token, fix) == ("TOKEN", Fix(12.193, 19.111, 1457205869000, "osmand", accuracy=8.0,
                                         heading=359.0, battery=91))


def test_osmands_own_template_reads_as_a_fix():
    # OsmAnd's {0}..{11}: ms timestamp, "hdop" is its accuracy, battery in percent.
    params = dict(parse_qsl("id=TOKEN&lat=52.5&lon=13.4&timestamp=1800000000123&hdop=12.5"
                            "&altitude=30.0&bearing=5.0E-4&batt=55"))
    token, fix = parse_osmand(params, NOW_MS)
    assert fix == Fix(52.5, 13.4, 1800000000123, "osmand", accuracy=12.5, heading=0.0005,
                      battery=55)


@pytest.mark.parametrize("name, expected", [
    ("traccar9_location.json",
     ("48241179", Fix(37.4219983, -122.084, 1749995112862, "osmand", accuracy=5.0, battery=100))),
    ("traccar9_location_extras.json",
     ("48241179", Fix(37.4219983, -122.084, 1749995112862, "osmand", accuracy=5.0, battery=100))),
    ("traccar9_location_ios_simulator.json",
     ("658765", Fix(37.785834, -122.406417, 1746763890579, "osmand", accuracy=5.0))),
    ("traccar9_location_moving_2021.json",
     ("8737767034", Fix(-6.1148096, 106.6837015, 1626854794444, "osmand", accuracy=3.8,
                        heading=63.0, battery=79))),
])
def test_traccar_client_9_json_as_traccars_own_tests_send_it(name, expected):
    assert parse_traccar_json(recorded(name)) == expected


# Overland


def test_overlands_batch_from_its_readme():
    fix = parse_overland(recorded("overland_batch_readme.json"))
    assert fix == Fix(37.3318, -122.030581, 1443711600000, "overland", accuracy=30.0, battery=80)


def test_overland_keeps_the_newest_point_of_a_batch_whatever_its_order():
    def point(minute: int, lng: float) -> dict:
        return {"type": "Feature", "geometry": {"type": "Point", "coordinates": [lng, 1.0]},
                "properties": {"timestamp": f"2026-11-30T10:{minute:02d}:00Z"}}
    batch = {"locations": [point(5, 5.0), point(9, 9.0), point(1, 1.0)]}
    assert parse_overland(orjson.dumps(batch)).lng == 9.0


def test_overland_skips_what_is_not_a_point_and_refuses_what_is_not_a_batch():
    trip = {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 1]},
            "properties": {"type": "trip", "mode": "car", "start": "2026-11-30T10:00:00Z"}}
    action = {"type": "Feature", "properties": {"action": "paused_location_updates",
                                                "timestamp": "2026-11-30T10:00:00Z"}}
    assert parse_overland(orjson.dumps({"locations": [trip, action, 5, "x"]})) is None
    assert parse_overland(b'{"locations": []}') is None
    for body in (b"[]", b'{"locations": 5}', b"nope",
                 orjson.dumps({"locations": [action] * 1001})):
        with pytest.raises(BadReport):
            parse_overland(body)


# Times


@pytest.mark.parametrize("value, expected", [
    (1377177267, 1377177267000), ("1377177267", 1377177267000),
    (1442068686579, 1442068686579), (2147483646, 2147483646000),
    ("2016-03-05T19:24:29.949Z", 1457205869949), ("2015-10-01T08:00:00-0700", 1443711600000),
    ("2014-06-04 09:10:11", 1401873011000), ("2025-06-15T13:45:12.862Z", 1749995112862),
])
def test_times_in_every_form_the_apps_use(value, expected):
    assert timestamp_ms(value) == expected


# Fuzzing: whatever arrives, a fix or a clear refusal, never anything else


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["_type", "lat", "lon", "tst", "acc", "cog", "batt", "tid", "location",
                         "coords", "latitude", "longitude", "timestamp", "device_id", "battery",
                         "level", "heading", "locations", "geometry", "properties", "type",
                         "coordinates", "horizontal_accuracy", "battery_level", "course"]),
        children, max_size=6),
    max_leaves=20)


def structured(value: object) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=200), JSON.map(structured)))
def test_fuzzed_bodies_give_a_fix_or_a_refusal(body):
    for parse in (parse_owntracks, parse_traccar_json, parse_overland):
        try:
            parse(body)
        except BadReport:
            pass


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(["id", "deviceid", "lat", "lon", "timestamp", "location",
                                        "accuracy", "hdop", "bearing", "heading", "batt"]),
                       st.text(max_size=30), max_size=8))
def test_fuzzed_queries_give_a_fix_or_a_refusal(params):
    try:
        token, fix = parse_osmand(params, NOW_MS)
    except BadReport:
        return
    assert token and -90 <= fix.lat <= 90 and -180 <= fix.lng <= 180
    assert fix.heading is None or 0 <= fix.heading < 360
    assert fix.battery is None or 0 <= fix.battery <= 100


def test_the_tid_book_is_bounded():
    book = TidBook(max_maps=3)
    for n in range(10):
        book.assign(f"map{n}", ["a"], "a", "AA")
    assert list(book.maps) == ["map7", "map8", "map9"]
