"""
The people search (hub/people.py, `GET /api/maps/{map}/people`): always
what a scan of every pin would find (after joins, renames, departures,
other nodes' pins), without measuring every pin of a big map, and limited
per client address (429 with a Retry-After past the limit).
"""

from __future__ import annotations

import itertools
import math
import random

import orjson
import pytest
import pytest_twisted
import treq
from twisted.internet.task import Clock

import hubfakes
from conftest import start_server, stop_server
from livemap_tx.hub import Hub, people
from livemap_tx.hub.people import SEARCH_BURST, SEARCH_RATE
from livemap_tx.wire import Move

DISTANCE = people._distance  # the order of the contract (tests count the search's calls)
NAMES = ["Ada", "ADAM", "adAline", "Bo", "Bob", "Zoë", "ZOË", "Walker 12", "walker 123", None]


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(1000)
    return clock


@pytest.fixture
def hub(clock) -> Hub:
    ids = itertools.count()
    return Hub(clock, new_id=lambda: f"p{next(ids):05d}")


def reference(hub: Hub, text: str, point, limit: int) -> list[str]:
    """What a scan of every pin finds: the contract (docs/protocol.md)."""
    map_state = hub.maps.get("m")
    pins = [] if map_state is None else list(map_state.pins.values())
    needle = text.casefold()
    found = [p for p in pins if not needle or (p.name and needle in p.name.casefold())]
    if point is None:
        return sorted(p.id for p in found)
    found.sort(key=lambda p: DISTANCE(p.lat, p.lng, point))
    return [p.id for p in found[:limit]]


def check(hub: Hub, rng: random.Random) -> None:
    for text in ["", "ad", "ADA", "zoë", "walker 12", "b", "nobody"]:
        limit = rng.choice([1, 3, 50])
        point = (48.85 + rng.uniform(-0.2, 0.2), 2.35 + rng.uniform(-0.3, 0.3))
        total, found = hub.people("m", text, point, limit)
        assert total == len(hub.maps["m"].pins) if "m" in hub.maps else total == 0
        assert [p["id"] for p in found] == reference(hub, text, point, limit), (text, point)
        _, unordered = hub.people("m", text, None, 10_000)
        assert sorted(p["id"] for p in unordered) == reference(hub, text, None, 0)


@pytest.mark.parametrize("measure_up_to", [people.MEASURE_UP_TO, 0])
def test_the_search_finds_what_a_scan_would_after_renames_departures_and_other_nodes(
        hub, clock, monkeypatch, measure_up_to):
    """
    Random joins, moves, renames, departures, expiries and another node's
    pins (which come, are renamed and go): each search is what a scan of
    every pin finds, nearest first. With `measure_up_to` 0 every search with
    a point takes the grid's rings.
    """
    monkeypatch.setattr(people, "MEASURE_UP_TO", measure_up_to)
    rng = random.Random(20)
    members = []
    version = itertools.count(1)
    remote: dict[str, dict] = {}
    seq = itertools.count(1)
    for step in range(60):
        for _ in range(rng.randint(0, 8)):
            member, _ = hubfakes.join(hub)
            name = rng.choice(NAMES)
            if name is not None:
                member.hello(name)
            member.move(Move(48.85 + rng.gauss(0, 0.05), 2.35 + rng.gauss(0, 0.08),
                             None, None, next(seq)))
            members.append(member)
        for member in rng.sample(members, min(len(members), 3)):
            member.hello(rng.choice([n for n in NAMES if n]))  # renamed
        for member in rng.sample(members, min(len(members), rng.randint(0, 3))):
            members.remove(member)
            member.leave()
        if members and rng.random() < 0.3:  # moves far away (another grid cell)
            rng.choice(members).move(Move(48.5 + rng.random() * 1e-3, 2.9, None, None, next(seq)))
        for _ in range(rng.randint(0, 4)):  # another node's pins come and change
            pin_id = rng.choice(["r1", "r2", "r3", "r4", "r5", "r6"])
            remote[pin_id] = {"id": pin_id, "lat": 48.85 + rng.gauss(0, 0.05),
                              "lng": 2.35 + rng.gauss(0, 0.08), "heading": None,
                              "accuracy": None, "name": rng.choice(NAMES), "seq": 1,
                              "ts": int(clock.seconds() * 1000), "version": next(version)}
        gone = [pin_id for pin_id in remote if rng.random() < 0.1]
        hub.apply_remote("m", "node-2", [remote[i] for i in remote if i not in gone], gone)
        for pin_id in gone:
            del remote[pin_id]
        if step == 40:
            hub.drop_origin("node-2")
            remote.clear()
        if step == 50:
            assert hub.expire_pins(2.0) > 0  # pins without a fix for 2 s go
        clock.advance(0.1)
        check(hub, rng)
    assert len(hub.maps["m"].pins) > 50


