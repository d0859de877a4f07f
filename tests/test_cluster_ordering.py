"""
Order-proof joins (issue 21, items 3 and 4): real `twistd` nodes on two
redis-server processes, one of them behind a delaying proxy (300 ms and
random jitter, each direction on its own), so that what travels through
one server arrives long after what travels through the other. A node that
joins a map while pins and devices leave it must show neither a ghost (a
departure overtaken by the joining node's snapshot) nor lose a pin.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, error, reactor

from conftest import TwistdServer, deferLater, free_port, twistd_command
from delaying_proxy import DelayingProxy
from liveclients import open_view
from livemap_tx.cluster.backplane import Backplane, RedisLink
from livemap_tx.phones.devices import Devices, Fix
from livemap_tx.hub import DEVICES, Hub
from livemap_tx.maps import MapDirectory
from livemap_tx.cluster.sharding import in_agreed_order, shard_of
from redis_server import RedisServer, needs_redis, several_redis_servers

ROUNDS = 20


class Watcher:
    """A subscriber that takes everything and shows nothing."""

    def send_frame(self, frame: Any) -> None:
        pass

    def close(self, code: int, reason: str) -> None:
        pass


@pytest.fixture
def two_redis(tmp_path: Path) -> Iterator[list[RedisServer]]:
    yield from several_redis_servers(tmp_path, 2)


async def slow_home(servers: list[RedisServer]) -> tuple[DelayingProxy, str, str]:
    """
    A proxy (300 ms + up to 300 ms, each way on its own) in front of the server that
    keeps the stores and the cluster's channel (the home, first in sorted
    order), and the --redis value; returns (proxy, value, place of the fast one).
    """
    slow, fast = servers
    fast_place = f"127.0.0.1:{fast.port}/0"
    # The proxy's port is chosen so that its place sorts first (places sort
    # as text, so a free port chosen by the system might not): the first
    # free one in that order.
    for port in sorted(range(1024, 65536), key=str):
        place = f"127.0.0.1:{port}/0"
        if in_agreed_order([place, fast_place])[0] != place:
            break
        proxy = DelayingProxy(slow.port, to_server=(0.3, 0.3), to_client=(0.3, 0.3), seed=21)
        try:
            proxy.start(port)
        except error.CannotListenError:
            continue
        return proxy, f"redis://{place},redis://{fast_place}", fast_place
    raise AssertionError("no free proxy port sorts before the fast server's")


def maps_on(place: str, places: list[str], count: int, prefix: str) -> list[str]:
    names = []
    number = 0
    while len(names) < count:
        name = f"{prefix}-{number}"
        if places[shard_of(name, places)] == place:
            names.append(name)
        number += 1
    return names


async def healthy(node: TwistdServer) -> None:
    deadline = time.monotonic() + 20
    while True:
        assert node.process.poll() is None, node.log()
        try:
            response = await treq.get(f"{node.url}/healthz")
            text = await response.text()
        except (ConnectionRefusedError, error.ConnectionRefusedError):
            text = "not listening yet"
        if text == "ok":
            return
        assert time.monotonic() < deadline, text
        await deferLater(0.2)


async def start_node(tmp_path: Path, *args: str) -> TwistdServer:
    """A node started without blocking this reactor (the proxy runs in it), once healthy."""
    port = free_port()
    log_path = tmp_path / f"twistd-{port}.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            twistd_command("--port", f"tcp:{port}:interface=127.0.0.1", *args),
            stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp_path,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    node = TwistdServer(process, port, log_path)
    try:
        await healthy(node)
    except BaseException:
        node.stop()
        raise
    return node


@pytest.mark.waits  # mostly waiting: scripts/test runs it beside the rest
@needs_redis
@pytest_twisted.ensureDeferred
async def test_a_joining_node_shows_no_ghost_whatever_the_servers_latency(tmp_path, two_redis):
    """
    Each round a node starts serving a new map (on the fast server) while,
    at a random moment around its join, a client of the other node leaves
    the map: the answers to the joiner's request (through the slow server
    before the fix) must never bring the departed pin back. 20 rounds, each
    converging, and staying so.
    """
    proxy, value, fast = await slow_home(two_redis)
    places = [part.split("//")[1] for part in value.split(",")]
    args = ("--pirate", "none", "--redis", value, "--node-ttl", "2")
    nodes = [await start_node(tmp_path, *args), await start_node(tmp_path, *args)]
    rng = random.Random(3)
    try:
        for round_, map_name in enumerate(maps_on(fast, places, ROUNDS, "ghost")):
            owner, joiner = nodes[round_ % 2], nodes[1 - round_ % 2]
            stays = await open_view(owner.ws_url(map_name))
            leaves = await open_view(owner.ws_url(map_name))
            stays.move(1.0, float(round_))
            leaves.move(2.0, float(round_))
            await stays.until(lambda pins: len(pins) == 2)
            # The join, and the departure from just before the joiner's
            # request reaches the owner to well after its answer left.
            joining = defer.ensureDeferred(open_view(joiner.ws_url(map_name)))
            await deferLater(rng.uniform(0.0, 0.8))
            leaves.client.close()
            viewer = await joining
            truth = {stays.id: (1.0, float(round_), None)}
            for view in (stays, viewer):
                await view.until(lambda pins: pins == truth, timeout=10)
            # And it stays so (a ghost comes back with a late answer).
            await deferLater(1.0)
            viewer.take_messages()
            assert viewer.pins == truth, f"round {round_}: {viewer.pins}"
            for view in (stays, viewer):
                view.client.close()
                await view.client.wait_closed()
    finally:
        for node in nodes:
            node.stop()
        await proxy.stop()


DEVICE_COUNT = 2500
SCAN_ROUNDS = 10


@needs_redis
@pytest_twisted.ensureDeferred
async def test_a_node_that_joins_a_map_while_its_devices_move_loses_no_pin(tmp_path, two_redis):
    """
    Issue 21, item 4: two nodes in this process on a real Redis (behind a
    proxy, 50 ms + jitter each way, so that the store's scan of 2,500
    devices takes several round trips); each round one node starts serving
    the map while the other takes a move of every device and a first fix of
    new ones during the scan. Then every pin is there, at its newest fix.
    10 rounds.
    """
    server = two_redis[0]
    proxy = DelayingProxy(server.port, to_server=(0.05, 0.05), to_client=(0.05, 0.05), seed=4)
    port = proxy.start()
    hubs, planes, devices = [], [], []
    for name in ("mover", "joiner"):
        hub = Hub(reactor, tick_interval=0.05)
        link = RedisLink(f"redis://127.0.0.1:{port}/0", "scan", name, reactor,
                         max_backoff=0.3, keepalive=0.5)
        plane = Backplane(hub, link, reactor, node_ttl=3.0, linger=0.05)
        made = Devices(hub, MapDirectory(reactor), reactor, rate=100.0, expire=3600.0)
        plane.share_devices(made)
        plane.startService()
        hubs.append(hub)
        planes.append(plane)
        devices.append(made)
    mover, joiner = devices
    try:
        await planes[0].when_synced()
        await planes[1].when_synced()
        holder = hubs[0].join("scan-map", Watcher())  # the mover serves the map throughout
        await planes[0].watch("scan-map")
        made: list[Any] = []

        async def create(count: int) -> list[Any]:
            created = []
            for start in range(0, count, 100):
                batch = [mover.create("scan-map", f"d{len(made) + n}",
                                      f"10.{(len(made) + n) // 65536 % 256}."
                                      f"{(len(made) + n) // 256 % 256}.{(len(made) + n) % 256}")
                         for n in range(start, min(count, start + 100))]
                created += [device for _, device in await defer.gatherResults(
                    [defer.ensureDeferred(one) for one in batch])]
            return created

        async def move_all(targets: list[Any], lat: float) -> None:
            ts = int(reactor.seconds() * 1000)
            for start in range(0, len(targets), 250):
                await defer.gatherResults([defer.ensureDeferred(mover.report(
                    device, Fix(lat, 13.4, ts, "owntracks"))) for device in
                    targets[start:start + 250]])

        made += await create(DEVICE_COUNT)
        await move_all(made, 1.0)
        for round_ in range(SCAN_ROUNDS):
            await deferLater(0.01)  # a new millisecond: a newer fix
            # The joiner starts serving the map; meanwhile every device moves,
            # and a few new ones get their first fix.
            fresh = await create(5)
            # The first fixes of the new ones spread over the moves (and the scan).
            order = list(made)
            for index, device in enumerate(fresh):
                order.insert(index * len(made) // len(fresh), device)
            moving = defer.ensureDeferred(move_all(order, 2.0 + round_))
            await deferLater(random.uniform(0.0, 0.3))
            viewer = hubs[1].join("scan-map", Watcher())  # holds the map while checked
            await planes[1].watch("scan-map", 0.05)
            await moving
            made += fresh
            expected = {device.id: 2.0 + round_ for device in made}
            deadline = reactor.seconds() + 10
            while True:
                map_state = hubs[1].maps.get("scan-map")
                held = {} if map_state is None else {
                    pin.id: pin.lat for pin in map_state.pins.values() if pin.origin == DEVICES}
                if held == expected:
                    break
                missing = len(set(expected) - set(held))
                assert reactor.seconds() < deadline, (
                    f"round {round_}: {missing} pins lost, "
                    f"{sum(held.get(k) != v for k, v in expected.items())} not at their fix")
                await deferLater(0.1)
            # Let the joiner stop serving it, for the next round's join.
            viewer.leave()
            while "scan-map" in planes[1].watches:
                await deferLater(0.05)
        holder.leave()
    finally:
        for plane in planes:
            await plane.stopService()
        await proxy.stop()
