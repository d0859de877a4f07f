"""Private maps: unguessable names, expiry, and which names exist."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor, task
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.python.failure import Failure

from conftest import server_options
from livemap_tx.cluster.backplane import Backplane, MemoryBus, MemoryLink
from livemap_tx.hub import Hub
from livemap_tx.maps import (
    MIN_TTL,
    PRIVATE_NAME_LENGTH,
    TOMBSTONE,
    DirectoryFull,
    DirectoryUnavailable,
    MapDirectory,
    parse_ttl,
)
from livemap_tx.service import Options, make_node
from livemap_tx.http_site import make_site
from wsclient import connect


def test_private_names_are_unguessable_and_well_formed():
    directory = MapDirectory(Clock())
    names = {directory.create().name for _ in range(200)}
    assert len(names) == 200
    for name in names:
        assert len(name) == 24 and directory.exists(name)


@pytest.mark.parametrize("open_maps, public, name, exists", [
    (True, True, "anything", True), (True, True, "public", True),
    (False, True, "anything", False), (False, True, "public", True),
    (False, False, "public", False), (True, False, "public", False),
    (True, True, "bad.name", False),
])
def test_which_names_exist(open_maps, public, name, exists):
    assert MapDirectory(Clock(), open_maps=open_maps, public=public).exists(name) is exists


def test_private_map_expires_and_reports_it():
    clock = Clock()
    expired = []
    directory = MapDirectory(clock, open_maps=False, on_expire=expired.append)
    entry = directory.create(ttl=900)
    forever = directory.create()
    clock.advance(899)
    assert directory.exists(entry.name) and expired == []
    clock.advance(1)
    assert not directory.exists(entry.name) and expired == [entry.name]
    assert directory.exists(forever.name)
    directory.open_maps = True  # an expired link stays dead even on open maps
    assert not directory.exists(entry.name)
    clock.advance(3 * 24 * 3600)
    assert entry.name not in directory.private  # the tombstone is bounded in time


def test_a_map_past_its_expiry_is_refused_before_its_timer_runs():
    """A busy reactor runs the expiry late; the map is gone from its time on."""
    clock = Clock()
    expired: list = []
    directory = MapDirectory(clock, open_maps=True, on_expire=expired.append)
    entry = directory.create(ttl=900)
    clock.rightNow += 900  # the time, without running what is due
    assert expired == []  # its clients are not closed yet...
    assert not directory.exists(entry.name) and directory.is_expired(entry.name)
    assert directory.resolve(entry.name).result is False  # ...but nobody new gets in
    clock.advance(0)
    assert expired == [entry.name]


def test_directory_is_bounded():
    directory = MapDirectory(Clock(), max_private=2)
    directory.create()
    directory.create()
    with pytest.raises(DirectoryFull):
        directory.create()


@pytest.mark.parametrize("raw, ttl", [(None, None), ("never", None), ("900", 900.0),
                                      ("259200", 259200.0)])
def test_parse_ttl(raw, ttl):
    assert parse_ttl(raw) == ttl


@pytest.mark.parametrize("raw", ["899", "259201", "soon", "nan", "-5"])
def test_parse_ttl_rejects(raw):
    with pytest.raises(ValueError):
        parse_ttl(raw)


@pytest_twisted.ensureDeferred
async def test_create_a_private_map_through_the_api(server):
    server.site.directory.open_maps = False
    response = await treq.post(server.url + "/api/maps?ttl=3600")
    assert response.code == 201
    body = json.loads(await response.content())
    name = body["map"]
    assert body["path"] == f"/m/{name}" and body["url"].endswith(body["path"])
    assert body["expires"] > 0
    assert response.headers.getRawHeaders("location") == [body["path"]]
    assert (await treq.get(server.url + body["path"])).code == 200
    client = await connect(server.ws_url(name))
    assert (await client.next())["type"] == "welcome"
    client.close()
    await client.wait_closed()
    # Closed maps: other names are 404 and refused upgrades.
    assert (await treq.get(server.url + "/m/guessed")).code == 404
    with pytest.raises(Exception):
        await connect(server.ws_url("guessed"))
    assert (await treq.get(server.url + "/sockjs/guessed/info")).code == 404


@pytest.mark.parametrize("query", ["?ttl=10", "?ttl=forever", "?ttl=999999999"])
@pytest_twisted.ensureDeferred
async def test_bad_ttl_is_400(server, query):
    response = await treq.post(server.url + "/api/maps" + query)
    assert response.code == 400
    assert json.loads(await response.content())["error"] == "bad_ttl"


@pytest_twisted.ensureDeferred
async def test_expired_map_closes_its_clients_and_refuses_new_ones(server):
    directory = server.site.directory
    directory.on_expire = lambda name: server.hub.close_map(name, 1008, "map expired")
    entry = directory.create(ttl=3600)
    client = await connect(server.ws_url(entry.name))
    await client.next("welcome")
    entry.call.reset(0)  # fast-forward the expiry
    code, reason = await client.wait_closed()
    assert (code, reason) == (1008, "map expired")
    with pytest.raises(Exception):
        await connect(server.ws_url(entry.name))


# A cluster: directories sharing their private maps through backplanes on
# the in-memory link, with a fake clock


class Cluster:
    """Nodes (hub, backplane, directory) on one MemoryBus and one Clock."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.bus = MemoryBus(self.clock)
        self.nodes: list[SimpleNamespace] = []

    def add(self, *, open_maps: bool = False, max_private: int = 100,
            **kwargs) -> SimpleNamespace:
        hub = Hub(self.clock)
        plane = Backplane(hub, MemoryLink(self.bus, f"n{len(self.nodes)}"), self.clock,
                          node_ttl=6, reply_delay=0.05)
        expired: list[str] = []
        directory = MapDirectory(self.clock, open_maps=open_maps, max_private=max_private,
                                 on_expire=expired.append, **kwargs)
        plane.share_maps(directory)
        plane.startService()
        node = SimpleNamespace(hub=hub, plane=plane, directory=directory, expired=expired)
        self.nodes.append(node)
        self.settle()
        return node

    def settle(self) -> None:
        self.clock.advance(0)
        self.clock.pump([0.05] * 4)

    def outcome(self, deferred: defer.Deferred) -> object:
        """What `deferred` fired with once the clock moved on (a Failure's exception)."""
        results: list = []
        deferred.addBoth(results.append)
        self.settle()
        assert results, "the deferred never fired"
        result = results[0]
        return result.value if isinstance(result, Failure) else result


