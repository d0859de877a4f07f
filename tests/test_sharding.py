"""
Maps spread over several Redis servers, and nodes that serve only the maps
they need: real `twistd` nodes on three redis-server processes started by
the tests (livemap_tx/cluster/redis_link.py, backplane.py).
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import orjson
import pytest
import pytest_twisted
import treq
from twisted.internet import error
from twisted.python import usage

from conftest import TwistdServer, deferLater, free_port, start_twistd, twistd_command
from liveclients import open_view
from livemap_tx.cluster.links import map_digest
from livemap_tx.cluster.sharding import in_agreed_order, servers_fingerprint, shard_of
from livemap_tx.service import Options
from redis_server import RedisServer, needs_redis, several_redis_servers

MAPS = [f"shard-map-{n}" for n in range(9)]


@pytest.fixture
def three_redis(tmp_path: Path) -> Iterator[list[RedisServer]]:
    yield from several_redis_servers(tmp_path, 3)


def urls(servers: list[RedisServer]) -> str:
    return ",".join(server.url for server in servers)


def place(server: RedisServer) -> str:
    return f"127.0.0.1:{server.port}/0"


async def metric(node: TwistdServer, name: str) -> float:
    text = await (await treq.get(f"{node.url}/metrics")).text()
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


@needs_redis
@pytest_twisted.ensureDeferred
async def test_maps_are_spread_over_three_redis_servers_and_every_node_converges(
        tmp_path, three_redis):
    nodes = [start_twistd(tmp_path, "--pirate", "none", "--redis", urls(three_redis),
                          "--node-ttl", "2") for _ in range(2)]
    try:
        views = {}
        for map_name in MAPS:
            pair = [await open_view(node.ws_url(map_name)) for node in nodes]
            for number, view in enumerate(pair):
                view.move(number + 1.0, float(MAPS.index(map_name)))
            views[map_name] = pair
        for map_name, pair in views.items():
            truth = {view.id: (number + 1.0, float(MAPS.index(map_name)), None)
                     for number, view in enumerate(pair)}
            for view in pair:
                await view.until(lambda pins, truth=truth: pins == truth)
        # Each map's channel is on the server its name hashes to, and only there.
        places = [place(server) for server in three_redis]
        for index, server in enumerate(three_redis):
            listed = server.command("PUBSUB", "CHANNELS", "*:map:*").split()
            expected = {map_digest(m) for m in MAPS if shard_of(m, places) == index}
            assert {channel.rsplit(":", 1)[1] for channel in listed} == expected
            assert expected, "nine maps on three servers: each gets some"
        # Every server carries the cluster's and the nodes' channels.
        for server in three_redis:
            assert "livemap:v2:livemap:0:all" in server.command("PUBSUB", "CHANNELS")
        for pair in views.values():
            for view in pair:
                view.client.close()
                await view.client.wait_closed()
    finally:
        for node in nodes:
            node.stop()


@needs_redis
@pytest_twisted.ensureDeferred
async def test_a_node_receives_nothing_of_the_maps_it_does_not_serve(tmp_path, three_redis):
    busy, quiet = (start_twistd(tmp_path, "--pirate", "none", "--redis", urls(three_redis),
                                "--node-ttl", "2") for _ in range(2))
    try:
        mover = await open_view(busy.ws_url("busy-map"))
        watcher = await open_view(quiet.ws_url("quiet-map"))
        await deferLater(0.5)
        before = await metric(quiet, "livemap_backplane_messages_received_total")
        started = time.monotonic()
        for number in range(30):
            mover.move(1.0, float(number))
            await deferLater(0.1)
        await mover.until(lambda pins: pins[mover.id][1] == 29.0)
        received = await metric(quiet, "livemap_backplane_messages_received_total") - before
        # Heartbeats of one other node (every ttl/4 when it publishes nothing
        # else): a handful, not 30 deltas.
        assert received <= (time.monotonic() - started) / 0.5 + 2, received
        assert await metric(quiet, "livemap_backplane_maps_watched") == 1
        # Once one of its clients opens the busy map, it serves it: whole at once.
        late = await open_view(quiet.ws_url("busy-map"))
        assert late.pins[mover.id][:2] == (1.0, 29.0)
        assert await metric(quiet, "livemap_backplane_maps_watched") == 2
        # When its last client there leaves, it lets the map go again.
        late.client.close()
        await late.client.wait_closed()
        deadline = time.monotonic() + 10
        while await metric(quiet, "livemap_backplane_maps_watched") != 1:
            assert time.monotonic() < deadline, "the map was never let go"
            await deferLater(0.2)
        pins = orjson.loads(await (await treq.get(f"{quiet.url}/api/maps/busy-map/pins")).content())
        assert [pin["id"] for pin in pins["pins"]] == [mover.id]  # the API serves it anew
        for view in (mover, watcher):
            view.client.close()
            await view.client.wait_closed()
    finally:
        busy.stop()
        quiet.stop()


def start_refusing(tmp_path: Path, *args: str) -> TwistdServer:
    """A node that may refuse to serve: waits for /healthz to answer, 200 or not."""
    port = free_port()
    log_path = tmp_path / f"twistd-{port}.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            twistd_command("--port", f"tcp:{port}:interface=127.0.0.1", *args),
            stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp_path,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return TwistdServer(process, port, log_path)


async def health(node: TwistdServer) -> tuple[int, str]:
    response = await treq.get(f"{node.url}/healthz")
    return response.code, await response.text()


async def until_health(node: TwistdServer, check: Callable[[int, str], bool]) -> str:
    deadline = time.monotonic() + 15
    while True:
        try:
            code, text = await health(node)
            if check(code, text):
                return text
        except (ConnectionRefusedError, error.ConnectionRefusedError):
            code, text = 0, "not listening yet"
        assert time.monotonic() < deadline, (code, text)
        await deferLater(0.2)


@needs_redis
@pytest_twisted.ensureDeferred
async def test_nodes_listing_the_servers_in_another_order_share_every_map(tmp_path, three_redis):
    """Issue 21, item 5: the order of --redis does not split the maps."""
    nodes = [start_twistd(tmp_path, "--pirate", "none", "--redis", urls(servers),
                          "--node-ttl", "2")
             for servers in (three_redis, three_redis[::-1], three_redis[1:] + three_redis[:1])]
    try:
        views = {}
        for map_name in MAPS:
            views[map_name] = [await open_view(node.ws_url(map_name)) for node in nodes]
            for number, view in enumerate(views[map_name]):
                view.move(number + 1.0, float(MAPS.index(map_name)))
        for map_name, group in views.items():
            truth = {view.id: (number + 1.0, float(MAPS.index(map_name)), None)
                     for number, view in enumerate(group)}
            for view in group:
                await view.until(lambda pins, truth=truth: pins == truth)
        # Each map's channel is on one server only, and every node listens there.
        for server in three_redis:
            for channel in server.command("PUBSUB", "CHANNELS", "*:map:*").split():
                assert server.command("PUBSUB", "NUMSUB", channel).split()[1] == "3"
        for node in nodes:
            assert await health(node) == (200, "ok")
            assert "refusing" not in node.log()
        for group in views.values():
            for view in group:
                view.client.close()
                await view.client.wait_closed()
    finally:
        for node in nodes:
            node.stop()


@needs_redis
@pytest_twisted.ensureDeferred
async def test_a_node_with_a_server_missing_or_added_refuses_to_serve(tmp_path, three_redis):
    """Issue 21, item 5: one clear line, /healthz 503, maps 503; fine again once it is gone."""
    fourth = RedisServer(tmp_path / "redis0")
    fourth.start()
    first = start_twistd(tmp_path, "--pirate", "none", "--redis", urls(three_redis),
                         "--node-ttl", "2")
    odd = None
    try:
        mover = await open_view(first.ws_url("before"))
        for round_, odd_servers in enumerate((three_redis[:2], three_redis + [fourth])):
            odd = start_refusing(tmp_path, "--pirate", "none", "--redis", urls(odd_servers),
                                 "--node-ttl", "2")
            for node in (first, odd):
                text = await until_health(node, lambda code, text: code == 503)
                assert text.startswith("refusing\n") and "another set of Redis servers" in text
                response = await treq.get(f"{node.url}/api/maps/some-map/pins")
                assert response.code == 503
                assert "refusing to serve" in await response.text()
                # Nor does it make anything that would be stored by its sharding.
                for path in ("/api/maps", "/api/maps/some-map/devices"):
                    response = await treq.post(f"{node.url}{path}")
                    assert response.code == 503, path
                    assert "refusing to serve" in await response.text()
            assert odd.log().count("refusing to serve: node") == 1, odd.log()
            assert await metric(first, "livemap_backplane_refusing") == 1
            assert first.log().count("refusing to serve: node") == round_ + 1, first.log()
            # A client already connected is not cut off.
            mover.move(1.0, 2.0 + round_)
            await mover.until(lambda pins: pins.get(mover.id, (0, 0))[:2] == (1.0, 2.0 + round_))
            odd.stop()
            odd = None
            # Its presence expires: the cluster agrees again, and serves.
            await until_health(first, lambda code, text: (code, text) == (200, "ok"))
            assert first.log().count("the same Redis servers again") == round_ + 1
            response = await treq.get(f"{first.url}/api/maps/some-map/pins")
            assert response.code == 200
            await response.content()
        mover.client.close()
        await mover.client.wait_closed()
    finally:
        first.stop()
        if odd is not None:
            odd.stop()
        fourth.stop()


@pytest.mark.parametrize("value", ["redis://a,redis://a", "redis://a,http://b", ",",
                                   "sentinel://a", "sentinel://a,a/m"])
def test_a_bad_redis_list_is_a_usage_error(value):
    with pytest.raises(usage.UsageError, match="--redis"):
        Options().parseOptions(["--redis", value])


def test_maps_are_placed_the_same_way_whatever_the_order_of_the_servers():
    places = ["a:6379/0", "b:6379/0", "c:6379/0"]
    names = [f"map-{n}" for n in range(300)]
    placed = [places[shard_of(name, places)] for name in names]
    assert all(80 <= placed.count(place) <= 120 for place in places)  # about a third each
    for order in itertools.permutations(places):
        assert [order[shard_of(name, order)] for name in names] == placed
        assert servers_fingerprint(order) == servers_fingerprint(places)
        assert in_agreed_order(order)[0] == "a:6379/0"  # the same home, too
    assert all(shard_of(name, places[:1]) == 0 for name in names)
    assert servers_fingerprint(places[:2]) != servers_fingerprint(places)
    # A server added takes maps only for itself: none moves between the others.
    more = places + ["d:6379/0"]
    for name, was in zip(names, placed):
        now = more[shard_of(name, more)]
        assert now in (was, "d:6379/0")


def one_map_per_server(servers: list[RedisServer], prefix: str) -> list[str]:
    """A map name whose channel is on each server, in the servers' order."""
    places = [place(server) for server in servers]
    found: dict[int, str] = {}
    for number in itertools.count():
        name = f"{prefix}-{number}"
        found.setdefault(shard_of(name, places), name)
        if len(found) == len(places):
            return [found[index] for index in range(len(places))]
    raise AssertionError("unreachable")


