"""
Maps spread over several Redis servers, and nodes that serve only the maps
they need: real `twistd` nodes on three redis-server processes started by
the tests (livemap_tx/redis_link.py, backplane.py).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Iterator

import orjson
import pytest
import pytest_twisted
import treq
from twisted.python import usage

from conftest import TwistdServer, deferLater, start_twistd
from liveclients import open_view
from livemap_tx.links import map_digest
from livemap_tx.redis_link import shard_of
from livemap_tx.service import Options
from redis_server import RedisServer, needs_redis

MAPS = [f"shard-map-{n}" for n in range(9)]


@pytest.fixture
def three_redis(tmp_path: Path) -> Iterator[list[RedisServer]]:
    servers = []
    for index in range(3):
        directory = tmp_path / f"redis{index}"
        directory.mkdir()
        server = RedisServer(directory)
        server.start()
        servers.append(server)
    yield servers
    for server in servers:
        server.stop()


def urls(servers: list[RedisServer]) -> str:
    return ",".join(server.url for server in servers)


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
        for index, server in enumerate(three_redis):
            listed = server.command("PUBSUB", "CHANNELS", "*:map:*").split()
            expected = {map_digest(m) for m in MAPS if shard_of(m, 3) == index}
            assert {channel.rsplit(":", 1)[1] for channel in listed} == expected
            assert expected, "nine maps on three servers: each gets some"
        # The first server also carries the cluster's and the nodes' channels.
        assert "livemap:v2:livemap:0:all" in three_redis[0].command("PUBSUB", "CHANNELS")
        assert "all" not in three_redis[1].command("PUBSUB", "CHANNELS")
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


@needs_redis
@pytest_twisted.ensureDeferred
async def test_nodes_given_different_redis_lists_say_so(tmp_path, three_redis):
    first = start_twistd(tmp_path, "--pirate", "none", "--redis", urls(three_redis),
                         "--node-ttl", "2")
    second = start_twistd(tmp_path, "--pirate", "none", "--redis", urls(three_redis[:2]),
                          "--node-ttl", "2")
    try:
        for node in (first, second):
            deadline = time.monotonic() + 10
            while True:
                health = await (await treq.get(f"{node.url}/healthz")).text()
                if "another list of Redis servers" in health:
                    break
                assert time.monotonic() < deadline, health
                await deferLater(0.2)
            assert health.startswith("degraded")
        assert "another list of Redis servers" in first.log()
    finally:
        first.stop()
        second.stop()


@pytest.mark.parametrize("value", ["redis://a,redis://a", "redis://a,http://b", ","])
def test_a_bad_redis_list_is_a_usage_error(value):
    with pytest.raises(usage.UsageError, match="--redis"):
        Options().parseOptions(["--redis", value])


def test_maps_are_placed_the_same_way_by_every_node():
    placed = [shard_of(name, 3) for name in MAPS]
    assert placed == [shard_of(name, 3) for name in MAPS] and len(set(placed)) == 3
    assert all(shard_of(name, 1) == 0 for name in MAPS)
