"""
Real processes under churn: three `twistd -n livemap --redis` nodes on the
tests' own redis-server, and clients that join, move, rename, close and drop
their TCP connection at random on a few maps, with no pause between one
action and the next (as a user's network drives them). At each quiet point
every node's `/api/maps/{map}/pins`, a fresh welcome on every node and every
client's own picture of the map must equal the truth.

Then a busy map with a WebSocket client that stops reading and a SockJS
client that stops polling: everyone else keeps converging, and the two catch
up once they read again.

The random sequence is seeded; a failure names its seed, and
LIVEMAP_CHURN_SEED replays it (LIVEMAP_CHURN_ROUNDS runs more rounds).
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from typing import Optional

import orjson
import pytest_twisted
import treq
from twisted.internet import reactor

from conftest import TwistdServer, deferLater
from liveclients import MapView, StalledSocket, open_view, sockjs_session
from redis_server import needs_redis
from test_cluster import cluster, redis  # noqa: F401 (fixtures)
from wsclient import WSClient, connect

SEED = int(os.environ.get("LIVEMAP_CHURN_SEED", random.randrange(10**6)))
ROUNDS = int(os.environ.get("LIVEMAP_CHURN_ROUNDS", "6"))
MAPS = ("c0", "c1", "c2")
QUIET = 15.0


@dataclass(eq=False)
class Person:
    view: MapView
    node: TwistdServer
    map: str
    name: Optional[str] = None

    @property
    def id(self) -> str:
        assert self.view.id is not None
        return self.view.id


class World:
    """The truth: what every map holds, from what the clients did."""

    def __init__(self, nodes: list[TwistdServer], rng: random.Random) -> None:
        self.nodes = nodes
        self.rng = rng
        self.people: list[Person] = []
        self.truth: dict[str, dict[str, tuple]] = {name: {} for name in MAPS}

    async def join(self, node: TwistdServer, map_name: str) -> Person:
        person = Person(await open_view(node.ws_url(map_name)), node, map_name)
        self.people.append(person)
        return person

    def move(self, person: Person) -> None:
        lat = round(self.rng.uniform(-60, 60), 5)
        lng = round(self.rng.uniform(-179, 179), 5)
        person.view.move(lat, lng)
        self.truth[person.map][person.id] = (lat, lng, person.name)

    def hello(self, person: Person) -> None:
        person.name = self.rng.choice(["Ada", "Grace", "Linus", "Guido"])
        person.view.hello(person.name)
        pin = self.truth[person.map].get(person.id)
        if pin is not None:
            self.truth[person.map][person.id] = (pin[0], pin[1], person.name)

    def leave(self, person: Person, abrupt: bool) -> None:
        if abrupt:
            person.view.client.abort()  # the TCP connection drops, no close handshake
        else:
            person.view.client.close()
        self.people.remove(person)
        self.truth[person.map].pop(person.id, None)

    async def step(self) -> None:
        rng = self.rng
        action = rng.choices(["join", "move", "hello", "close", "drop"],
                             weights=[3, 6, 1, 1, 1])[0]
        if action == "join" or not self.people:
            await self.join(rng.choice(self.nodes), rng.choice(MAPS))
            return
        person = rng.choice(self.people)
        if action == "move":
            self.move(person)
        elif action == "hello":
            self.hello(person)
        else:
            self.leave(person, abrupt=action == "drop")

    async def agrees(self) -> bool:
        for node in self.nodes:
            for map_name in MAPS:
                response = await treq.get(f"{node.url}/api/maps/{map_name}/pins")
                pins = orjson.loads(await response.content())["pins"]
                held = {pin["id"]: (pin["lat"], pin["lng"], pin["name"]) for pin in pins}
                if held != self.truth[map_name]:
                    return False
        for person in self.people:
            person.view.take_messages()
            if person.view.pins != self.truth[person.map]:
                return False
        return True

    async def check_quiet_point(self, what: str) -> None:
        deadline = reactor.seconds() + QUIET
        while not await self.agrees():
            if reactor.seconds() > deadline:
                raise AssertionError(self.describe(what))
            await deferLater(0.05)
        # A newcomer's welcome on every node is the truth too.
        for node in self.nodes:
            for map_name in MAPS:
                newcomer = await connect(node.ws_url(map_name))
                welcome = await newcomer.next("welcome")
                held = {pin["id"]: (pin["lat"], pin["lng"], pin["name"])
                        for pin in welcome["pins"]}
                assert held == self.truth[map_name], (
                    f"seed {SEED}, {what}: welcome on {node.url}/{map_name}: {held} != "
                    f"{self.truth[map_name]}")
                newcomer.close()
                await newcomer.wait_closed()

    def describe(self, what: str) -> str:
        lines = [f"seed {SEED} (LIVEMAP_CHURN_SEED={SEED} replays it): {what} never converged"]
        for map_name in MAPS:
            lines.append(f"  truth {map_name}: {self.truth[map_name]}")
        for person in self.people:
            if person.view.pins != self.truth[person.map]:
                lines.append(f"  {person.id} on {person.node.url}/{person.map} sees "
                             f"{person.view.pins}")
        return "\n".join(lines)

    async def close_all(self) -> None:
        for person in list(self.people):
            self.leave(person, abrupt=False)


def assert_clean_logs(nodes: list[TwistdServer]) -> None:
    for node in nodes:
        log = node.log()
        assert not re.search(r"Traceback|Unhandled [Ee]rror|RuntimeError", log), log[-3000:]


@needs_redis
@pytest_twisted.ensureDeferred
async def test_random_churn_on_three_nodes_converges_at_every_quiet_point(cluster):  # noqa: F811
    nodes = [cluster(), cluster(), cluster()]
    world = World(nodes, random.Random(SEED))
    # First, on purpose: the last local client of a map leaves a node while
    # the map lives on elsewhere (its departure must still reach the others).
    first, second = await world.join(nodes[0], "c0"), await world.join(nodes[0], "c0")
    await world.join(nodes[1], "c0")  # watches, has no pin
    for person in (first, second):
        world.move(person)
    await world.check_quiet_point("two pins on c0")
    world.leave(first, abrupt=False)
    world.leave(second, abrupt=True)
    await world.check_quiet_point("node 0 has no client of c0 left")
    for round_number in range(ROUNDS):
        for _ in range(14):
            await world.step()
        await world.check_quiet_point(f"after round {round_number}")
    await world.close_all()
    await world.check_quiet_point("everyone left")
    assert_clean_logs(nodes)


async def metric(node: TwistdServer, name: str) -> float:
    text = await (await treq.get(f"{node.url}/metrics")).text()
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


@needs_redis
@pytest_twisted.ensureDeferred
async def test_a_stalled_reader_and_a_stalled_poller_on_a_busy_map_cost_nobody_anything(
        cluster):  # noqa: F811
    nodes = [cluster(), cluster()]
    world = World(nodes, random.Random(SEED))
    busy = "c1"
    movers = [await world.join(nodes[index % 2], busy) for index in range(24)]
    for person in movers:
        person.name = "a long name for a busy map, so that updates are big: " + "x" * 10
        person.view.hello(person.name)
        world.move(person)
    await world.check_quiet_point("busy map filled")
    # A phone that stops reading (a tiny receive window, never read), and a
    # SockJS client that stops polling.
    reader = StalledSocket(nodes[0].port, f"/ws/{busy}")
    await reader.open()
    poller = await sockjs_session(nodes[0].url, "stalled", map_name=busy)
    await poller.poll()  # its welcome
    # Keep the map busy until node 0 skips both. The stalled phone also asks
    # for snapshots (it still writes, it only stopped reading): its buffers
    # fill within seconds even on a slow machine.
    for _ in range(200):
        for person in movers:
            world.move(person)
        for _ in range(10):
            await reader.send({"type": "view", "bbox": None})
        await deferLater(0.1)
        if await metric(nodes[0], "livemap_paused_connections") == 2:
            break
    else:
        raise AssertionError("the stalled clients were never paused")
    # Everyone else converges while they stall, departures included.
    for person in movers[:6]:
        world.leave(person, abrupt=person is movers[0])
    for person in movers[6:]:
        world.move(person)
    await world.check_quiet_point("the busy map with two stalled clients")
    # They read again: each catches up with the truth.
    truth = world.truth[busy]
    seen = MapView(WSClient())
    for _ in range(200):
        reader.drain()
        seen.pins = {}
        for message in reader.messages():
            seen._apply(message)
        if seen.pins == truth:
            break
        await deferLater(0.05)
    assert seen.pins == truth, (seen.pins, truth)
    reader.close()
    for _ in range(10):
        await poller.poll()
        assert poller.closed is None, poller.closed
        if poller.view.pins == truth:
            break
    assert poller.view.pins == truth
    await world.close_all()
    assert_clean_logs(nodes)
