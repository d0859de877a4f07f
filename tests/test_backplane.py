"""
The backplane and its links.

One shared set of tests runs over both links, the in-memory one and Redis
(a private redis-server): the link contract, and hubs joined through a
backplane (pins, moves, names, departures, a node that dies, an outage and
the resync after it). Deterministic details (one message per tick, first
sync, replacing a node's state, bad messages) run on the memory link with a
fake clock.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import orjson
import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor, task
from twisted.python import usage
from twisted.python.failure import Failure

from conftest import eventually, server_options
from livemap_tx import wire
from livemap_tx.cluster import map_watching
from livemap_tx.cluster.backplane import (
    Backplane,
    MemoryBus,
    MemoryLink,
    RedisLink,
    parse_redis_url,
)
from livemap_tx.cluster.redis_server_link import parse_redis_urls
from livemap_tx.phones.devices import Devices, Fix
from livemap_tx.hub import DEVICES, Frame, Hub
from livemap_tx.cluster.links import MapUnavailable
from livemap_tx.cluster.links import map_channel as links_map_channel
from livemap_tx.maps import MapDirectory
from livemap_tx.service import Options
from redis_server import REDIS_SERVER, RedisServer

WAIT = 10.0




class Watcher:
    """A fake subscriber that records the messages a hub sends it."""

    def __init__(self) -> None:
        self.messages: list[dict] = []

    def send_frame(self, frame: Frame) -> None:
        self.messages.append(orjson.loads(frame.payload))

    def close(self, code: int, reason: str) -> None:
        pass


def move(lat: float = 1.0, lng: float = 2.0, seq: Optional[int] = None) -> wire.Move:
    return wire.Move(lat, lng, None, None, seq)


def positions(hub: Hub, map_name: str = "m") -> dict[str, tuple]:
    return {pin["id"]: (pin["lat"], pin["lng"], pin["name"]) for pin in hub.pins(map_name)}


# The bus under test: memory or a private Redis


class MemoryCluster:
    kind = "memory"

    def __init__(self, tmp_path: Path) -> None:
        self.bus = MemoryBus(reactor)

    def link(self, node: str) -> MemoryLink:
        return MemoryLink(self.bus, node)

    def outage(self) -> None:
        self.bus.stop()

    def restore(self) -> None:
        self.bus.start()

    def close(self) -> None:
        pass


class RedisCluster:
    kind = "redis"

    def __init__(self, tmp_path: Path) -> None:
        self.server = RedisServer(tmp_path)
        self.server.start()

    def link(self, node: str) -> RedisLink:
        return RedisLink(self.server.url, "test", node, reactor, max_backoff=0.3, keepalive=0.3)

    def outage(self) -> None:
        self.server.stop()

    def restore(self) -> None:
        self.server.start()

    def close(self) -> None:
        self.server.stop()


@pytest.fixture(params=["memory", "redis"])
def cluster(request: Any, tmp_path: Path) -> Any:
    """The same tests over the in-memory link and the Redis link."""
    if request.param == "redis" and REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; "
                    "CI installs it)")
    made = MemoryCluster(tmp_path) if request.param == "memory" else RedisCluster(tmp_path)
    yield made
    made.close()


class Recorder:
    """A LinkReceiver that records what its link does."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.ups = 0
        self.downs = 0

    def server_up(self, server: str) -> None:
        self.ups += 1

    def server_down(self, server: str, reason: str) -> None:
        self.downs += 1

    def message_received(self, message: bytes) -> None:
        self.messages.append(message)


@pytest_twisted.ensureDeferred
async def test_link_broadcast_reaches_every_node_in_order_and_targets_one(cluster):
    links = [cluster.link(f"n{i}") for i in range(3)]
    receivers = [Recorder() for _ in links]
    for link, receiver in zip(links, receivers):
        link.start(receiver)
    try:
        await eventually(lambda: all(link.linked for link in links), what="linked")
        assert all(receiver.ups == 1 for receiver in receivers)
        for number in range(50):
            assert links[0].publish(b"%d" % number)
        assert links[1].publish(b"for n2 only", to="n2")
        expected = [b"%d" % number for number in range(50)]
        await eventually(lambda: all(len(r.messages) >= 50 for r in receivers),
                         what="delivery")
        await eventually(lambda: receivers[2].messages[-1:] == [b"for n2 only"],
                         what="targeted delivery")
        assert receivers[0].messages == expected  # the sender hears itself too
        assert receivers[1].messages == expected
        assert receivers[2].messages == [*expected, b"for n2 only"]
    finally:
        for link in links:
            await link.stop()


@pytest_twisted.ensureDeferred
async def test_a_maps_channel_reaches_only_the_nodes_that_watch_it(cluster):
    links = [cluster.link(f"n{i}") for i in range(3)]
    receivers = [Recorder() for _ in links]
    for link, receiver in zip(links, receivers):
        link.start(receiver)
    try:
        await eventually(lambda: all(link.linked for link in links), what="linked")
        await links[0].watch_map("busy")
        await links[1].watch_map("busy")
        await links[2].watch_map("other")
        for number in range(20):
            assert links[2].publish_map("busy", b"busy %d" % number)
        assert links[0].publish_map("other", b"for other")
        # A request says how many it reached: the nodes that will answer.
        assert await links[2].ask_map("busy", b"busy 20") == 2
        assert await links[0].ask_map("other", b"no") == 1
        expected = [b"busy %d" % number for number in range(21)]
        await eventually(lambda: receivers[0].messages == receivers[1].messages == expected,
                         what="delivery to the watchers, in order")
        await eventually(lambda: receivers[2].messages == [b"for other", b"no"], what="other")
        links[1].unwatch_map("busy")
        links[2].publish_map("busy", b"after")
        await eventually(lambda: receivers[0].messages[-1:] == [b"after"], what="after")
        await task.deferLater(reactor, 0.1)
        assert receivers[1].messages == expected
        # After an outage the link listens to what it watched again.
        cluster.outage()
        await eventually(lambda: not links[0].linked, what="down")
        with pytest.raises(ConnectionError):
            await links[0].watch_map("late")  # remembered all the same
        cluster.restore()
        await eventually(lambda: all(link.linked for link in links), what="back")
        links[2].publish_map("busy", b"busy again")
        links[2].publish_map("late", b"late")
        await eventually(lambda: receivers[0].messages[-2:] == [b"busy again", b"late"],
                         what="watched again")
    finally:
        for link in links:
            await link.stop()