def test_renamed_and_departed_people_are_found_under_their_new_name_only(hub, clock):
    ada, _ = hubfakes.join(hub)
    ada.hello("Ada")
    ada.move(Move(48.85, 2.35, None, None, 1))
    bo, _ = hubfakes.join(hub)
    bo.hello("Bo")
    bo.move(Move(48.86, 2.35, None, None, 1))
    assert [p["name"] for p in hub.people("m", "ADA", (48.85, 2.35), 5)[1]] == ["Ada"]
    ada.hello("Zed")
    assert hub.people("m", "ada", (48.85, 2.35), 5)[1] == []
    assert [p["name"] for p in hub.people("m", "zed", None, 5)[1]] == ["Zed"]
    bo.hello("Ada Bo")
    assert [p["name"] for p in hub.people("m", "ada", None, 5)[1]] == ["Ada Bo"]
    bo.leave()
    assert hub.people("m", "ada", None, 5) == (1, [])
    assert hub.maps["m"].names.by_name.keys() == {"zed"}


def test_a_broad_search_of_a_big_map_measures_only_the_pins_near_the_point(
        hub, clock, monkeypatch):
    """
    Ten thousand people over a city and an empty (or matching-everyone)
    query: the 50 nearest come from the rings of cells around the point,
    not from measuring every pin (a scan measured 10,000).
    """
    rng = random.Random(7)
    map_state = hub.map("m")
    for n in range(10_000):  # straight into the map's membership, as a node's pins would
        lat, lng = 48.85 + rng.uniform(-0.15, 0.15), 2.35 + rng.uniform(-0.25, 0.25)
        hub.apply_remote("m", "node-2", [{
            "id": f"r{n}", "lat": lat, "lng": lng, "heading": None, "accuracy": None,
            "name": f"Walker {n:05d}", "seq": 1, "ts": 1, "version": 1}])
    measured = 0
    distance = people._distance

    def counting(lat, lng, point):
        nonlocal measured
        measured += 1
        return distance(lat, lng, point)
    monkeypatch.setattr(people, "_distance", counting)
    for text in ["", "walker", "WALKER 0"]:
        measured = 0
        total, found = hub.people("m", text, (48.85, 2.35), 50)
        assert total == 10_000 and len(found) == 50
        assert [p["id"] for p in found] == reference(hub, text, (48.85, 2.35), 50)
        assert 50 <= measured < 2_000, (text, measured)
    # A narrow search measures its matches only.
    measured = 0
    found = hub.people("m", "walker 0123", (48.85, 2.35), 50)[1]
    assert sorted(p["name"] for p in found) == [f"Walker 0123{n}" for n in range(10)]
    assert measured == 10
    assert len(map_state.names.by_name) == 10_000


# ---------------------------------------------------------------- the limit, over HTTP


async def search(url: str, address: str, q: str = "ada"):
    answer = await treq.get(f"{url}/api/maps/public/people?q={q}&near=48.85,2.35",
                            headers={"X-Forwarded-For": address}, persistent=False)
    return answer, await answer.content()


@pytest_twisted.ensureDeferred
async def test_searches_past_the_burst_get_429_with_retry_after_and_other_addresses_do_not():
    server = await start_server("--trust-proxy", "127.0.0.1", "--search-rate", "0.5")
    try:
        url = f"http://127.0.0.1:{server.port}"
        codes = []
        for _ in range(SEARCH_BURST):
            answer, body = await search(url, "203.0.113.7")
            codes.append(answer.code)
            assert orjson.loads(body) == {"total": 0, "people": []}
        assert codes == [200] * SEARCH_BURST
        answer, body = await search(url, "203.0.113.7")
        assert answer.code == 429
        assert orjson.loads(body)["error"] == "too_many_searches"
        [retry] = answer.headers.getRawHeaders(b"retry-after")
        assert 1 <= int(retry) <= math.ceil(1 / 0.5)  # one search every 2 s
        # Another address (behind the trusted proxy) is not affected.
        answer, _ = await search(url, "198.51.100.1")
        assert answer.code == 200
        # Nor is the rest of the server.
        pins = await treq.get(f"{url}/api/maps/public/pins",
                              headers={"X-Forwarded-For": "203.0.113.7"}, persistent=False)
        await pins.content()
        assert pins.code == 200
    finally:
        await stop_server(server)


def test_the_search_rate_is_an_option():
    from twisted.python import usage
    from livemap_tx.service import Options
    options = Options()
    options.parseOptions([])
    assert options["search-rate"] == SEARCH_RATE
    for bad in ("0", "-1", "fast"):
        with pytest.raises(usage.UsageError, match="--search-rate"):
            Options().parseOptions(["--search-rate", bad])
