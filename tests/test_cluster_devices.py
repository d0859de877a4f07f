"""
Phone apps' devices across real nodes (`twistd -n livemap --redis`): a
device's pin belongs to the device, not to a node. Reports alternating
between nodes (as behind a balancer) give one pin at the newest fix
everywhere; killing the node that took the last report takes nothing; a
node that joins later has the pin in its first welcome; a deletion on one
node is a `gone` on every node; and a Redis that comes back empty gets the
devices back from the nodes.
"""

from __future__ import annotations

import signal
import time
from typing import Any

import orjson
import pytest_twisted
import treq

from conftest import TwistdServer, deferLater
from liveclients import open_view
from redis_server import needs_redis
from test_cluster import cluster, redis  # noqa: F401 (fixtures)
from wsclient import connect

WAIT = 10.0


async def make_device(node: TwistdServer, map_name: str, name: str = "Ada") -> dict:
    response = await treq.post(f"{node.url}/api/maps/{map_name}/devices",
                               data=orjson.dumps({"name": name}))
    body = orjson.loads(await response.content())
    assert response.code == 201, body
    return body


async def report(node: TwistdServer, token: str, lat: float, tst: float) -> int:
    response = await treq.post(f"{node.url}/apps/owntracks/{token}", data=orjson.dumps(
        {"_type": "location", "lat": lat, "lon": 13.4, "tst": int(tst), "tid": "AD"}))
    await response.content()
    return response.code


async def pins(node: TwistdServer, map_name: str) -> dict[str, Any]:
    response = await treq.get(f"{node.url}/api/maps/{map_name}/pins")
    return {pin["id"]: pin for pin in orjson.loads(await response.content())["pins"]}


async def everywhere(nodes: list[TwistdServer], map_name: str, check: Any, what: str) -> None:
    for node in nodes:
        deadline = time.monotonic() + WAIT
        while True:
            held = await pins(node, map_name)
            if check(held):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} on {node.url}: {held}")
            await deferLater(0.05)


@needs_redis
@pytest_twisted.ensureDeferred
async def test_reports_alternating_between_nodes_give_one_pin_at_the_newest_fix(cluster):  # noqa: F811
    nodes = [cluster(), cluster()]
    device = await make_device(nodes[0], "family")
    token, pin_id = device["token"], device["id"]
    viewers = [await open_view(node.ws_url("family")) for node in nodes]
    now = time.time()
    # Behind a balancer: each report lands on another node; one comes late
    # (an app's queued fix) and must not move the pin back.
    for step, (node, lat, ago) in enumerate([(0, 1.0, 50), (1, 2.0, 40), (0, 3.0, 30),
                                             (1, 2.5, 35), (0, 4.0, 20)]):
        assert await report(nodes[node], token, lat, now - ago) == 200, step
    await everywhere(nodes, "family", lambda held: held.get(pin_id, {}).get("lat") == 4.0,
                     "the newest fix")
    for view in viewers:
        await view.until(lambda seen: seen.get(pin_id, (None,))[0] == 4.0)
    # kill -9 of the node that took the last report: the pin stays.
    nodes[0].process.send_signal(signal.SIGKILL)
    nodes[0].process.wait()
    viewers[1].take_messages()
    await deferLater(0.2)
    assert (await pins(nodes[1], "family"))[pin_id]["lat"] == 4.0
    # A node that joins later shows it in its first welcome.
    late = cluster()
    newcomer = await connect(late.ws_url("family"))
    welcome = await newcomer.next("welcome")
    assert [pin["lat"] for pin in welcome["pins"] if pin["id"] == pin_id] == [4.0]
    assert welcome["pins"][0]["source"] == "owntracks"
    # Reports keep working on the survivors, and reach the newcomer.
    assert await report(late, token, 5.0, now - 10) == 200
    await everywhere([nodes[1], late], "family",
                     lambda held: held.get(pin_id, {}).get("lat") == 5.0, "a later fix")
    # Deleted on one node: gone on every node, refused on every node.
    response = await treq.delete(f"{nodes[1].url}/api/devices/{token}")
    assert response.code == 204
    await everywhere([nodes[1], late], "family", lambda held: pin_id not in held, "gone")
    while True:
        message = await newcomer.next("update", timeout=WAIT)
        if pin_id in message["gone"]:
            break
    for node in (nodes[1], late):
        assert await report(node, token, 6.0, now) == 404
    newcomer.close()
    await newcomer.wait_closed()
    viewers[1].client.close()
    await viewers[1].client.wait_closed()


@needs_redis
@pytest_twisted.ensureDeferred
async def test_a_redis_that_comes_back_empty_gets_the_devices_back(cluster, redis):  # noqa: F811
    nodes = [cluster(), cluster()]
    device = await make_device(nodes[0], "family")
    token, pin_id = device["token"], device["id"]
    now = time.time()
    assert await report(nodes[1], token, 1.0, now - 5) == 200
    await everywhere(nodes, "family", lambda held: pin_id in held, "the pin")
    redis.stop()
    redis.start()  # empty: no persistence
    # Both nodes relink, see a new epoch, and write back what they know.
    deadline = time.monotonic() + 15
    while True:
        code = await report(nodes[0], token, 2.0, time.time())
        if code == 200:
            break
        assert code in (404, 503), code  # until the nodes have relinked and restored
        assert time.monotonic() < deadline, "the device never came back"
        await deferLater(0.25)
    await everywhere(nodes, "family", lambda held: held.get(pin_id, {}).get("lat") == 2.0,
                     "the fix after the restart")
    assert redis.command("ZCARD", "livemap:v2:livemap:devices") == "1"


@needs_redis
@pytest_twisted.ensureDeferred
async def test_the_documented_acl_user_can_do_everything_livemap_does(
        tmp_path, redis, cluster):  # noqa: F811
    """docs/deployment.md's `user livemap ...` line, applied as is: pins, private maps, devices."""
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "deployment.md").read_text()
    [line] = [ln for ln in doc.splitlines() if ln.startswith("user livemap on ")]
    rules = line.split()[2:]
    rules = ["on", ">s3cret-acl", *[rule for rule in rules[1:] if not rule.startswith(">")]]
    redis.command("ACL", "SETUSER", "livemap", *rules)
    url = f"redis://livemap:s3cret-acl@127.0.0.1:{redis.port}/0"
    nodes = [cluster("--redis", url, "--no-open-maps"), cluster("--redis", url, "--no-open-maps")]
    for node in nodes:
        health = await (await treq.get(f"{node.url}/healthz")).text()
        assert health == "ok", health
    created = orjson.loads(await (await treq.post(f"{nodes[0].url}/api/maps")).content())
    name = created["map"]
    device = await make_device(nodes[1], name)
    views = [await open_view(node.ws_url(name)) for node in nodes]
    views[0].move(1.0, 2.0)
    assert await report(nodes[0], device["token"], 3.0, time.time()) == 200
    for view in views:
        await view.until(lambda seen: len(seen) == 2)
    response = await treq.delete(f"{nodes[0].url}/api/devices/{device['token']}")
    assert response.code == 204
    for view in views:
        await view.until(lambda seen: device["id"] not in seen)
        view.client.close()
        await view.client.wait_closed()
    for node in nodes:
        assert "NOPERM" not in node.log() and "noperm" not in node.log().lower()
