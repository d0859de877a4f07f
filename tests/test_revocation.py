"""
A device deleted through one node is refused by every node at once, on
every endpoint (reports in each app's format, OwnTracks' Friends answer),
and no node ever brings it back, not even after Redis restarts empty and
every node writes back the devices it knows. Real `twistd` nodes and the
tests' own redis-server.
"""

from __future__ import annotations

import time

import orjson
import pytest_twisted
import treq

from conftest import TwistdServer, deferLater
from redis_server import needs_redis
from test_cluster import cluster, redis  # noqa: F401 (fixtures)

WAIT = 15.0
EXPIRE = 600


async def make_device(node: TwistdServer, map_name: str, name: str) -> dict:
    response = await treq.post(f"{node.url}/api/maps/{map_name}/devices",
                               data=orjson.dumps({"name": name}))
    body = orjson.loads(await response.content())
    assert response.code == 201, body
    return body


async def owntracks(node: TwistdServer, token: str, message: dict) -> tuple[int, bytes]:
    response = await treq.post(f"{node.url}/apps/owntracks/{token}", data=orjson.dumps(message))
    return response.code, await response.content()


def location(lat: float, tst: float) -> dict:
    return {"_type": "location", "lat": lat, "lon": 13.4, "tst": int(tst), "tid": "AD"}


async def osmand(node: TwistdServer, token: str, lat: float, ts: float) -> int:
    response = await treq.get(f"{node.url}/apps/osmand", params={
        "id": token, "lat": str(lat), "lon": "2.35", "timestamp": str(int(ts))})
    await response.content()
    return response.code


async def overland(node: TwistdServer, token: str, lat: float, ts: float) -> int:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
    response = await treq.post(f"{node.url}/apps/overland/{token}", data=orjson.dumps(
        {"locations": [{"type": "Feature", "geometry": {"type": "Point", "coordinates": [2.3, lat]},
                        "properties": {"timestamp": stamp}}]}))
    await response.content()
    return response.code


async def every_endpoint(node: TwistdServer, token: str, secrets: list[str]) -> list:
    """What each endpoint answers a token: fresh fixes, a fix too old to show, no fix."""
    now = time.time()
    answers = []
    # Those a node answers without saving a fix first.
    for message in ({"_type": "lwt", "tst": int(now)}, {"_type": "transition"},
                    location(7.1, now - 2 * EXPIRE), location(7.0, now)):
        code, body = await owntracks(node, token, message)
        # A refusal names no pin of the map (OwnTracks' Friends answer).
        assert not any(name.encode() in body for name in secrets), body
        answers.append(code)
    answers.append(await osmand(node, token, 7.3, now - 2 * EXPIRE))
    answers.append(await osmand(node, token, 7.2, now))
    answers.append(await overland(node, token, 7.4, now))
    return answers


REFUSED = [404] * 7


@needs_redis
@pytest_twisted.ensureDeferred
async def test_a_device_deleted_on_one_node_is_refused_by_every_node_at_once_and_for_good(
        cluster, redis):  # noqa: F811
    first, second, third = (cluster("--expire", str(EXPIRE)) for _ in range(3))
    nodes = [first, second, third]
    # Two devices on one map, another alone on its own map.
    kept = await make_device(first, "family", "Kept")
    other = await make_device(first, "family", "Other")
    doomed = await make_device(first, "alone", "Doomed")
    now = time.time()
    code, _ = await owntracks(second, kept["token"], location(1.0, now))
    assert code == 200
    code, friends = await owntracks(second, other["token"], location(2.0, now))
    assert code == 200 and b'"name":"Kept"' in friends  # the Friends answer
    # The second node meets the doomed device without serving its map (only
    # messages with no position), the first takes its reports.
    for node in (second, third):
        for message in ({"_type": "lwt", "tst": int(now)}, {"_type": "transition"}):
            code, body = await owntracks(node, doomed["token"], message)
            assert (code, body) == (200, b"[]")
    assert await every_endpoint(first, doomed["token"], []) == [200] * 7

    response = await treq.delete(f"{first.url}/api/devices/{doomed['token']}")
    assert response.code == 204
    # The very first request after the deletion's answer is refused, on
    # either node and every endpoint.
    for node in (second, first):
        assert await every_endpoint(node, doomed["token"], ["Kept", "Other"]) == REFUSED
    # And deleting a device on the map the other node serves.
    response = await treq.delete(f"{first.url}/api/devices/{other['token']}")
    assert response.code == 204
    for node in (second, first):
        assert await every_endpoint(node, other["token"], ["Kept"]) == REFUSED

    # Redis restarts empty: every node relinks, finds a new epoch and writes
    # back the devices it knows: the kept one, never the deleted ones (the
    # third node met the doomed one and was not asked about it since).
    redis.stop()
    redis.start()
    deadline = time.monotonic() + WAIT
    for node in nodes:
        while True:
            code, _ = await owntracks(node, kept["token"], location(4.0, time.time()))
            health = await (await treq.get(f"{node.url}/healthz")).text()
            if code == 200 and health == "ok":
                break
            assert code in (404, 503), code  # until relinked and written back
            assert time.monotonic() < deadline, f"{node.url} never wrote the devices back"
            await deferLater(0.25)
    # Give every write-back time to land, then ask again.
    await deferLater(1.0)
    for node in nodes:
        assert await every_endpoint(node, doomed["token"], ["Kept"]) == REFUSED
        assert await every_endpoint(node, other["token"], ["Kept"]) == REFUSED
    assert redis.command("ZCARD", "livemap:v2:livemap:devices") == "1"