async def present_until(link: Any, predicate: Callable[[set], bool]) -> set:
    """Ask for the present nodes until the answer satisfies `predicate` (bounded)."""
    deadline = reactor.seconds() + WAIT
    while True:
        nodes = await link.present()
        if predicate(nodes) or reactor.seconds() > deadline:
            return nodes
        await task.deferLater(reactor, 0.02)


@pytest_twisted.ensureDeferred
async def test_link_presence_expires_by_itself(cluster):
    first, second = cluster.link("a"), cluster.link("b")
    first.start(Recorder())
    second.start(Recorder())
    try:
        await eventually(lambda: first.linked and second.linked, what="linked")
        first.announce(60)
        second.announce(0.5)
        assert await present_until(first, lambda nodes: nodes == {"a", "b"}) == {"a", "b"}
        # b is not refreshed: it expires by itself.
        assert await present_until(first, lambda nodes: nodes == {"a"}) == {"a"}
        first.withdraw()
        assert await present_until(second, lambda nodes: not nodes) == set()
    finally:
        await first.stop()
        await second.stop()


@pytest_twisted.ensureDeferred
async def test_link_goes_down_with_the_bus_and_comes_back(cluster):
    link = cluster.link("a")
    receiver = Recorder()
    link.start(receiver)
    try:
        await eventually(lambda: link.linked, what="linked")
        cluster.outage()
        await eventually(lambda: receiver.downs == 1, what="link down")
        assert not link.publish(b"lost")
        cluster.restore()
        await eventually(lambda: receiver.ups == 2, what="link back")
        assert link.publish(b"after")
        await eventually(lambda: receiver.messages == [b"after"], what="delivery after")
        assert receiver.downs == 1  # the loss is reported once
    finally:
        await link.stop()


