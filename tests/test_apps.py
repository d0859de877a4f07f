"""
The phone apps' formats (livemap_tx/phones/apps.py), read from payloads recorded
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

from livemap_tx.phones.apps import (
    Batch,
    BadReport,
    Friends,
    MapTids,
    Neighbours,
    face,
    owntracks_config,
    owntracks_friends,
    parse_osmand,
    parse_overland,
    parse_owntracks,
    parse_traccar_json,
    timestamp_ms,
)
from livemap_tx.phones.devices import Fix
from livemap_tx.hub import Pin

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
    # cog 0 with vel 0: standing still, no heading (not north).
    ("owntracks_location_android_http_log.json",
     Fix(48.85833, 2.29513, 1737558539000, "owntracks", accuracy=4.0, battery=6, tid="64")),
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


def pin(pin_id: str, lat: float, lng: float, **state) -> Pin:
    made = Pin(pin_id)
    made.lat, made.lng, made.ts = lat, lng, state.pop("ts", NOW_MS)
    for key, value in state.items():
        setattr(made, key, value)
    return made


def test_tids_are_distinct_kept_and_the_devices_own_is_its_own():
    book = MapTids()
    ids = [f"pin{n}" for n in range(5000)]  # far more than 36 * 36 two-letter tids
    given = {pin_id: book.tid(pin_id) for pin_id in ids}
    assert len(set(given.values())) == 5000
    assert all(book.tid(pin_id) == tid for pin_id, tid in given.items())
    assert sum(len(tid) == 2 for tid in given.values()) > 900  # short ones first
    # The device takes back the tid it sends, whoever had it; the other gets a new one.
    book.claim("pin7", given["pin9"])
    assert book.tid("pin7") == given["pin9"] and book.tid("pin9") not in (given["pin9"],
                                                                          given["pin7"])
    # Pins that left are forgotten once they are most of the book.
    book.prune({pin_id: None for pin_id in ids[:10]})
    assert set(book.of) == set(ids[:10])


def test_the_friends_answer_is_what_the_apps_validate():
    pins = [
        {"id": "a", "lat": 52.5, "lng": 13.4, "heading": 359.6, "accuracy": 4.4, "name": "Ada",
         "seq": None, "ts": 1_800_000_000_123, "source": "owntracks", "battery": 80},
        {"id": "b", "lat": 1.5, "lng": 2.5, "heading": None, "accuracy": None, "name": None,
         "seq": 3, "ts": 1_800_000_001_999},
    ]
    answer = orjson.loads(owntracks_friends(pins, {"a": "ZZ", "b": "B1"}))
    assert [m["_type"] for m in answer] == ["card", "location", "location"]
    card, first, second = answer
    assert (card["tid"], card["name"]) == ("ZZ", "Ada")
    assert base64.b64decode(card["face"]).startswith(b"\x89PNG\r\n\x1a\n")
    assert first == {"_type": "location", "tid": "ZZ", "lat": 52.5, "lon": 13.4,
                     "tst": 1_800_000_000, "acc": 4, "cog": 0, "batt": 80}
    assert second == {"_type": "location", "tid": "B1", "lat": 1.5, "lon": 2.5,
                      "tst": 1_800_000_001}
    # iOS's schema: integers are integers.
    for message in answer:
        for key in ("tst", "acc", "cog", "batt"):
            assert key not in message or type(message[key]) is int


@pytest.mark.parametrize("bad", [1e20, 1e308, float("inf"), float("nan"), -500.0, 10**400, "x"])
def test_one_pins_bad_number_never_spoils_the_friends_answer(bad):
    """A value out of range is left out of the answer; the others are whole."""
    pins = [{"id": "a", "lat": 1.0, "lng": 2.0, "accuracy": bad, "heading": bad,
             "battery": bad, "name": "A", "ts": bad},
            {"id": "b", "lat": bad, "lng": 2.0, "accuracy": 5.0, "name": "B", "ts": NOW_MS},
            {"id": "c", "lat": 3.0, "lng": 4.0, "accuracy": 5.0, "name": None, "ts": NOW_MS}]
    answer = orjson.loads(owntracks_friends(pins, {"a": "AA", "b": "BB", "c": "CC"}))
    locations = {m["tid"]: m for m in answer if m["_type"] == "location"}
    assert set(locations) == {"AA", "CC"}
    assert set(locations["AA"]) == {"_type", "tid", "lat", "lon", "tst"}
    assert locations["CC"]["acc"] == 5


def test_friends_leave_out_the_asker_and_show_everyone_else():
    pins = {p.id: p for p in (pin("me", 1.0, 1.0, name="Me"), pin("ada", 1.1, 1.0, name="Ada"),
                              pin("bob", 5.0, 5.0))}
    answer = orjson.loads(Friends().answer("m", pins, "me", "ME", 1.0, 1.0, 0.0))
    cards = {m["name"] for m in answer if m["_type"] == "card"}
    locations = [m for m in answer if m["_type"] == "location"]
    assert cards == {"Ada"} and len(locations) == 2
    assert "ME" not in {m["tid"] for m in locations}


def test_friends_on_a_map_of_10000_are_the_nearest_within_the_cap_with_distinct_tids():
    rows = [pin(f"p{n}", 48.0 + (n // 100) * 0.01, 2.0 + (n % 100) * 0.01) for n in range(10_000)]
    pins = {p.id: p for p in rows}
    friends = Friends(max_friends=50)
    seen: dict[str, str] = {}
    for asker in ("p0", "p5050", "p9999", "p4242"):
        me = pins[asker]
        answer = orjson.loads(friends.answer("big", pins, asker, None, me.lat, me.lng, 0.0))
        assert len(answer) == 50
        ids = {(m["lat"], m["lon"]): m["tid"] for m in answer}
        # The nearest 50, by walking every pin (what the grid must match).
        expected = sorted(rows, key=lambda p: ((p.lat - me.lat) ** 2
                                               + ((p.lng - me.lng) * 0.67) ** 2))
        distances = sorted(((p.lat - me.lat) ** 2 + ((p.lng - me.lng) * 0.67) ** 2)
                           for p in expected[1:])
        worst = max(((lat - me.lat) ** 2 + ((lng - me.lng) * 0.67) ** 2) for lat, lng in ids)
        assert worst <= distances[49] * 1.05
        assert (me.lat, me.lng) not in ids
        for where, tid in ids.items():
            assert seen.setdefault(tid, str(where)) == str(where)  # a tid is one person's
    book = friends.maps["big"][0]
    assert len(set(book.of.values())) == len(book.of)


def test_neighbours_of_a_grid_made_on_one_spot_are_found_at_once():
    """A grid built when the map was one spot has tiny cells: no walk over millions of rings."""
    index = Neighbours([pin("a", 1.0, 0.0), pin("b", 1.0, 0.0)], 0.0)
    assert index.cell <= 1e-3
    assert [p.id for p in index.nearest(1.0, 2.0, 100, lambda p: True)] == ["a", "b"]
    assert [p.id for p in index.nearest(-80.0, 179.0, 1, lambda p: p.id == "b")] == ["b"]


def test_neighbours_find_pins_that_moved_or_are_far_away():
    far = pin("far", -40.0, 170.0)
    near = pin("near", 10.0, 10.0)
    index = Neighbours([far, near], 0.0)
    assert index.nearest(-41.0, 171.0, 1, lambda p: True) == [far]
    assert index.nearest(0.0, 0.0, 5, lambda p: p.id != "near") == [far]
    assert Neighbours([], 0.0).nearest(0.0, 0.0, 5, lambda p: True) == []


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
    # bearing 0.0 with speed 0.0: no heading.
    ("osmand_query_seconds_bearing_hdop.txt", Fix(60.0, 30.0, 1377177267000, "osmand")),
    ("osmand_query_deviceid_heading_no_timestamp.txt", Fix(60.0, 30.0, NOW_MS, "osmand")),
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
    batch = parse_overland(recorded("overland_batch_readme.json"), NOW_MS)
    assert batch == Batch(Fix(37.3318, -122.030581, 1443711600000, "overland", accuracy=30.0,
                              battery=80), 0)


def overland_point(when: str, lng: float, **properties) -> dict:
    return {"type": "Feature", "geometry": {"type": "Point", "coordinates": [lng, 1.0]},
            "properties": {"timestamp": when, **properties}}


def test_overlands_current_wins_over_an_old_backlog():
    """
    Overland-iOS GLManager.m (sendQueueNow, 2024 releases): with more than a
    batch queued it adds `current`, a point like the others.
    """
    backlog = [overland_point(f"2026-11-30T08:{m:02d}:00Z", float(m)) for m in range(50)]
    body = {"locations": backlog, "current": overland_point("2026-11-30T10:00:00Z", 99.0)}
    assert parse_overland(orjson.dumps(body), NOW_MS).fix.lng == 99.0
    # A `current` older than the batch's newest point changes nothing.
    body["current"] = overland_point("2026-11-30T07:00:00Z", 77.0)
    assert parse_overland(orjson.dumps(body), NOW_MS).fix.lng == 49.0


def test_overland_skips_and_counts_points_from_the_future_and_bad_points():
    now = 1_796_000_000_000  # 2026-11-29
    body = {"locations": [
        overland_point("2026-11-29T08:53:20Z", 1.0),
        overland_point("2027-05-01T00:00:00Z", 2.0),  # a phone with a wrong clock
        overland_point("yesterday", 3.0),
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [500, 1]},
         "properties": {"timestamp": "2026-11-29T08:00:00Z"}},
        overland_point("2026-11-29T08:00:00Z", 4.0),
    ]}
    batch = parse_overland(orjson.dumps(body), now)
    assert batch.skipped == 3 and batch.fix is not None and batch.fix.lng == 1.0


def test_overland_keeps_the_newest_point_of_a_batch_whatever_its_order():
    def point(minute: int, lng: float) -> dict:
        return overland_point(f"2026-11-30T10:{minute:02d}:00Z", lng)
    batch = {"locations": [point(5, 5.0), point(9, 9.0), point(1, 1.0)]}
    assert parse_overland(orjson.dumps(batch), NOW_MS).fix.lng == 9.0


def test_overland_skips_what_is_not_a_point_and_refuses_what_is_not_a_batch():
    trip = {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 1]},
            "properties": {"type": "trip", "mode": "car", "start": "2026-11-30T10:00:00Z"}}
    action = {"type": "Feature", "properties": {"action": "paused_location_updates",
                                                "timestamp": "2026-11-30T10:00:00Z"}}
    assert parse_overland(orjson.dumps({"locations": [trip, action, 5, "x"]}), NOW_MS) == \
        Batch(None, 2)
    assert parse_overland(b'{"locations": []}', NOW_MS) == Batch(None, 0)
    for body in (b"[]", b'{"locations": 5}', b"nope",
                 orjson.dumps({"locations": [action] * 1001})):
        with pytest.raises(BadReport):
            parse_overland(body, NOW_MS)


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
    for parse in (parse_owntracks, parse_traccar_json, lambda b: parse_overland(b, NOW_MS)):
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


def test_the_friends_book_is_bounded():
    friends = Friends(max_maps=3)
    for n in range(10):
        friends.answer(f"map{n}", {"a": pin("a", 1.0, 1.0)}, "a", "AA", 1.0, 1.0, 0.0)
    assert list(friends.maps) == ["map7", "map8", "map9"]
