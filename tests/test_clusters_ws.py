"""
Extension "clusters" end to end: a real `twistd -n livemap` on 127.0.0.1,
real WebSockets. The view in the URL makes the welcome, a clustered view's
bytes are the protocol's, cells switch between a cluster and pins, and the
people search finds anyone on the map.
"""

from __future__ import annotations

import orjson
import pytest_twisted
import treq

from conftest import deferLater
from livemap_tx import wire
from wsclient import connect

PARIS = "2.2,48.8,2.5,48.9"


async def crowd(url: str, count: int) -> list:
    """`count` named people a few metres apart, whose moves the server holds."""
    people = []
    for n in range(count):
        person = await connect(url)
        me = (await person.next("welcome"))["id"]
        person.send({"type": "hello", "name": f"Runner {n}"})
        person.send({"type": "move", "lat": 48.85 + n * 1e-4, "lng": 2.35, "seq": 1})
        await person.until(lambda m, me=me: m["type"] == "update"
                           and any(pin["id"] == me for pin in m["pins"]))
        people.append(person)
    return people


@pytest_twisted.ensureDeferred
async def test_a_clustered_view_from_its_url_to_its_bytes(twistd_server):
    url = twistd_server.ws_url("marathon")
    runners = await crowd(url, 6)

    watcher = await connect(f"{url}?bbox={PARIS}&zoom=12")
    welcome = await watcher.next("welcome")
    assert welcome["pins"] == [] and welcome["total"] == 6
    [cluster] = welcome["clusters"]
    assert cluster["count"] == 6 and cluster["id"].startswith("c:13/")
    # The bytes are the protocol's: v1's welcome with `clusters` and `total`.
    assert watcher.raw[0] == wire.encode_welcome(
        welcome["id"], [], [orjson.dumps(cluster)], 6)

    # Two leave: four is K, the cell is sent as its pins again, in one update.
    for runner in runners[:2]:
        runner.close()
        await runner.wait_closed()
    update = await watcher.until(lambda m: m["type"] == "update" and cluster["id"] in m["gone"])
    assert update["gone"] == [cluster["id"]] and update["clusters"] == []
    assert sorted(pin["name"] for pin in update["pins"]) == [f"Runner {n}" for n in range(2, 6)]
    assert update["total"] == 4

    # A v1 view in the URL: only its box, and no new keys; a bad one: the world.
    plain = await connect(f"{url}?bbox=2.3,48.84,2.4,48.86")
    welcome = await plain.next("welcome")
    assert set(welcome) == {"type", "id", "pins"} and len(welcome["pins"]) == 4
    far = await connect(f"{url}?bbox=10,10,11,11")
    assert (await far.next("welcome"))["pins"] == []
    bad = await connect(f"{url}?bbox=2.3,48.84,2.4&zoom=12")
    welcome = await bad.next("welcome")
    assert set(welcome) == {"type", "id", "pins"} and len(welcome["pins"]) == 4

    # A view message with a zoom clusters a connection that did not ask at first.
    plain.send({"type": "view", "bbox": [2.2, 48.8, 2.5, 48.9], "zoom": 12})
    snapshot = await plain.next("snapshot")
    assert len(snapshot["pins"]) == 4 and snapshot["clusters"] == [] and snapshot["total"] == 4
    plain.send({"type": "view", "bbox": None, "zoom": 30})
    assert (await plain.next("error"))["code"] == wire.OUT_OF_RANGE

    for client in (*runners[2:], watcher, plain, far, bad):
        client.close()
        await client.wait_closed()


@pytest_twisted.ensureDeferred
async def test_the_people_search_finds_anyone_nearest_first(twistd_server):
    url = twistd_server.ws_url("festival")
    people = await crowd(url, 5)
    base = f"{twistd_server.url}/api/maps/festival/people"

    async def get(query: str) -> tuple[int, dict]:
        response = await treq.get(f"{base}{query}")
        return response.code, orjson.loads(await response.content())

    code, found = await get("?q=RUNNER 3")
    assert code == 200 and found["total"] == 5
    assert [pin["name"] for pin in found["people"]] == ["Runner 3"]
    code, found = await get("?near=48.8504,2.35&limit=2")
    assert [pin["name"] for pin in found["people"]] == ["Runner 4", "Runner 3"]
    code, found = await get("")
    assert len(found["people"]) == 5
    for bad in ("?near=north", "?limit=0", "?limit=many", "?near=91,0", "?q=" + "x" * 65):
        code, found = await get(bad)
        assert code == 400 and found["error"] == "bad_query", bad
    response = await treq.get(f"{twistd_server.url}/api/maps/no%20such/people")
    assert response.code == 404
    await response.content()
    for person in people:
        person.close()
        await person.wait_closed()
    await deferLater(0.01)
