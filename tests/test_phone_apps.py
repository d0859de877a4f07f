"""
Phone apps end to end: a device made through the API, each app's recorded
payload (tests/apps/, with its time set to now) posted to the real endpoint
of a server on 127.0.0.1 the way the app sends it, and a WebSocket viewer
on the same map that must see the pin move: position, heading, name, and
the badge fields (`source`, `battery`).
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlencode

import orjson

import pytest_twisted
import treq
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import deferLater, start_server, stop_server
from liveclients import MapView, open_view
from wsclient import connect

APPS = Path(__file__).parent / "apps"


def recorded(name: str) -> Any:
    return json.loads((APPS / name).read_text())


async def make_device(server: Any, map_name: str, name: Optional[str] = "Ada Lovelace",
                      **headers: str) -> dict:
    response = await treq.post(f"{server.url}/api/maps/{map_name}/devices",
                               data=orjson.dumps({"name": name}) if name else b"",
                               headers={k.replace("_", "-"): [v] for k, v in headers.items()})
    body = orjson.loads(await response.content())
    assert response.code == 201, body
    return body


async def post(url: str, body: Any = b"", method: str = "POST", **kwargs: Any) -> tuple[int, bytes]:
    if not isinstance(body, bytes):
        body = orjson.dumps(body)
    response = await treq.request(method, url, data=body or None, **kwargs)
    return response.code, await response.content()


def now_s() -> int:
    return int(time.time())


def iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + "Z"


async def watch(server: Any, map_name: str) -> MapView:
    return await open_view(server.ws_url(map_name))


async def seen(view: MapView, pin_id: str, **expected: Any) -> dict:
    await view.until(lambda pins: pin_id in pins and all(
        view.states[pin_id].get(key) == value for key, value in expected.items()))
    return view.states[pin_id]


# Each app, as it sends


@pytest_twisted.ensureDeferred
async def test_owntracks_in_http_mode_and_its_friends(server):
    view = await watch(server, "family")
    device = await make_device(server, "family")
    setup = device["apps"]["owntracks"]
    assert setup["url"] == f"{server.url}/apps/owntracks/{device['token']}"
    # The Android app's own recorded body, sent now.
    body = recorded("owntracks_location_android_http_log.json")
    body.update(tst=now_s(), cog=270, vel=12, tid="AL")
    code, answer = await post(setup["url"], body, headers={
        "Content-Type": ["application/json; charset=utf-8"], "X-Limit-U": ["x"],
        "X-Limit-D": ["phone"]})
    assert code == 200
    pin = await seen(view, device["id"], lat=48.85833)
    assert (pin["lng"], pin["heading"], pin["accuracy"], pin["name"]) == (
        2.29513, 270.0, 4.0, "Ada Lovelace")
    assert (pin["source"], pin["battery"], pin["seq"]) == ("owntracks", 6, None)
    assert pin["ts"] == body["tst"] * 1000
    # Alone on the map: no friends (the device is never its own friend).
    assert orjson.loads(answer) == []
    # Other messages, and the "clear" empty post: [] and no change.
    for other in ("owntracks_transition_android.json", "owntracks_waypoint_android.json"):
        assert await post(setup["url"], recorded(other)) == (200, b"[]")
    assert await post(setup["url"], b"") == (200, b"[]")


@pytest_twisted.ensureDeferred
async def test_owntracks_with_the_token_as_basic_auth_password(server):
    view = await watch(server, "family")
    device = await make_device(server, "family", name=None)
    auth = base64.b64encode(b"ada:" + device["token"].encode()).decode()
    body = dict(recorded("owntracks_location_minimal_booklet.json"), tst=now_s())
    code, answer = await post(f"{server.url}/apps/owntracks", body,
                              headers={"Authorization": [f"Basic {auth}"]})
    assert code == 200
    await seen(view, device["id"], lat=48.85833, source="owntracks")
    code, answer = await post(f"{server.url}/apps/owntracks", body)
    assert code == 401


@pytest_twisted.ensureDeferred
async def test_traccar_client_and_osmand_query_get_and_form_post(server):
    view = await watch(server, "family")
    device = await make_device(server, "family")
    base = device["apps"]["traccar"]["server_url"]
    assert device["apps"]["traccar"]["device_id"] == device["token"]
    # Traccar's own recorded query, with this device's id and time now.
    params = dict(id=device["token"], timestamp=str(now_s()), lat="60.0", lon="30.0",
                  speed="3.5", bearing="45.5", altitude="0", hdop="0.0", batt="87")
    code, answer = await post(f"{base}?{urlencode(params)}", method="GET")
    assert (code, answer) == (200, b"")
    pin = await seen(view, device["id"], lat=60.0)
    assert (pin["heading"], pin["battery"], pin["source"]) == (45.5, 87, "osmand")
    params.update(timestamp=str(now_s() * 1000 + 500), lat="61.0")  # ms, as OsmAnd sends
    code, _ = await post(base, urlencode(params).encode(),
                         headers={"Content-Type": ["application/x-www-form-urlencoded"]})
    assert code == 200
    await seen(view, device["id"], lat=61.0)


@pytest_twisted.ensureDeferred
async def test_traccar_client_9_json(server):
    view = await watch(server, "family")
    device = await make_device(server, "family")
    body = recorded("traccar9_location_moving_2021.json")
    body["device_id"] = device["token"]
    body["location"]["timestamp"] = iso(now_s())
    code, answer = await post(device["apps"]["traccar"]["server_url"], body,
                              headers={"Content-Type": ["application/json"]})
    assert (code, answer) == (200, b"")
    pin = await seen(view, device["id"], lat=-6.1148096)
    assert (pin["heading"], pin["battery"], pin["accuracy"]) == (63.0, 79, 3.8)


@pytest_twisted.ensureDeferred
async def test_gpslogger_custom_url(server):
    view = await watch(server, "family")
    device = await make_device(server, "family")
    template = device["apps"]["gpslogger"]["url"]
    # What GPSLogger's own test expands its placeholders to (tests/apps/...).
    url = (template.replace("%LAT", "12.193").replace("%LON", "19.111")
           .replace("%TIMESTAMP", str(now_s())).replace("%ACC", "8.0").replace("%ALT", "45.0")
           .replace("%DIR", "359.0").replace("%BATT", "91.0"))
    code, _ = await post(url, method="GET")
    assert code == 200
    pin = await seen(view, device["id"], lat=12.193)
    assert (pin["heading"], pin["battery"], pin["accuracy"]) == (359.0, 91, 8.0)


@pytest_twisted.ensureDeferred
async def test_overland_batches_keep_the_newest_point_and_answer_ok(server):
    view = await watch(server, "family")
    device = await make_device(server, "family")
    setup = device["apps"]["overland"]
    assert setup["config"].startswith("overland://setup?")
    template = recorded("overland_batch_readme.json")["locations"][0]

    def point(seconds: float, lng: float) -> dict:
        feature = json.loads(json.dumps(template))
        feature["geometry"]["coordinates"] = [lng, 37.3318]
        feature["properties"]["timestamp"] = iso(seconds)
        return feature
    now = now_s()
    batch = {"locations": [point(now - 20, 1.0), point(now - 5, 5.0), point(now - 60, 9.0)]}
    for url, headers in ((setup["url"], {}),
                         (setup["endpoint"], {"Authorization": [f"Bearer {setup['token']}"]}),
                         (f"{setup['endpoint']}?token={setup['token']}", {})):
        code, answer = await post(url, batch, headers=headers)
        assert (code, answer) == (200, b'{"result":"ok"}')
        pin = await seen(view, device["id"], lng=5.0)
        assert (pin["battery"], pin["source"], pin["accuracy"]) == (80, "overland", 30.0)
    assert await post(setup["endpoint"], batch) == (401, b'{"error":"the device\'s token is required"}')


# What a device's pin is


@pytest_twisted.ensureDeferred
async def test_an_older_fix_never_moves_it_back_and_a_future_one_is_skipped(server):
    view = await watch(server, "family")
    device = await make_device(server, "family")
    url = device["apps"]["owntracks"]["url"]
    now = now_s()
    assert (await post(url, {"_type": "location", "lat": 1, "lon": 1, "tst": now - 10}))[0] == 200
    await seen(view, device["id"], lat=1)
    await deferLater(0.2)
    # A queued fix from before, sent late: answered 200 (the app drops it), not shown.
    assert (await post(url, {"_type": "location", "lat": 2, "lon": 2, "tst": now - 100}))[0] == 200
    # From a phone whose clock is wrong: taken (so the app drops it), counted, not shown.
    code, body = await post(url, {"_type": "location", "lat": 3, "lon": 3, "tst": now + 600})
    assert code == 200 and server.site.apps.devices.stats["skipped"] == 1
    await deferLater(0.3)
    view.take_messages()
    assert view.pins[device["id"]][:2] == (1, 1)
    assert (await post(url, {"_type": "location", "lat": 4, "lon": 4, "tst": now + 60}))[0] == 200
    await seen(view, device["id"], lat=4)


@pytest_twisted.ensureDeferred
async def test_every_refusal_has_its_code_and_changes_no_pin():
    live = await start_server("--rate", "2")
    try:
        view = await watch(live, "family")
        device = await make_device(live, "family")
        token, url = device["token"], device["apps"]["owntracks"]["url"]
        fine = {"_type": "location", "lat": 10, "lon": 10, "tst": now_s()}
        assert (await post(url, fine))[0] == 200
        await seen(view, device["id"], lat=10)
        bad = {"_type": "location", "lat": 99, "lon": 10, "tst": now_s()}
        cases = [
            (url, bad, 400), (url, b"{not json", 400),
            (f"{live.url}/apps/owntracks/{'x' * 32}", fine, 404),
            (f"{live.url}/apps/owntracks", fine, 401),
            (url, b'{"_type":"location","pad":"' + b"x" * 20000 + b'"}', 413),
            (f"{live.url}/apps/osmand?id={token}&lat=1", b"", 400),
            (f"{live.url}/apps/osmand?lat=1&lon=1", b"", 400),
            (f"{live.url}/apps/osmand?id=nobody&lat=1&lon=1", b"", 404),
            (f"{live.url}/apps/overland/{token}", b"[]", 400),
            (f"{live.url}/apps/overland/{token}", b'{"locations":' + b"[{}," * 1001 + b"{}]}", 400),
        ]
        for target, body, status in cases:
            code, answer = await post(target, body)
            assert code == status, (target, body[:80] if isinstance(body, bytes) else body, answer)
            assert orjson.loads(answer)["error"]
        await deferLater(0.3)
        view.take_messages()
        assert view.pins[device["id"]][:2] == (10, 10)
        view.client.close()
        await view.client.wait_closed()
    finally:
        await stop_server(live)


@pytest_twisted.ensureDeferred
async def test_deleting_a_device_is_gone_for_every_viewer_and_its_token_refused(server):
    view = await watch(server, "family")
    device = await make_device(server, "family")
    url = device["apps"]["owntracks"]["url"]
    await post(url, {"_type": "location", "lat": 1, "lon": 1, "tst": now_s()})
    await seen(view, device["id"], lat=1)
    code, _ = await post(device["delete"], method="DELETE")
    assert code == 204
    await view.until(lambda pins: device["id"] not in pins)
    assert (await post(url, {"_type": "location", "lat": 1, "lon": 1, "tst": now_s()}))[0] == 404
    assert (await post(device["delete"], method="DELETE"))[0] == 404


@pytest_twisted.ensureDeferred
async def test_friends_leave_out_the_asker_and_have_unique_stable_tids_and_cards(server):
    people = [await watch(server, "friends") for _ in range(3)]
    for number, person in enumerate(people):
        person.hello(f"Friend {number}")
        person.move(50 + number, 8)
    await people[0].until(lambda pins: len(pins) == 3)
    first = await make_device(server, "friends", name="Ada")
    second = await make_device(server, "friends", name="Grace")
    await post(second["apps"]["owntracks"]["url"],
               {"_type": "location", "lat": 1, "lon": 1, "tst": now_s(), "tid": "GH"})
    answers = []
    for _ in range(2):
        code, body = await post(first["apps"]["owntracks"]["url"],
                                {"_type": "location", "lat": 2, "lon": 2, "tst": now_s(),
                                 "tid": "AD"})
        answers.append(orjson.loads(body))
    assert answers[0] == answers[1]  # the same tids each time
    locations = [m for m in answers[0] if m["_type"] == "location"]
    cards = {m["tid"]: m["name"] for m in answers[0] if m["_type"] == "card"}
    # Everyone else, each under a tid of its own; never Ada herself (nor her tid).
    assert len(locations) == 4 and len({m["tid"] for m in locations}) == 4
    assert (2, 2) not in {(m["lat"], m["lon"]) for m in locations}
    assert "AD" not in cards and sorted(cards.values()) == [
        "Friend 0", "Friend 1", "Friend 2", "Grace"]
    # Nearest first: Grace (at 1, 1) comes before the friends at 50..52.
    assert locations[0]["lat"] == 1
    for person in people:
        person.client.close()
        await person.client.wait_closed()


@pytest_twisted.ensureDeferred
async def test_a_browsers_absurd_accuracy_never_breaks_anyones_owntracks_reports(server):
    """Issue 22 item 11: accuracy 1e20 from a page made every OwnTracks report 500."""
    person = await watch(server, "absurd")
    person.hello("Big")
    person.move(10, 10, accuracy=1e20)  # out_of_range now: refused, no pin
    person.move(10, 10, accuracy=5)
    await person.until(lambda pins: len(pins) == 1)
    device = await make_device(server, "absurd")
    code, body = await post(device["apps"]["owntracks"]["url"],
                            {"_type": "location", "lat": 1, "lon": 1, "tst": now_s()})
    assert code == 200 and orjson.loads(body)[1]["acc"] == 5, body
    person.client.close()
    await person.client.wait_closed()


@pytest_twisted.ensureDeferred
async def test_a_burst_of_owntracks_reports_gets_only_200s_and_the_pin_ends_at_the_newest():
    live = await start_server("--rate", "0.5")  # one report every 2 s
    try:
        view = await watch(live, "burst")
        device = await make_device(live, "burst")
        url = device["apps"]["owntracks"]["url"]
        now = now_s()
        codes = [(await post(url, {"_type": "location", "lat": 10 + n, "lon": 1,
                                   "tst": now - 30 + n}))[0] for n in range(12)]
        assert codes == [200] * 12
        await seen(view, device["id"], lat=21)  # the newest, once the rate allows
        assert live.site.apps.devices.stats["held"] >= 6, live.site.apps.devices.stats
        metrics = (await (await treq.get(f"{live.url}/metrics")).content()).decode()
        held = [line for line in metrics.splitlines() if line.startswith("livemap_devices_held")]
        assert held and float(held[0].split()[-1]) >= 6, held
        view.client.close()
        await view.client.wait_closed()
    finally:
        await stop_server(live)


@pytest_twisted.ensureDeferred
async def test_overland_backlog_with_current_moves_the_pin_to_current_at_once(server):
    view = await watch(server, "backlog")
    device = await make_device(server, "backlog")
    setup = device["apps"]["overland"]
    template = recorded("overland_batch_readme.json")["locations"][0]

    def point(seconds: float, lng: float) -> dict:
        feature = json.loads(json.dumps(template))
        feature["geometry"]["coordinates"] = [lng, 37.3318]
        feature["properties"]["timestamp"] = iso(seconds)
        return feature
    now = now_s()
    # Two hours of backlog (older than --expire), and where the phone is now.
    batch = {"locations": [point(now - 7200 + n, 1.0 + n / 1000) for n in range(200)],
             "current": point(now - 1, 42.0)}
    assert await post(setup["url"], batch) == (200, b'{"result":"ok"}')
    await seen(view, device["id"], lng=42.0)


@pytest_twisted.ensureDeferred
async def test_overland_batch_with_a_future_and_a_bad_point_is_done_and_the_good_used(server):
    view = await watch(server, "stuck")
    device = await make_device(server, "stuck")
    url = device["apps"]["overland"]["url"]
    template = recorded("overland_batch_readme.json")["locations"][0]

    def point(when: str, lng: object) -> dict:
        feature = json.loads(json.dumps(template))
        feature["geometry"]["coordinates"] = [lng, 37.3318]
        feature["properties"]["timestamp"] = when
        return feature
    now = now_s()
    batch = {"locations": [point(iso(now - 10), 3.0), point(iso(now + 86400 * 30), 9.0),
                           point(iso(now - 5), "east"), point(iso(now - 20), 2.0)]}
    # What Overland treats as done: 200 and exactly this (GLManager.m sendQueueNow).
    assert await post(url, batch) == (200, b'{"result":"ok"}')
    await seen(view, device["id"], lng=3.0)
    assert server.site.apps.devices.stats["skipped"] == 2


# Making devices


@pytest_twisted.ensureDeferred
async def test_making_devices_answers_what_each_app_needs_and_its_limits():
    live = await start_server("--no-open-maps", "--max-pins-per-map", "3")
    try:
        assert (await post(f"{live.url}/api/maps/nowhere/devices"))[0] == 404
        device = await make_device(live, "public")
        assert len(device["token"]) == 32 and device["name"] == "Ada Lovelace"
        assert set(device["apps"]) == {"owntracks", "traccar", "osmand", "gpslogger", "overland"}
        assert all(device["token"] in json.dumps(setup) for setup in device["apps"].values())
        code, body = await post(f"{live.url}/api/maps/public/devices", {"name": "  "})
        assert code == 400
        code, body = await post(f"{live.url}/api/maps/public/devices", {"name": "A"},
                                headers={"Origin": ["http://evil.example"]})
        assert code == 403
        # A private map takes devices like the public one.
        created = orjson.loads(await (await treq.post(f"{live.url}/api/maps")).content())
        private = await make_device(live, created["map"])
        view = await watch(live, created["map"])
        await post(private["apps"]["owntracks"]["url"],
                   {"_type": "location", "lat": 5, "lon": 5, "tst": now_s()})
        await seen(view, private["id"], lat=5)
        # Devices count toward the map's places once they have a pin.
        for _ in range(2):
            extra = await make_device(live, "public")
            await post(extra["apps"]["owntracks"]["url"],
                       {"_type": "location", "lat": 5, "lon": 5, "tst": now_s()})
        await make_device(live, "public")
        full = await connect(live.ws_url("public"))  # two device pins and this client
        code, body = await post(f"{live.url}/api/maps/public/devices", {"name": "B"})
        assert code == 503 and b"full" in body
        full.close()
        await full.wait_closed()
        view.client.close()
        await view.client.wait_closed()
    finally:
        await stop_server(live)


@pytest_twisted.ensureDeferred
async def test_120_creations_from_one_address_within_a_minute_and_a_flood_cut_off(server):
    """A venue's audience behind one NAT address (issue 22 item 9), by default."""
    codes = [(await post(f"{server.url}/api/maps/venue/devices"))[0] for _ in range(120)]
    assert codes == [201] * 120
    flood = [(await post(f"{server.url}/api/maps/venue/devices"))[0] for _ in range(30)]
    assert flood.count(429) >= 29