@needs_redis
@pytest.mark.parametrize("which", ["a map server", "the home"])
@pytest_twisted.ensureDeferred
async def test_one_dead_server_takes_only_its_maps_and_they_recover(tmp_path, three_redis,
                                                                   which):
    """Issue 21, item 6: degrade, don't die; recover without restarting a node."""
    nodes = [start_twistd(tmp_path, "--pirate", "none", "--redis", urls(three_redis),
                          "--node-ttl", "2") for _ in range(2)]
    # The home (the first in agreed order) also keeps private maps and devices.
    home = min(three_redis, key=place)
    dead = home if which == "the home" else next(
        server for server in three_redis if server is not home)
    maps = one_map_per_server(three_redis, "degrade")
    dead_map = maps[three_redis.index(dead)]
    try:
        views = {name: [await open_view(node.ws_url(name)) for node in nodes] for name in maps}

        async def converge(name: str, lat: float) -> None:
            for number, view in enumerate(views[name]):
                view.move(lat, float(number))
            truth = {view.id: (lat, float(number), None)
                     for number, view in enumerate(views[name])}
            for view in views[name]:
                await view.until(lambda pins: pins == truth)

        for name in maps:
            await converge(name, 1.0)
        dead.process.kill()
        dead.process.wait()
        for node in nodes:
            text = await until_health(node, lambda code, text: "is down" in text)
            assert text.startswith("degraded\n") and f"127.0.0.1:{dead.port}" in text
            assert ("devices" in text) == (dead is home)
            # The dead server's map: a clear 503, naming its server.
            response = await treq.get(f"{node.url}/api/maps/{dead_map}/pins")
            assert response.code == 503
            assert f"127.0.0.1:{dead.port}" in await response.text()
            assert await metric(node, "livemap_backplane_servers_down") == 1
        # The maps of the servers that are up: moves, newcomers, the API.
        for name in maps:
            if name == dead_map:
                continue
            await converge(name, 2.0)
            late = await open_view(nodes[1].ws_url(name))
            assert {pin[:2] for pin in late.pins.values()} == {(2.0, 0.0), (2.0, 1.0)}
            late.client.close()
            await late.client.wait_closed()
            response = await treq.get(f"{nodes[0].url}/api/maps/{name}/pins")
            assert response.code == 200
            assert len(orjson.loads(await response.content())["pins"]) == 2
        # A new device goes to the store on the home: fine while it is up.
        response = await treq.post(f"{nodes[0].url}/api/maps/{maps[0]}/devices",
                                   data=orjson.dumps({"name": "Ada"}))
        assert response.code == (503 if dead is home else 201), await response.text()
        # The dead server comes back (empty): its map recovers, no client reconnected.
        dead.start()
        for node in nodes:
            await until_health(node, lambda code, text: (code, text) == (200, "ok"))
            assert await metric(node, "livemap_backplane_servers_down") == 0
        await converge(dead_map, 3.0)
        response = await treq.get(f"{nodes[1].url}/api/maps/{dead_map}/pins")
        assert response.code == 200
        assert len(orjson.loads(await response.content())["pins"]) == 2
        for group in views.values():
            for view in group:
                assert not view.client.closed.called
                view.client.close()
                await view.client.wait_closed()
    finally:
        for node in nodes:
            node.stop()


def test_the_cache_of_map_placements_is_bounded(monkeypatch):
    from livemap_tx.cluster import redis_link
    from twisted.internet import reactor
    monkeypatch.setattr(redis_link, "PLACED_CACHE", 4)
    link = redis_link.RedisLink("redis://b:1/0,redis://a:1/0,redis://c:1/0", "t", "n", reactor)
    placed = {name: link.server_of(name) for name in MAPS}
    assert len(link._placed) <= 4
    assert {name: link.server_of(name) for name in MAPS} == placed  # the same after forgetting
    assert [server.address.place for server in link.servers] == ["a:1/0", "b:1/0", "c:1/0"]
    assert link.home.address.place == "a:1/0"  # the first in agreed order, not as listed