def private_name(seed: str) -> str:
    return (seed * PRIVATE_NAME_LENGTH)[:PRIVATE_NAME_LENGTH]


def test_a_private_map_is_in_the_store_before_its_creation_is_answered():
    cluster = Cluster()
    maker, other = cluster.add(), cluster.add()
    asked_at_once: list = []

    def answered(entry):
        # The API answers now: another node that has not heard of the map
        # yet finds it in the store.
        assert entry.name not in other.directory.private
        asked_at_once.append(other.directory.resolve(entry.name))
        return entry
    entry = cluster.outcome(maker.directory.create_private(900).addCallback(answered))
    assert cluster.bus.maps == {entry.name: round(entry.expires * 1000)}
    assert cluster.outcome(asked_at_once[0]) is True
    # And the others heard of it at once too (the `map` message).
    late = cluster.add()
    assert other.directory.exists(entry.name)
    assert not late.directory.exists(entry.name)  # it looks it up instead
    assert cluster.outcome(late.directory.resolve(entry.name)) is True
    assert late.directory.private[entry.name].expires == entry.expires


def test_a_private_map_expires_on_every_node_at_its_time_and_stays_refused():
    cluster = Cluster()
    maker, heard = cluster.add(), cluster.add()
    entry = cluster.outcome(maker.directory.create_private(900))
    forever = cluster.outcome(maker.directory.create_private(None))
    looked_up = cluster.add()
    assert cluster.outcome(looked_up.directory.resolve(entry.name)) is True
    cluster.clock.advance(entry.expires - cluster.clock.seconds() - 0.01)
    assert [node.expired for node in cluster.nodes] == [[], [], []]
    cluster.clock.advance(0.01)
    assert [node.expired for node in cluster.nodes] == [[entry.name]] * 3
    for node in cluster.nodes:
        assert cluster.outcome(node.directory.resolve(entry.name)) is False
        assert cluster.outcome(node.directory.resolve(forever.name)) is True
    # A node that never knew it, with open maps: the store's tombstone
    # refuses it, while any other name is an open map.
    newcomer = cluster.add(open_maps=True)
    assert cluster.outcome(newcomer.directory.resolve(entry.name)) is False
    assert cluster.outcome(newcomer.directory.resolve(private_name("x"))) is True
    assert newcomer.expired == []  # it had nothing to close


def test_a_private_map_outlives_the_node_that_made_it():
    cluster = Cluster()
    maker, other = cluster.add(), cluster.add()
    entry = cluster.outcome(maker.directory.create_private(900))
    maker.plane.abandon()  # as kill -9: no goodbye
    cluster.clock.pump([1.0] * 10)
    assert cluster.outcome(other.directory.resolve(entry.name)) is True
    newcomer = cluster.add()
    assert cluster.outcome(newcomer.directory.resolve(entry.name)) is True
    cluster.clock.advance(900)
    assert other.expired == newcomer.expired == [entry.name]


