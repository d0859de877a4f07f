"""
A device deleted through one node is refused by every node at once, on
every endpoint (reports in each app's format, OwnTracks' Friends answer),
and no node ever brings it back, not even after Redis restarts empty and
every node writes back the devices it knows. Real `twistd` nodes and the
tests' own redis-server.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterator

import orjson
import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor

from conftest import TwistdServer, deferLater, eventually
from livemap_tx.cluster.backplane import Backplane
from livemap_tx.cluster.device_store import fix_value
from livemap_tx.phones.devices import Devices, UnknownDevice
from livemap_tx.hub import Hub
from livemap_tx.cluster.links import MemoryBus, MemoryLink
from livemap_tx.maps import MapDirectory
from livemap_tx.cluster.redis_link import RedisLink
from redis_server import REDIS_SERVER, RedisServer, needs_redis
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
    # By now each node has counted more misses from this address than
    # token_misses.py lets through (MISS_BURST): past them a deleted token
    # is refused with 429, without a look-up, which is a refusal too.
    for node in nodes:
        for token in (doomed["token"], other["token"]):
            answers = await every_endpoint(node, token, ["Kept"])
            assert set(answers) <= {404, 429}, answers
    assert redis.command("ZCARD", "livemap:v2:livemap:devices") == "1"


# Deletions written back with the devices (device_store.py), over the
# in-memory bus and a real Redis: a node cut off while a device was deleted
# writes it back to a Redis that came back empty; a node that remembers the
# deletion writes that back too, and in either order the device stays gone.


@pytest.fixture(params=["memory", "redis"])
def new_link(request: Any, tmp_path: Path) -> Iterator[Callable[[str], Any]]:
    if request.param == "memory":
        bus = MemoryBus(reactor)
        yield lambda node: MemoryLink(bus, node)
        return
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; "
                    "CI installs it)")
    server = RedisServer(tmp_path)
    server.start()
    yield lambda node: RedisLink(server.url, "test", node, reactor, max_backoff=0.3)
    server.stop()


class Quiet:
    def link_up(self) -> None: pass

    def link_down(self, reason: str) -> None: pass

    def message_received(self, message: bytes) -> None: pass


def device_record(pin_id: str) -> bytes:
    return orjson.dumps({"m": "family", "i": pin_id, "n": None, "x": None})


@pytest_twisted.ensureDeferred
async def test_a_written_back_deletion_beats_a_written_back_device_in_either_order(new_link):
    link = new_link("n1")
    link.start(Quiet())
    try:
        await eventually(lambda: link.linked, what="linked")
        keys = link.device_keys()
        now_ms = time.time() * 1000
        until = now_ms + 3_600_000
        fix = fix_value(b'"family"', b'[5,{"id":"p1"}]')
        # The cut-off node first, then one that remembers the deletion.
        await keys.restore([("doomed1", device_record("p1"), until),
                            ("kept", device_record("p2"), until)])
        assert await keys.save_fix("doomed1", "family", 5, fix, now_ms, until) == "saved"
        await keys.restore([], [("doomed1", "family", until)])
        # The other way round.
        await keys.restore([], [("doomed2", "family", until)])
        await keys.restore([("doomed2", device_record("p3"), until)])
        for gone in ("doomed1", "doomed2"):
            assert await keys.find_device(gone, now_ms) is None, gone
            assert await keys.save_fix(gone, "family", 6, fix, now_ms, until) == "unknown"
        assert await keys.find_device("kept", now_ms) == device_record("p2")
        assert await keys.load_fixes("family", now_ms) == []  # doomed1's fix went too
        # Remembered for its time only (then its record would be gone anyway).
        await keys.load_fixes("family", until + 1)
        await keys.restore([("doomed2", device_record("p3"), until + 10_000)])
        assert await keys.find_device("doomed2", until + 2) == device_record("p3")
    finally:
        await link.stop()


@pytest_twisted.ensureDeferred
async def test_every_node_writes_back_the_deletions_it_heard_of():
    bus = MemoryBus(reactor)
    nodes = []
    for name in ("a", "b"):
        hub = Hub(reactor, tick_interval=0.05)
        directory = MapDirectory(reactor)
        devices = Devices(hub, directory, reactor)
        plane = Backplane(hub, MemoryLink(bus, name), reactor, node_ttl=2.0)
        plane.share_maps(directory)
        plane.share_devices(devices)
        plane.startService()
        nodes.append((hub, devices, plane))
    try:
        await defer.gatherResults([plane.when_synced() for _, _, plane in nodes])
        (_, devices_a, _), (_, devices_b, plane_b) = nodes
        token, doomed = await devices_a.create("elsewhere", None, "10.0.0.1")
        kept_token, kept = await devices_a.create("family", None, "10.0.0.1")
        await devices_b.find(token)
        await devices_b.find(kept_token)
        await devices_a.delete(token)
        # b does not serve the map, and hears it all the same.
        await eventually(lambda: doomed.token_hash in devices_b.deleted, what="told")
        assert doomed.token_hash not in devices_b.known
        bus.stop()
        bus.start()
        await eventually(lambda: kept.token_hash in bus.devices, what="written back")
        await eventually(lambda: doomed.token_hash in bus.device_gone, what="deletion too")
        assert doomed.token_hash not in bus.devices
        with pytest.raises(UnknownDevice):
            await devices_b.find(token)
        assert (await devices_b.find(kept_token)).id == kept.id
    finally:
        for hub, _, plane in nodes:
            await plane.stopService()
            for map_state in list(hub.maps.values()):
                if map_state.tick_call is not None and map_state.tick_call.active():
                    map_state.tick_call.cancel()