@pytest_twisted.ensureDeferred
async def test_link_keeps_private_maps_with_a_cap_and_forgets_old_ones(cluster):
    first, second = cluster.link("a"), cluster.link("b")
    first.start(Recorder())
    second.start(Recorder())
    inf = float("inf")
    try:
        await eventually(lambda: first.linked and second.linked, what="linked")
        assert await first.add_map("early", 1000, cap=3, forget_before_ms=0) == "added"
        assert await second.add_map("never", inf, cap=3, forget_before_ms=0) == "added"
        assert await second.add_map("never", 5000, cap=3, forget_before_ms=0) == "taken"
        assert await first.add_map("late", 9000, cap=3, forget_before_ms=0) == "added"
        assert await first.add_map("more", 9000, cap=3, forget_before_ms=0) == "full"
        # Every node finds what any node added, with its expiry.
        assert await second.find_map("early") == 1000
        assert await first.find_map("never") == inf
        assert await first.find_map("nothing") is None
        # Maps that expired before `forget_before_ms` make room (atomically).
        assert await second.add_map("more", 9000, cap=3, forget_before_ms=2000) == "added"
        assert await first.find_map("early") is None
        # A restore adds what is missing and changes nothing that is there.
        await first.restore_maps([("early", 1000), ("late", 1), ("lost", inf)])
        assert [await first.find_map(name) for name in ("early", "late", "lost")] == [
            1000, 9000, inf]
        cluster.outage()
        await eventually(lambda: not first.linked, what="down")
        for asked in (first.add_map("x", 1, cap=9, forget_before_ms=0), first.find_map("x"),
                      first.restore_maps([("x", 1)])):
            with pytest.raises(ConnectionError):
                await asked
    finally:
        await first.stop()
        await second.stop()


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")
@pytest_twisted.ensureDeferred
async def test_redis_keeps_private_maps_in_one_bounded_key(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    link = RedisLink(server.url, "t", "a", reactor)
    link.start(Recorder())
    try:
        await eventually(lambda: link.linked, what="linked")
        for number in range(2500):
            assert await link.add_map(f"m{number}", number, cap=2000,
                                      forget_before_ms=500) in ("added", "full")
        assert server.command("DBSIZE") == "1"
        assert server.command("ZCARD", link.maps_key) == "2000"
        assert server.command("TYPE", link.maps_key) == "zset"
        # A restore of more than one command's worth.
        await link.restore_maps([(f"r{number}", float("inf")) for number in range(2500)])
        assert server.command("ZCARD", link.maps_key) == "4500"
    finally:
        await link.stop()
        server.stop()


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")
@pytest_twisted.ensureDeferred
async def test_redis_link_authenticates_and_reports_a_refusal_once(tmp_path):
    server = RedisServer(tmp_path)
    server.start("--requirepass", "s3cret")
    in_url = RedisLink(f"redis://:s3cret@127.0.0.1:{server.port}/1", "t", "a", reactor)
    given = RedisLink(server.url, "t", "b", reactor, password="s3cret")
    wrong = RedisLink(server.url, "t", "c", reactor, password="nope", max_backoff=0.2)
    links = [in_url, given, wrong]
    try:
        for link in links:
            link.start(Recorder())
        await eventually(lambda: in_url.linked and given.linked, what="authenticated")
        await eventually(lambda: wrong._refusal, what="refusal")
        await task.deferLater(reactor, 0.5)  # a few more refused attempts
        assert not wrong.linked
        assert ["WRONGPASS" in why for why in wrong._refusal.values()] == [True]
    finally:
        for link in links:
            await link.stop()
        server.stop()


def test_each_subscription_is_acknowledged_by_its_own_reply():
    """
    A SUBSCRIBE of several channels gets one reply per channel: the later
    ones must not fire the next command's Deferred (txredisapi's pairing did,
    before Redis had read that command), nor a PING's.
    """
    from twisted.internet.testing import StringTransport

    from livemap_tx.cluster.redis_server_link import _SubscriberProtocol

    clock = task.Clock()
    protocol = _SubscriberProtocol(charset=None)
    protocol.callLater = clock.callLater  # its parser resumes after a bulk string
    protocol.makeConnection(StringTransport())
    protocol.connected = 1
    pushed: list = []
    protocol.messageReceived = lambda pattern, channel, message: pushed.append(message)
    fired: dict[str, Any] = {}

    def record(what: str) -> Callable[[Any], None]:
        return lambda result: fired.setdefault(what, result)

    def later_commands(_: Any) -> None:
        # What a backplane does as the link comes up: watch a map at once.
        protocol.subscribe([b"m"]).addCallback(record("m"))
        protocol.ping().addCallback(record("ping"))
    protocol.subscribe([b"all", b"to:me"]).addCallback(later_commands)

    def reply(*items: bytes) -> None:
        protocol.dataReceived(b"*%d\r\n" % len(items) + b"".join(
            b":%s\r\n" % item if item.isdigit() else b"$%d\r\n%s\r\n" % (len(item), item)
            for item in items))
        while clock.getDelayedCalls():
            clock.advance(0)
    reply(b"subscribe", b"all", b"1")
    reply(b"subscribe", b"to:me", b"2")
    assert fired == {}
    reply(b"message", b"all", b"hi")  # pushed messages are no replies
    assert fired == {} and pushed == [b"hi"]
    reply(b"subscribe", b"m", b"3")
    assert fired == {"m": [b"subscribe", b"m", 3]}
    reply(b"pong", b"")
    assert fired["ping"] == [b"pong", b""]
    # An error is a command's only reply, whatever it named.
    failed: list = []
    protocol.subscribe([b"x", b"y"]).addErrback(failed.append)
    protocol.dataReceived(b"-NOPERM no\r\n")
    protocol.unsubscribe([b"m"]).addCallback(record("un"))
    reply(b"unsubscribe", b"m", b"2")
    assert len(failed) == 1 and fired["un"] == [b"unsubscribe", b"m", 2]


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")
@pytest_twisted.ensureDeferred
async def test_a_subscription_made_as_the_link_comes_up_is_acknowledged_by_redis(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    link = RedisLink(server.url, "t", "a", reactor)
    link.start(Recorder())
    try:
        await eventually(lambda: link.linked, what="linked")
        protocol = link.servers[0].subscriber.protocol
        acknowledged: list = []

        def then_one_more(_: Any) -> None:
            protocol.subscribe([b"d"]).addCallback(acknowledged.append)
        protocol.subscribe([b"a", b"b", b"c"]).addCallback(then_one_more)
        await eventually(lambda: acknowledged, what="acknowledged")
        assert acknowledged[0][:2] == [b"subscribe", b"d"]
        assert server.command("PUBSUB", "NUMSUB", "d") == "d\n1"
    finally:
        await link.stop()
        server.stop()


# Hubs joined by backplanes, over either link


class Nodes:
    def __init__(self, cluster: Any, node_ttl: float = 1.0) -> None:
        self.cluster = cluster
        self.node_ttl = node_ttl
        self.hubs: list[Hub] = []
        self.backplanes: list[Backplane] = []

    def add(self, name: str) -> tuple[Hub, Backplane]:
        hub = Hub(reactor, tick_interval=0.02)
        backplane = Backplane(hub, self.cluster.link(name), reactor, node_ttl=self.node_ttl,
                              reply_delay=0.01)
        backplane.startService()
        self.hubs.append(hub)
        self.backplanes.append(backplane)
        return hub, backplane

    async def close(self) -> None:
        for backplane in self.backplanes:
            if backplane.running:
                await backplane.stopService()
        for hub in self.hubs:
            for member in list(hub.members()):
                member.leave()
            for map_state in list(hub.maps.values()):
                if map_state.tick_call is not None and map_state.tick_call.active():
                    map_state.tick_call.cancel()


@pytest.fixture
def nodes(cluster):
    made = Nodes(cluster)
    yield made
    pytest_twisted.blockon(defer.Deferred.fromCoroutine(made.close()))


@pytest_twisted.ensureDeferred
async def test_pins_moves_names_and_departures_reach_the_other_nodes(nodes):
    (hub_a, plane_a), (hub_b, plane_b) = nodes.add("a"), nodes.add("b")
    await defer.gatherResults([plane_a.when_synced(), plane_b.when_synced()])
    alice = hub_a.join("m", Watcher())
    alice.hello("Alice")
    alice.move(move(1, 2, seq=1))
    bob = hub_b.join("m", Watcher())
    bob.move(move(3, 4))
    both = {alice.id: (1, 2, "Alice"), bob.id: (3, 4, None)}
    await eventually(lambda: positions(hub_a) == both == positions(hub_b), what="both pins")
    # A late client of node b gets a's pin in its welcome.
    late = Watcher()
    hub_b.join("m", late)
    assert {pin["id"] for pin in late.messages[0]["pins"]} == {alice.id, bob.id}
    alice.move(move(5, 6, seq=2))
    bob.hello("Bob")
    moved = {alice.id: (5, 6, "Alice"), bob.id: (3, 4, "Bob")}
    await eventually(lambda: positions(hub_a) == moved == positions(hub_b), what="moves")
    await eventually(lambda: any(pin["id"] == alice.id and pin["seq"] == 2
                                 for m in late.messages if m["type"] == "update"
                                 for pin in m["pins"]), what="update to the late client")
    alice.leave()
    await eventually(lambda: positions(hub_b) == {bob.id: (3, 4, "Bob")}, what="departure")
    assert any(alice.id in m["gone"] for m in late.messages if m["type"] == "update")


@pytest_twisted.ensureDeferred
async def test_a_node_that_dies_loses_its_pins_everywhere(nodes):
    (hub_a, plane_a), (hub_b, plane_b) = nodes.add("a"), nodes.add("b")
    await defer.gatherResults([plane_a.when_synced(), plane_b.when_synced()])
    hub_a.join("m", Watcher()).move(move())
    hub_a.join("other", Watcher()).move(move())
    hub_b.join("m", Watcher()).move(move())
    hub_b.join("other", Watcher())
    await eventually(lambda: len(hub_b.pins("m")) == 2 and hub_b.pins("other"), what="pins")
    await plane_a.abandon()  # no goodbye: as kill -9
    await eventually(lambda: len(hub_b.pins("m")) == 1 and not hub_b.pins("other"),
                     timeout=nodes.node_ttl * 3, what="dead node's pins gone")
    assert plane_b.stats.nodes_expired == 1


@pytest_twisted.ensureDeferred
async def test_a_stopping_node_says_goodbye(nodes):
    (hub_a, plane_a), (hub_b, plane_b) = nodes.add("a"), nodes.add("b")
    await defer.gatherResults([plane_a.when_synced(), plane_b.when_synced()])
    hub_a.join("m", Watcher()).move(move())
    hub_b.join("m", Watcher())
    await eventually(lambda: hub_b.pins("m"), what="pin")
    await plane_a.stopService()
    await eventually(lambda: not hub_b.pins("m"), what="goodbye")
    assert plane_b.stats.nodes_expired == 0  # it went at once, not by expiry


@pytest_twisted.ensureDeferred
async def test_outage_then_resync_converges_without_reconnecting(nodes):
    (hub_a, plane_a), (hub_b, plane_b) = nodes.add("a"), nodes.add("b")
    await defer.gatherResults([plane_a.when_synced(), plane_b.when_synced()])
    alice = hub_a.join("m", Watcher())
    carol = hub_a.join("m", Watcher())
    bob = hub_b.join("m", Watcher())
    alice.move(move(1, 1))
    carol.move(move(2, 2))
    bob.move(move(3, 3))
    await eventually(lambda: len(hub_a.pins("m")) == len(hub_b.pins("m")) == 3, what="pins")
    nodes.cluster.outage()
    await eventually(lambda: not plane_a.link.linked and not plane_b.link.linked, what="down")
    assert plane_a.health_problem() is not None
    # Meanwhile: moves, a departure and a newcomer, all unseen by the other node.
    alice.move(move(10, 10))
    carol.leave()
    dave = hub_a.join("m", Watcher())
    dave.move(move(4, 4))
    bob.move(move(30, 30))
    await task.deferLater(reactor, 0.1)  # their ticks pass while cut off
    assert plane_a.stats.dropped and plane_b.stats.dropped
    nodes.cluster.restore()
    truth = {alice.id: (10, 10, None), dave.id: (4, 4, None), bob.id: (30, 30, None)}
    await eventually(lambda: positions(hub_a) == truth == positions(hub_b), what="converged")
    assert plane_a.health_problem() is None and plane_b.stats.resyncs == 2


@pytest_twisted.ensureDeferred
async def test_a_third_node_joining_late_gets_everything_before_its_first_welcome(nodes):
    hub_a, plane_a = nodes.add("a")
    hub_b, plane_b = nodes.add("b")
    await defer.gatherResults([plane_a.when_synced(), plane_b.when_synced()])
    hub_a.join("m", Watcher()).move(move(1, 1))
    hub_b.join("m", Watcher()).move(move(2, 2))
    await eventually(lambda: len(hub_b.pins("m")) == 2 and len(hub_a.pins("m")) == 2,
                     what="pins")
    hub_c, plane_c = nodes.add("c")
    assert await plane_c.when_synced() == "linked"
    assert hub_c.pins("m") == []  # it serves no map yet
    assert await plane_c.watch("m") == "complete"  # what a first client's upgrade waits for
    newcomer = Watcher()
    hub_c.join("m", newcomer)
    assert len(newcomer.messages[0]["pins"]) == 2


# Deterministic details on the memory link and a fake clock


def clocked(count: int = 2, node_ttl: float = 3.0) -> tuple[task.Clock, MemoryBus,
                                                            list[Hub], list[Backplane]]:
    clock = task.Clock()
    bus = MemoryBus(clock)
    hubs, planes = [], []
    for index in range(count):
        hub = Hub(clock, tick_interval=0.1)
        plane = Backplane(hub, MemoryLink(bus, f"n{index}"), clock, node_ttl=node_ttl,
                          reply_delay=0.05)
        plane.startService()
        hubs.append(hub)
        planes.append(plane)
    clock.advance(0)
    clock.pump([0.05] * 4)
    return clock, bus, hubs, planes


def test_one_message_per_map_tick_however_many_moves():
    clock, bus, hubs, planes = clocked()
    alice = hubs[0].join("m", Watcher())
    bob = hubs[0].join("m", Watcher())
    hubs[1].join("m", Watcher())
    clock.pump([0.05] * 4)
    before = bus.published
    for number in range(100):
        alice.move(move(1, number % 90))
        bob.move(move(2, number % 90))
    clock.pump([0.01] * 30)  # three ticks' worth of time, one tick had work
    assert bus.published - before == 1
    assert positions(hubs[1])[alice.id][:2] == (1, 99 % 90)


def test_heartbeats_only_when_quiet_and_silence_expires_a_node():
    ttl = 3.0
    clock, bus, hubs, planes = clocked(node_ttl=ttl)
    sent: list[tuple[str, dict]] = []
    deliver = bus.deliver
    bus.deliver = lambda channel, message, sender: (  # type: ignore[method-assign]
        sent.append((channel, orjson.loads(message))), deliver(channel, message, sender))[1]
    member = hubs[0].join("m", Watcher())
    hubs[1].join("m", Watcher())
    for _ in range(30):  # 3 s of moves: deltas on the map's channel, beats on the cluster's
        member.move(move())
        clock.advance(0.1)
    beats = [message["n"] for _, message in sent if message["t"] == "beat"]
    assert sorted(set(beats)) == ["n0", "n1"] and len(beats) <= 2 * 5
    assert {channel for channel, message in sent if message["t"] == "delta"} == {
        "map:" + __import__("livemap_tx.cluster.links").cluster.links.map_digest("m")}
    # Something every node hears (a private map's expiry) stands in for a beat.
    sent.clear()
    for _ in range(4):
        planes[0]._publish(b'{"t":"x","n":"n0"}')
        clock.advance(ttl / 8)
    assert [message["n"] for _, message in sent if message["t"] == "beat"] in (["n1"], [])
    before = bus.published
    clock.pump([0.1] * 30)  # 3 s of quiet: a beat every ttl/4 from each node
    assert 6 <= bus.published - before <= 10
    assert hubs[1].pins("m")  # heartbeats keep the pin
    last_heard = planes[1].last_seen["n0"]
    planes[0].abandon()
    while hubs[1].pins("m"):
        clock.advance(0.05)
    assert last_heard + ttl <= clock.seconds() <= last_heard + ttl + ttl / 6 + 0.05


def test_a_node_busy_on_maps_nobody_else_serves_is_still_heard():
    """Its still pin on a shared map stays on the others, however long."""
    ttl = 3.0
    clock, bus, hubs, planes = clocked(node_ttl=ttl)
    hubs[0].join("shared", Watcher())
    still = hubs[1].join("shared", Watcher())
    still.move(move(5, 5))
    busy = hubs[1].join("only-n1", Watcher())
    clock.pump([0.1] * 5)
    assert still.id in positions(hubs[0], "shared")
    for step in range(int(4 * ttl / 0.1)):  # four TTLs of moves only n1 serves
        busy.move(move(1, step % 90))
        clock.advance(0.1)
    assert "only-n1" not in planes[0].watches
    assert still.id in positions(hubs[0], "shared")
    assert planes[0].stats.nodes_expired == 0


def test_two_nodes_that_start_serving_a_map_at_once_both_wait_for_the_third():
    """One's own state, sent as it starts, is no answer for the other: it was not asked."""
    clock, bus, hubs, planes = clocked(3)
    pinned = hubs[0].join("m", Watcher())
    pinned.move(move(5, 5))
    clock.pump([0.05] * 4)
    outcomes: dict[int, list] = {1: [], 2: []}
    for index in (1, 2):  # the second subscribes before the first published its mhello
        planes[index].watch("m").addCallback(
            lambda how, index=index: outcomes[index].append(
                (how, pinned.id in positions(hubs[index]))))
    clock.pump([0.01] * 30)
    assert outcomes == {1: [("complete", True)], 2: [("complete", True)]}


def test_a_map_is_in_sync_once_every_node_serving_it_answered_or_timed_out():
    clock = task.Clock()
    bus = MemoryBus(clock)
    hub_a = Hub(clock)
    plane_a = Backplane(hub_a, MemoryLink(bus, "a"), clock, node_ttl=6, reply_delay=0.05)
    plane_a.startService()
    clock.advance(0)
    assert plane_a.when_synced().result == "linked"
    hub_a.join("m", Watcher()).move(move())
    clock.advance(0.2)
    # A node that listens to the map but never answers (a wedged process).
    bus.subscribe("ghost", "map:" + __import__("livemap_tx.cluster.links").cluster.links.map_digest("m"))
    hub_b = Hub(clock)
    plane_b = Backplane(hub_b, MemoryLink(bus, "b"), clock, node_ttl=6, reply_delay=0.05)
    plane_b.startService()
    clock.advance(0)
    ready = plane_b.watch("m")
    clock.pump([0.05] * 6)
    assert not ready.called and hub_b.pins("m")  # a's pins are in, the ghost's never come
    clock.advance(plane_b.map_sync_timeout)
    assert ready.called
    # Without the ghost, the answers of every serving node complete the sync.
    bus.unsubscribe("ghost", "map:" + __import__("livemap_tx.cluster.links").cluster.links.map_digest("m"))
    hub_c = Hub(clock)
    plane_c = Backplane(hub_c, MemoryLink(bus, "c"), clock, node_ttl=6, reply_delay=0.05)
    plane_c.startService()
    clock.advance(0)
    ready = plane_c.watch("m")
    clock.pump([0.05] * 4)
    assert ready.called and len(hub_c.pins("m")) == 1


def test_a_node_serves_only_the_maps_it_needs_and_lets_go_of_them():
    clock, bus, hubs, planes = clocked()
    mover = hubs[0].join("busy", Watcher())
    mover.move(move())
    clock.pump([0.05] * 4)
    assert "busy" not in hubs[1].maps  # node 1 has no client there: it holds nothing
    received = planes[1].stats.received
    for number in range(20):
        mover.move(move(1, number))
        clock.advance(0.1)
    assert planes[1].stats.received - received <= 4  # heartbeats only, no deltas
    viewer = hubs[1].join("busy", Watcher())
    clock.pump([0.05] * 4)
    assert set(positions(hubs[1], "busy")) == {mover.id}
    viewer.leave()
    clock.advance(planes[1].linger + 0.1)
    assert "busy" not in planes[1].watches and "busy" not in hubs[1].maps
    # A request's lease keeps a map served a while, then lets it go too.
    planes[1].watch("busy", lease=5)
    clock.pump([0.05] * 4)
    assert hubs[1].pins("busy")
    clock.advance(5 + planes[1].linger + 0.1)
    assert "busy" not in planes[1].watches and "busy" not in hubs[1].maps


def test_nodes_with_different_redis_sets_refuse_to_serve_until_they_agree():
    clock = task.Clock()
    bus = MemoryBus(clock)
    planes = []
    for name, servers in (("a", "one"), ("b", "two"), ("c", "one")):
        plane = Backplane(Hub(clock), MemoryLink(bus, name, fingerprint=servers), clock,
                          node_ttl=2)
        plane.startService()
        planes.append(plane)
    clock.pump([0.05] * 20)  # hellos, and beats (they carry the set too)
    for plane in planes:
        assert "another set of Redis servers" in (plane.health_problem() or "")
        assert "refusing to serve" in (plane.refusal() or "")
        failed = plane.watch("m")
        assert isinstance(failed.result.value, MapUnavailable)
        failed.addErrback(lambda failure: None)
    # The odd one stops: the others agree again once its presence is gone.
    planes[1].stopService()
    clock.pump([0.05] * 100)
    for plane in (planes[0], planes[2]):
        assert plane.refusal() is None and plane.health_problem() is None
        served = plane.watch("m")
        clock.pump([0.05] * 30)
        assert served.result == "complete"


def test_a_full_state_replaces_what_a_node_held_in_chunks():
    clock, bus, hubs, planes = clocked()
    planes[0].full_chunk = 2
    members = [hubs[0].join(f"map{i % 2}", Watcher()) for i in range(5)]
    for member in members:
        member.move(move())
    hubs[1].join("map0", Watcher())
    hubs[1].join("map1", Watcher())
    clock.pump([0.05] * 5)
    assert len(hubs[1].pins("map0")) + len(hubs[1].pins("map1")) == 5
    assert len(planes[0].map_full_messages("map0")) == 2  # 3 pins, 2 a chunk
    # A ghost of n0 that n1 holds by mistake goes when n0's full state comes.
    hubs[1].apply_remote("map0", "n0", [{"id": "ghost", "version": 1, "lat": 0, "lng": 0,
                                         "heading": None, "accuracy": None, "name": None,
                                         "seq": None, "ts": 0}])
    planes[0]._send_map_full("map0", None)
    clock.pump([0.05] * 3)
    assert "ghost" not in {pin["id"] for pin in hubs[1].pins("map0")}
    assert len(hubs[1].pins("map0")) + len(hubs[1].pins("map1")) == 5


def test_a_node_heard_mid_stream_is_asked_for_its_whole_state():
    clock, bus, hubs, planes = clocked()
    first = hubs[0].join("m", Watcher())
    first.move(move())
    hubs[1].join("m", Watcher())
    clock.pump([0.05] * 4)
    # n1 forgets n0 (as after a long stall) and then hears only a delta.
    planes[1]._forget("n0", "test")
    assert not hubs[1].pins("m")
    second = hubs[0].join("m", Watcher())
    second.move(move())
    clock.pump([0.05] * 6)
    assert {first.id, second.id} == set(positions(hubs[1]))


def test_malformed_messages_are_counted_and_ignored():
    clock, bus, hubs, planes = clocked()
    hubs[1].join("m", Watcher())
    clock.pump([0.05] * 4)
    for junk in (b"not json", b"[]", b'{"t": "delta"}', b'{"t": "what", "n": "x"}',
                 b'{"t": "delta", "n": "x", "m": "m", "p": [[1]], "g": []}'):
        bus.deliver("all", junk, "x")
    bus.deliver(next(c for c in bus.channels if c.startswith("map:")),
                b'{"t": "delta", "n": "x", "m": "m", "p": [[1]], "g": []}', "x")
    clock.advance(0)
    assert planes[1].stats.bad_messages == 6
    hubs[0].join("m", Watcher()).move(move())
    clock.pump([0.05] * 4)
    assert hubs[1].pins("m")


def test_health_and_metrics_say_when_the_link_is_down():
    from livemap_tx.cluster.backplane import BackplaneCollector
    clock, bus, hubs, planes = clocked()
    collected = {m.name: m.samples[0].value for m in BackplaneCollector(planes[0]).collect()}
    assert collected["livemap_backplane_connected"] == 1
    assert collected["livemap_backplane_resyncs"] == 1
    assert planes[0].health_problem() is None
    bus.stop()
    clock.advance(5)
    assert "cut off from memory for 5 s" in planes[0].health_problem()
    hubs[0].join("m", Watcher()).move(move())
    clock.advance(0.2)
    collected = {m.name: m.samples[0].value for m in BackplaneCollector(planes[0]).collect()}
    assert collected["livemap_backplane_connected"] == 0
    assert collected["livemap_backplane_messages_dropped"] >= 1


# The web face with a backplane: /healthz degraded, still 200; /metrics


@pytest_twisted.ensureDeferred
async def test_healthz_is_degraded_but_200_and_metrics_show_the_link(tmp_path):
    from livemap_tx.service import make_node
    from livemap_tx.http_site import make_site
    # A Redis URL nobody answers: the node serves, degraded.
    node = make_node(reactor, server_options("--redis", "redis://127.0.0.1:1/0"))
    assert node.backplane is not None
    node.backplane.startService()
    listener = reactor.listenTCP(0, make_site(node.site.resource(), reactor),
                                 interface="127.0.0.1")
    url = f"http://127.0.0.1:{listener.getHost().port}"
    try:
        response = await treq.get(f"{url}/healthz")
        body = await response.text()
        assert response.code == 200
        assert body.startswith("degraded\nredis: connecting to redis://127.0.0.1:1/0")
        metrics = await (await treq.get(f"{url}/metrics")).text()
        assert "livemap_backplane_connected 0.0" in metrics
        assert "livemap_backplane_messages_published_total" in metrics
    finally:
        await node.backplane.stopService()
        await listener.stopListening()


# Options and URLs


def test_redis_urls():
    address = parse_redis_url("rediss://user:p%40ss@redis.example:6380/3")
    assert (address.host, address.port, address.db, address.tls) == ("redis.example", 6380, 3, True)
    assert (address.username, address.password) == ("user", "p@ss")
    assert str(address) == "rediss://***@redis.example:6380/3"  # no secrets in logs
    plain = parse_redis_url("redis://:secret@10.0.0.5")
    assert (plain.port, plain.db, plain.username, plain.password) == (6379, 0, None, "secret")
    for bad in ("http://x", "redis://", "redis://h:port/0", "redis://h/db"):
        with pytest.raises(ValueError):
            parse_redis_url(bad)


def test_sentinel_urls():
    [address] = parse_redis_urls("sentinel://:p%40ss@s1:26380,S2/mymaster/2")
    assert address.sentinels == (("s1", 26380), ("s2", 26379))
    assert (address.master, address.db, address.password) == ("mymaster", 2, "p@ss")
    assert str(address) == "sentinel://***@s1:26380,s2:26379/mymaster/2"  # no secrets
    # The same sentinels in another order, in another case: the same place.
    [again] = parse_redis_urls("sentinel://s2:26379,s1:26380/mymaster/2")
    assert again.place == address.place
    for bad in ("sentinel://s1", "sentinel://s1/", "sentinel://s1,s1/m", "sentinel://s1:x/m",
                "sentinel://s1/m/x", "sentinel://,/m"):
        with pytest.raises(ValueError):
            parse_redis_urls(bad)


@pytest.mark.parametrize("args, named", [
    (["--redis", "http://x"], "--redis"),
    (["--workers", "2"], "--workers"),
    (["--workers", "0"], "--workers"),
    (["--workers", "two"], "--workers"),
    (["--workers", "2", "--redis", "redis://h", "--port", "unix:/tmp/livemap.sock"], "--workers"),
    (["--cluster", "a b"], "--cluster"),
    (["--node-ttl", "0"], "--node-ttl"),
])
def test_cluster_options_are_checked(args, named):
    with pytest.raises(usage.UsageError, match=named):
        Options().parseOptions(args)


def test_without_redis_nothing_changes():
    options = Options()
    options.parseOptions([])
    assert (options["redis"], options["cluster"], options["workers"]) == (None, "livemap", 1)
    from livemap_tx.service import make_node
    node = make_node(reactor, server_options())
    assert node.backplane is None and node.hub.publisher is None
    assert node.site.health_checks == {}


def test_a_node_heard_again_after_it_was_dropped_is_asked_for_every_map_it_serves():
    """A long stall: the others dropped its pins; its next heartbeat brings them back."""
    clock, bus, hubs, planes = clocked()
    sitter = hubs[0].join("b", Watcher())
    sitter.move(move(3, 4))
    hubs[1].join("b", Watcher())
    clock.pump([0.05] * 4)
    assert set(positions(hubs[1], "b")) == {sitter.id}
    planes[1]._forget("n0", "test")  # as after n0 was silent for the node TTL
    assert positions(hubs[1], "b") == {}
    clock.pump([0.1] * 12)  # n0 sits still: no delta, only heartbeats
    assert set(positions(hubs[1], "b")) == {sitter.id}


# Order-proof joins (issue 21, items 3 and 4): the store's answer to a node
# that starts serving a map may come after the devices' messages that
# followed it (the store may be on a slower server than the map's channel).
# The orderings are made on purpose here: the load's answer is held back.


def device_nodes() -> tuple[task.Clock, list[Hub], list[Backplane], list[Devices]]:
    clock, bus, hubs, planes = clocked()
    devices = []
    for hub, plane in zip(hubs, planes):
        # The clock starts at 0: a fix's time must be within --expire of now.
        made = Devices(hub, MapDirectory(clock), clock, rate=100.0, expire=1e12)
        plane.share_devices(made)
        devices.append(made)
    clock.pump([0.05] * 4)
    return clock, hubs, planes, devices


def settle(clock: task.Clock, deferred: Any) -> Any:
    """Runs a coroutine (or Deferred) on the clock until it is done."""
    if not isinstance(deferred, defer.Deferred):
        deferred = defer.Deferred.fromCoroutine(deferred)
    for _ in range(200):
        if deferred.called:
            break
        clock.advance(0.01)
    results: list = []
    deferred.addBoth(results.append)
    assert results, "never done"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def hold_loads(plane: Backplane) -> list[defer.Deferred]:
    """The store's answers to `plane`'s loads of a map's devices, held until released."""
    held: list[defer.Deferred] = []
    load = plane.device_keys.load_fixes

    def held_load(map_name: str, now_ms: float) -> defer.Deferred:
        answer: defer.Deferred = defer.Deferred()
        # The store reads now; its answer arrives when the test says.
        defer.ensureDeferred(load(map_name, now_ms)).addCallback(lambda values: held.append(
            defer.Deferred().addCallback(lambda _: answer.callback(values))))
        return answer
    plane.device_keys.load_fixes = held_load
    return held


def release(clock: task.Clock, held: list[defer.Deferred]) -> None:
    for _ in range(50):
        if held:
            break
        clock.advance(0.01)
    assert held, "no load was made"
    held.pop(0).callback(None)
    clock.pump([0.05] * 10)


def device_positions(hub: Hub) -> dict[str, float]:
    map_state = hub.maps.get("m")
    return {} if map_state is None else {
        pin.id: pin.lat for pin in map_state.pins.values() if pin.origin == DEVICES}


def report_fix(clock: task.Clock, devices: Devices, device: Any, lat: float) -> None:
    fix = Fix(lat, 13.4, int(clock.seconds() * 1000), "owntracks")
    assert settle(clock, devices.report(device, fix)) == "moved"


def test_a_deletion_that_overtakes_the_stores_answer_leaves_no_ghost():
    clock, hubs, planes, devices = device_nodes()
    viewer = hubs[0].join("m", Watcher())
    token, device = settle(clock, devices[0].create("m", "Ada", "10.0.0.1"))
    report_fix(clock, devices[0], device, 1.0)
    clock.pump([0.05] * 4)
    assert device_positions(hubs[0]) == {device.id: 1.0}
    held = hold_loads(planes[1])
    joined = planes[1].watch("m")
    clock.pump([0.05] * 2)  # node 1 listens, and the store has read its fixes
    assert not joined.called
    settle(clock, devices[0].delete(token))
    clock.pump([0.05] * 4)  # the deletion reaches node 1 before the store's answer
    release(clock, held)
    assert joined.called
    assert device_positions(hubs[1]) == {} and device_positions(hubs[0]) == {}
    viewer.leave()


def test_fixes_that_arrive_while_the_store_answers_are_not_lost():
    clock, hubs, planes, devices = device_nodes()
    viewer = hubs[0].join("m", Watcher())
    _, old = settle(clock, devices[0].create("m", "Old", "10.0.0.1"))
    report_fix(clock, devices[0], old, 1.0)
    _, new = settle(clock, devices[0].create("m", "New", "10.0.0.2"))
    held = hold_loads(planes[1])
    joined = planes[1].watch("m")
    clock.pump([0.05] * 2)  # the store has read: only the old device's first fix
    clock.advance(1)
    report_fix(clock, devices[0], old, 2.0)  # moved during the load
    report_fix(clock, devices[0], new, 3.0)  # a first fix during the load
    clock.pump([0.05] * 4)
    release(clock, held)
    assert joined.called
    assert device_positions(hubs[1]) == {old.id: 2.0, new.id: 3.0} == device_positions(hubs[0])
    viewer.leave()


@pytest_twisted.ensureDeferred
async def test_a_message_to_a_node_about_a_map_goes_through_the_maps_server(tmp_path):
    """
    So that it keeps its order with the map's deltas: an answer to a node's
    request for a map's pins (`mfull`) must not overtake, nor be overtaken
    by, the sender's deltas of that map (issue 21, item 3: through the home
    it came after a departure that followed it, and the pin stayed).
    """
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    servers = []
    for index in range(2):
        directory = tmp_path / f"r{index}"
        directory.mkdir()
        server = RedisServer(directory)
        server.start()
        servers.append(server)
    urls = ",".join(server.url for server in servers)
    links = [RedisLink(urls, "test", name, reactor, max_backoff=0.3, keepalive=0.3)
             for name in ("a", "b")]
    receivers = [Recorder(), Recorder()]
    try:
        for link, receiver in zip(links, receivers):
            link.start(receiver)
        await eventually(lambda: all(receiver.ups == 2 for receiver in receivers), what="up")
        sender = links[0]
        home = sender.home
        other = next(server for server in sender.servers if server is not home)
        names = [f"m{n}" for n in range(50)]
        on_other = next(name for name in names if sender.server_of(name) is other)
        on_home = next(name for name in names if sender.server_of(name) is home)
        # The home goes away: only what travels through the other server arrives.
        next(server for server in servers if server.port == home.address.port).stop()
        await eventually(lambda: receivers[1].downs == 1, what="home down")
        await eventually(lambda: home not in sender.up, what="home down for the sender")
        assert sender.publish(b"about-other", "b", on_other)
        assert not sender.publish(b"about-home", "b", on_home)
        await eventually(lambda: receivers[1].messages == [b"about-other"], what="delivery")
    finally:
        for link in links:
            await link.stop()
        for server in servers:
            server.stop()


class TwoServerBus(MemoryBus):
    """
    Two Redis servers in memory, deliveries in the test's hands: each
    (sender, receiver, server) is a FIFO, and map "b" is on the second
    server; the cluster's channel (and a message to one node about no map)
    is on the home.
    """

    def __init__(self, clock: task.Clock) -> None:
        super().__init__(clock)
        self.queues: dict[tuple[str, str, str], list[bytes]] = {}

    def deliver(self, channel: str, message: bytes, sender: str) -> None:
        self.deliver_via("maps" if channel == links_map_channel("b") else "home", channel,
                         message, sender)

    def deliver_via(self, server: str, channel: str, message: bytes, sender: str) -> None:
        for node in sorted(self.channels.get(channel, ())):
            if node in self.links and self.links[node].linked:
                self.queues.setdefault((sender, node, server), []).append(message)

    def flush(self, sender: str, receiver: str, server: str) -> None:
        queue = self.queues.pop((sender, receiver, server), [])
        link = self.links[receiver]
        for message in queue:
            assert link.receiver is not None
            link.receiver.message_received(message)

    def flush_all(self) -> None:
        while any(self.queues.values()):
            for key in sorted(self.queues):
                self.flush(*key)


class TwoServerLink(MemoryLink):
    bus: TwoServerBus

    def publish(self, message: bytes, to: Optional[str] = None,
                map_name: Optional[str] = None) -> bool:
        if not self.linked:
            return False
        if to is None:
            self.bus.deliver_via("home", "all", message, self.node)
        else:
            server = "maps" if map_name == "b" else "home"
            self.bus.deliver_via(server, f"to:{to}", message, self.node)
        return True


def test_an_answer_to_a_node_new_to_a_map_never_comes_after_a_departure_that_follows_it():
    """
    Issue 21, item 3, made on purpose: node j serves map "b" (on the second
    server) when a new node o starts serving it too. j first hears o on the
    map's channel, so it asks o for its pins; o answers after its client
    joined, and the client leaves. Everything through the map's server is
    delivered before anything through the home: the answer must not bring
    the departed pin back (through the home, it did, for good).
    """
    clock = task.Clock()
    bus = TwoServerBus(clock)
    hubs: dict[str, Hub] = {}
    planes: dict[str, Backplane] = {}

    def start(name: str) -> None:
        hubs[name] = Hub(clock, tick_interval=0.1)
        planes[name] = Backplane(hubs[name], TwoServerLink(bus, name), clock, node_ttl=3.0,
                                 reply_delay=0.05)
        planes[name].startService()
        clock.advance(0)

    start("j")
    viewer = hubs["j"].join("b", Watcher())
    viewer.move(move(5.0, 5.0))
    for _ in range(5):
        bus.flush_all()
        clock.advance(0.1)
    start("o")  # its hello waits in the home's queue
    leaving = hubs["o"].join("b", Watcher())
    clock.advance(0)
    bus.flush("o", "j", "maps")  # j hears o first here (its full state), and asks it
    bus.flush("j", "o", "home")  # o gets the ask...
    leaving.move(move(1.0, 1.0))
    clock.advance(0.1)  # ...and answers, now with its client's pin, which then leaves
    leaving.leave()
    clock.advance(0.2)
    bus.flush("o", "j", "maps")
    bus.flush("j", "o", "maps")
    bus.flush("o", "j", "maps")
    for _ in range(10):  # then everything, through both servers
        bus.flush_all()
        clock.advance(0.1)
    assert set(positions(hubs["j"], "b")) == {viewer.id}
    assert set(positions(hubs["o"], "b")) == {viewer.id}
    viewer.leave()


def test_too_many_devices_messages_during_a_load_make_the_map_load_again(monkeypatch):
    """The devices' messages held during a load are bounded: beyond, load again."""
    monkeypatch.setattr(map_watching, "MAX_HELD_DEVICE_MESSAGES", 2)
    clock, hubs, planes, devices = device_nodes()
    viewer = hubs[0].join("m", Watcher())
    made = [settle(clock, devices[0].create("m", f"D{n}", f"10.0.0.{n}"))[1] for n in range(3)]
    held = hold_loads(planes[1])
    joined = planes[1].watch("m")
    clock.pump([0.05] * 2)  # the store has read: no fix yet
    for number, device in enumerate(made):
        report_fix(clock, devices[0], device, 1.0 + number)
    clock.pump([0.05] * 4)
    release(clock, held)  # three messages held at most two: a second load
    assert not joined.called
    release(clock, held)
    assert joined.called
    assert device_positions(hubs[1]) == {d.id: 1.0 + n for n, d in enumerate(made)}
    viewer.leave()