def test_the_cap_on_private_maps_holds_across_the_cluster():
    cluster = Cluster()
    first, second = cluster.add(max_private=2), cluster.add(max_private=2)
    short = cluster.outcome(first.directory.create_private(900))
    cluster.outcome(second.directory.create_private(None))
    for node in (first, second):
        full = cluster.outcome(node.directory.create_private(900))
        assert isinstance(full, DirectoryFull)
    assert len(cluster.bus.maps) == 2
    # An expired map still counts while its name is refused (as on one node),
    # and makes room once its tombstone is over.
    cluster.clock.advance(900)
    assert isinstance(cluster.outcome(first.directory.create_private(900)), DirectoryFull)
    cluster.clock.advance(TOMBSTONE)
    made = cluster.outcome(second.directory.create_private(900))
    assert made.name in cluster.bus.maps and short.name not in cluster.bus.maps
    assert len(cluster.bus.maps) == 2


def test_while_redis_is_away_known_maps_are_served_and_creation_is_refused():
    cluster = Cluster()
    maker, other = cluster.add(), cluster.add()
    entry = cluster.outcome(maker.directory.create_private(900))
    cluster.bus.stop()  # like a Redis restart without persistence
    cluster.settle()
    assert isinstance(cluster.outcome(maker.directory.create_private(900)),
                      DirectoryUnavailable)
    for node in (maker, other):
        assert cluster.outcome(node.directory.resolve(entry.name)) is True
        # A name that may be a private map it does not know: it cannot tell.
        assert isinstance(cluster.outcome(node.directory.resolve(private_name("y"))),
                          DirectoryUnavailable)
        # Other names never need the store.
        assert cluster.outcome(node.directory.resolve("public")) is True
        assert cluster.outcome(node.directory.resolve("short")) is False
    cluster.clock.advance(900)  # expiry needs no Redis
    assert maker.expired == other.expired == [entry.name]
    # Redis is back, empty: the nodes write back what they know.
    cluster.bus.start()
    cluster.settle()
    assert entry.name in cluster.bus.maps
    newcomer = cluster.add(open_maps=True)
    assert cluster.outcome(newcomer.directory.resolve(entry.name)) is False  # still dead


def test_lookups_of_one_name_are_shared_bounded_and_cancellable():
    cluster = Cluster()
    maker, other = cluster.add(), cluster.add(max_lookups=2)
    entry = cluster.outcome(maker.directory.create_private(900))
    other.directory.private.clear()  # as if it never heard of it
    asked: list[str] = []
    find_map = other.plane.find_map
    other.plane.find_map = lambda name: (asked.append(name), find_map(name))[1]
    waiters = [other.directory.resolve(entry.name) for _ in range(3)]
    waiters[0].cancel()  # its client left: the others still get the answer
    second = other.directory.resolve(private_name("a"))
    refused = other.directory.resolve(private_name("b"))  # a third name at once
    assert isinstance(cluster.outcome(refused), DirectoryUnavailable)
    assert [cluster.outcome(w) for w in waiters[1:]] == [True, True]
    assert cluster.outcome(second) is False
    assert asked == [entry.name, private_name("a")]
    assert other.directory._lookups == {}


def test_a_nodes_view_of_the_cluster_is_bounded_but_keeps_maps_in_use():
    cluster = Cluster()
    in_use: set[str] = set()
    maker = cluster.add(max_private=100)
    viewer = cluster.add(max_private=3, in_use=in_use.__contains__)
    names = []
    for _ in range(5):
        names.append(cluster.outcome(maker.directory.create_private(900)).name)
        if len(names) == 1:
            in_use.add(names[0])  # a client of this node is on the first map
    assert set(viewer.directory.private) == {names[0], names[3], names[4]}
    # A forgotten map is looked up again, and expires on time.
    assert cluster.outcome(viewer.directory.resolve(names[1])) is True
    assert len(viewer.directory.private) == 3 and names[0] in viewer.directory.private
    assert set(viewer.directory.private) == {names[0], names[4], names[1]}
    cluster.clock.advance(900)
    assert sorted(viewer.expired) == sorted([names[0], names[1], names[4]])