@pytest_twisted.ensureDeferred
async def test_a_private_maps_expiry_removes_its_devices():
    live = await start_server("--no-open-maps", "--min-ttl", "1")
    try:
        created = orjson.loads(await (await treq.post(f"{live.url}/api/maps?ttl=1.5")).content())
        device = await make_device(live, created["map"])
        url = device["apps"]["owntracks"]["url"]
        view = await watch(live, created["map"])
        await post(url, {"_type": "location", "lat": 5, "lon": 5, "tst": now_s()})
        await seen(view, device["id"], lat=5)
        code, reason = await view.client.wait_closed(timeout=10)
        assert (code, reason) == (1008, "map expired")
        assert (await post(url, {"_type": "location", "lat": 6, "lon": 6, "tst": now_s()}))[0] == 404
        assert live.hub.pins(created["map"]) == []
    finally:
        await stop_server(live)


# Fuzzing the live endpoints


FIELDS = ["_type", "lat", "lon", "tst", "acc", "cog", "batt", "tid", "device_id", "location",
          "coords", "latitude", "longitude", "timestamp", "locations", "geometry", "properties",
          "coordinates", "battery", "level"]
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(FIELDS), inner, max_size=5), max_leaves=12)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
@pytest_twisted.ensureDeferred
async def test_fuzzed_reports_get_2xx_or_4xx_and_a_good_device_keeps_being_served(server, data):
    if not hasattr(server, "fuzz_device"):
        server.fuzz_device = await make_device(server, "fuzz")
        server.fuzz_view = await watch(server, "fuzz")
    device = server.fuzz_device
    token = device["token"]
    endpoint = data.draw(st.sampled_from(["owntracks", "osmand", "overland", "osmand-query"]))
    body = data.draw(st.one_of(st.binary(max_size=300),
                               VALUES.map(lambda v: json.dumps(v).encode())))
    if endpoint == "osmand-query":
        params = data.draw(st.dictionaries(st.sampled_from(
            ["id", "lat", "lon", "timestamp", "bearing", "batt", "hdop", "location"]),
            st.text(max_size=20), max_size=6))
        if data.draw(st.booleans()):
            params["id"] = token
        url, body = f"{server.url}/apps/osmand?{urlencode(params)}", b""
    elif endpoint == "osmand":
        url = f"{server.url}/apps/osmand"
    else:
        url = f"{server.url}/apps/{endpoint}/{token}"
    code, answer = await post(url, body)
    assert code < 500, (url, body[:200], answer)
    # The well-behaved device is still served.
    lat = data.draw(st.integers(-80, 80))
    code, _ = await post(device["apps"]["owntracks"]["url"],
                         {"_type": "location", "lat": lat, "lon": 1, "tst": now_s() + 1})
    assert code == 200