def test_a_taken_name_is_drawn_again_three_times_at_most(monkeypatch):
    cluster = Cluster()
    node = cluster.add()
    names = iter([private_name("t"), private_name("t"), private_name("u")])
    monkeypatch.setattr("livemap_tx.maps.secrets.token_urlsafe", lambda size: next(names))
    assert cluster.outcome(node.directory.create_private(900)).name == private_name("t")
    assert cluster.outcome(node.directory.create_private(900)).name == private_name("u")
    monkeypatch.setattr("livemap_tx.maps.secrets.token_urlsafe", lambda size: private_name("t"))
    assert isinstance(cluster.outcome(node.directory.create_private(900)),
                      DirectoryUnavailable)
    assert len(cluster.bus.maps) == 2


def test_a_malformed_map_message_is_ignored():
    cluster = Cluster()
    first, second = cluster.add(), cluster.add()
    for junk in (b'{"t":"map","n":"x","m":5,"x":null}',
                 b'{"t":"map","n":"x","m":"%s","x":"soon"}' % private_name("c").encode(),
                 b'{"t":"map","n":"x"}'):
        cluster.bus.deliver("all", junk, "x")
    # Well formed, but not a private map's name: never a map of the directory.
    cluster.bus.deliver("all", b'{"t":"map","n":"x","m":"public","x":null}', "x")
    cluster.settle()
    assert second.plane.stats.bad_messages == 3
    assert second.directory.private == {}


def test_min_ttl_option_defaults_to_15_minutes():
    options = Options()
    options.parseOptions([])
    assert options["min-ttl"] == MIN_TTL == 900
    assert parse_ttl("1", minimum=0.5) == 1.0
    with pytest.raises(ValueError, match="from 900"):
        parse_ttl("899")
    for bad in ("0", "-1", "soon", str(4 * 24 * 3600)):
        with pytest.raises(usage.UsageError, match="--min-ttl"):
            Options().parseOptions(["--min-ttl", bad])
    node = make_node(reactor, server_options("--min-ttl", "2"))
    assert node.directory.min_ttl == 2.0


# The web face of a cluster: two in-process nodes on a MemoryBus


@pytest_twisted.ensureDeferred
async def test_every_node_serves_a_private_map_made_on_another():
    bus = MemoryBus(reactor)
    nodes, listeners, planes = [], [], []

    def start(name: str):
        node = make_node(reactor, server_options("--no-open-maps"))
        plane = Backplane(node.hub, MemoryLink(bus, name), reactor, node_ttl=6)
        plane.share_maps(node.directory)
        plane.startService()
        listener = reactor.listenTCP(0, make_site(node.site.resource(), reactor),
                                     interface="127.0.0.1")
        nodes.append(node)
        planes.append(plane)
        listeners.append(listener)
        return f"127.0.0.1:{listener.getHost().port}"

    clients = []
    try:
        first = start("a")
        await plane_linked(planes[0])
        response = await treq.post(f"http://{first}/api/maps?ttl=900")
        assert response.code == 201
        name = json.loads(await response.content())["map"]
        # A node that started later never heard of it: it asks the store,
        # and the WebSocket upgrade waits for the answer.
        late = start("b")
        await plane_linked(planes[1])
        assert name not in nodes[1].directory.private
        clients.append(await connect(f"ws://{late}/ws/{name}"))
        assert (await clients[-1].next())["type"] == "welcome"
        assert name in nodes[1].directory.private
        assert (await treq.get(f"http://{late}/m/{name}")).code == 200
        pins = await treq.get(f"http://{late}/api/maps/{name}/pins")
        assert json.loads(await pins.content()) == {"pins": []}
        assert (await treq.get(f"http://{late}/m/{private_name('z')}")).code == 404
        with pytest.raises(Exception):
            await connect(f"ws://{late}/ws/{private_name('z')}")
        # Redis away: a known map is served, an unknown one is a 503, and so
        # is a creation (with the reason, for the page to show).
        bus.stop()
        assert (await treq.get(f"http://{late}/m/{name}")).code == 200
        assert (await treq.get(f"http://{late}/m/{private_name('z')}")).code == 503
        response = await treq.post(f"http://{first}/api/maps?ttl=900")
        assert response.code == 503
        body = json.loads(await response.content())
        assert body["error"] == "unavailable" and "Redis" in body["message"]
    finally:
        for client in clients:
            client.close()
            await client.wait_closed()
        for plane in planes:
            await plane.stopService()
        for node in nodes:
            node.directory.stop()
        for listener in listeners:
            await listener.stopListening()


async def plane_linked(plane: Backplane) -> None:
    for _ in range(200):
        if plane.link.linked:
            return
        await task.deferLater(reactor, 0.01)
    raise AssertionError("never linked")
