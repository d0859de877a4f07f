"""
One map across real processes: `twistd -n livemap --redis ...` nodes on a
private redis-server, WebSocket clients on different nodes, a node killed
with -9, Redis stopped and started again, `--workers 2` sharing a port
(SockJS sessions included), and private maps with closed maps: made on one
node, open on every node, outliving their maker, expiring everywhere.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import orjson
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor, task
from twisted.web.client import HTTPConnectionPool

from conftest import TwistdServer, eventually, start_twistd
from livemap_tx.workers import SessionRouter, WorkerSpec, session_owner
from redis_server import RedisServer, needs_redis
from liveclients import MapView, open_view, sockjs_session
from wsclient import connect

WAIT = 10.0
# Short, so a dead node is noticed in about two seconds; not so short that a
# busy test machine makes live nodes look dead.
NODE_TTL = "2"




@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def cluster(tmp_path: Path, redis: RedisServer) -> Iterator[Callable[..., TwistdServer]]:
    """Start livemap nodes linked through the private Redis; all stopped at the end."""
    started: list[TwistdServer] = []

    def start(*extra: str) -> TwistdServer:
        node = start_twistd(tmp_path, "--pirate", "none", "--redis", redis.url,
                            "--node-ttl", NODE_TTL, *extra)
        started.append(node)
        return node
    yield start
    for node in started:
        node.stop()


async def close_all(*views: MapView) -> None:
    for view in views:
        view.client.close()
    for view in views:
        await view.client.wait_closed()


@needs_redis
@pytest_twisted.ensureDeferred
async def test_clients_of_two_nodes_see_each_others_pins_moves_names_and_departures(cluster):
    first, second = cluster(), cluster()
    alice = await open_view(first.ws_url())
    bob = await open_view(second.ws_url())
    alice.hello("Alice")
    alice.move(10, 20)
    bob.move(30, 40)
    both = {alice.id: (10, 20, "Alice"), bob.id: (30, 40, None)}
    await alice.until(lambda pins: pins == both)
    await bob.until(lambda pins: pins == both)
    # A newcomer on either node is welcomed with both pins at once.
    late = MapView(await connect(second.ws_url()))
    await late.until(lambda pins: True)
    assert late.pins == both
    alice.move(11, 21)
    bob.hello("Bob")
    moved = {alice.id: (11, 21, "Alice"), bob.id: (30, 40, "Bob")}
    for view in (alice, bob, late):
        await view.until(lambda pins: pins == moved)
    alice.client.close()
    await alice.client.wait_closed()
    for view in (bob, late):
        await view.until(lambda pins: pins == {bob.id: (30, 40, "Bob")})
    await close_all(bob, late)


@needs_redis
@pytest_twisted.ensureDeferred
async def test_three_nodes_one_map_and_a_killed_node_leaves_no_ghosts(cluster, redis):
    nodes = [cluster(), cluster(), cluster()]
    views = [await open_view(node.ws_url()) for node in nodes]
    for number, view in enumerate(views):
        view.move(number, number)
    truth = {view.id: (n, n, None) for n, view in enumerate(views)}
    for view in views:
        await view.until(lambda pins: pins == truth)
    # One presence key per node, and the device store's epoch (no position anywhere).
    assert redis.command("DBSIZE") == "4"
    nodes[0].process.send_signal(signal.SIGKILL)
    nodes[0].process.wait()
    survivors = {view.id: truth[view.id] for view in views[1:]}
    # Within the node TTL (2 s here; 6 s by default) plus a sweep: the
    # bounded wait is the 10 seconds.
    for view in views[1:]:
        await view.until(lambda pins: pins == survivors, timeout=10)
    # The dead node's presence key expires by itself: nothing is left behind.
    await eventually(lambda: redis.command("DBSIZE") == "3", what="presence key expiry")
    await close_all(*views[1:])


@needs_redis
@pytest_twisted.ensureDeferred
async def test_redis_away_is_not_an_outage_and_everyone_converges_after(cluster, redis):
    first, second = cluster(), cluster()
    alice = await open_view(first.ws_url())
    carol = await open_view(first.ws_url())
    bob = await open_view(second.ws_url())
    alice.move(1, 1)
    carol.move(2, 2)
    bob.move(3, 3)
    for view in (alice, bob):
        await view.until(lambda pins: len(pins) == 3)
    redis.stop()
    await wait_health(first, lambda body: body.startswith("degraded"))
    response = await treq.get(f"{first.url}/healthz")
    assert response.code == 200  # degraded is still serving
    # Meanwhile each node serves its own clients.
    alice.move(10, 10)
    carol.client.close()
    await carol.client.wait_closed()
    await alice.until(lambda pins: pins.get(alice.id) == (10, 10, None) and carol.id not in pins)
    bob.move(30, 30)
    await bob.until(lambda pins: pins.get(bob.id) == (30, 30, None))
    redis.start()
    truth = {alice.id: (10, 10, None), bob.id: (30, 30, None)}
    for view in (alice, bob):
        await view.until(lambda pins: pins == truth)
        assert not view.client.closed.called  # no client reconnected
    await wait_health(first, lambda body: body == "ok")
    metrics = await (await treq.get(f"{second.url}/metrics")).text()
    assert "livemap_backplane_connected 1.0" in metrics
    assert "livemap_backplane_resyncs_total 2.0" in metrics
    assert re.search(r"livemap_backplane_messages_received_total [1-9]", metrics)
    assert "lost the link" in first.log() and first.log().count("lost the link") == 1
    await close_all(alice, bob)


async def wait_health(node: TwistdServer, predicate: Callable[[str], bool]) -> str:
    deadline = reactor.seconds() + WAIT
    while True:
        response = await treq.get(f"{node.url}/healthz")
        body = await response.text()
        assert response.code == 200
        if predicate(body):
            return body
        if reactor.seconds() > deadline:
            raise AssertionError(f"/healthz still says {body!r}")
        await task.deferLater(reactor, 0.1)


# Private maps with --no-open-maps


async def create_map(node: TwistdServer, ttl: str) -> dict:
    response = await treq.post(f"{node.url}/api/maps?ttl={ttl}")
    body = orjson.loads(await response.content())
    assert response.code == 201, body
    return body


async def status(url: str) -> int:
    response = await treq.get(url)
    await response.content()
    return response.code


async def refused(url: str) -> bool:
    try:
        client = await connect(url)
    except Exception:
        return True
    client.close()
    await client.wait_closed()
    return False


@needs_redis
@pytest_twisted.ensureDeferred
async def test_a_private_map_opens_on_every_node_and_outlives_its_maker(cluster):
    maker, other = cluster("--no-open-maps"), cluster("--no-open-maps")
    name = (await create_map(maker, "900"))["map"]
    # At once on the other node: the page, and a WebSocket welcome.
    assert await status(f"{other.url}/m/{name}") == 200
    bob = await open_view(other.ws_url(name))
    alice = await open_view(maker.ws_url(name))
    alice.move(1, 2)
    bob.move(3, 4)
    both = {alice.id: (1, 2, None), bob.id: (3, 4, None)}
    for view in (alice, bob):
        await view.until(lambda pins: pins == both)
    maker.process.send_signal(signal.SIGKILL)
    maker.process.wait()
    await bob.until(lambda pins: pins == {bob.id: (3, 4, None)})
    assert await status(f"{other.url}/m/{name}") == 200
    carol = await open_view(other.ws_url(name))
    # A node started after the maker died never heard of the map: Redis has it.
    late = cluster("--no-open-maps")
    assert await status(f"{late.url}/m/{name}") == 200
    dave = await open_view(late.ws_url(name))
    await dave.until(lambda pins: pins == {bob.id: (3, 4, None)})
    # Closed maps are still closed.
    assert await status(f"{late.url}/m/{'x' * 24}") == 404
    assert await refused(late.ws_url("x" * 24))
    await close_all(bob, carol, dave)


@needs_redis
@pytest_twisted.ensureDeferred
async def test_a_private_map_expires_on_every_node_and_stays_dead(cluster, redis):
    # --min-ttl lets a map live 2 seconds instead of 15 minutes: the test
    # waits for a real expiry on real nodes.
    maker = cluster("--no-open-maps", "--min-ttl", "1")
    other = cluster("--no-open-maps", "--min-ttl", "1")
    body = await create_map(maker, "2")
    name = body["map"]
    views = [await open_view(maker.ws_url(name)), await open_view(other.ws_url(name))]
    for view in views:
        assert await view.client.wait_closed() == (1008, "map expired")
    assert time.time() * 1000 >= body["expires"] - 1  # not before its time
    for node in (maker, other):
        assert await status(f"{node.url}/m/{name}") == 404
        assert await refused(node.ws_url(name))
    # A node that never knew the map, with open maps: Redis still refuses
    # the expired name, while any other name is an open map.
    newcomer = cluster("--min-ttl", "1")
    assert await status(f"{newcomer.url}/m/{name}") == 404
    assert await refused(newcomer.ws_url(name))
    assert await status(f"{newcomer.url}/m/{'x' * 24}") == 200
    # One key for every private map; nothing else was left behind.
    assert redis.command("ZCARD", "livemap:v2:livemap:maps") == "1"
    assert redis.command("DBSIZE") == "5"  # three presence keys, the maps, the epoch


# --workers


def private_ports(node: TwistdServer) -> list[int]:
    found = re.search(r"private ports ([\d ]+)", node.log())
    assert found, node.log()
    return [int(port) for port in found.group(1).split()]


@needs_redis
@pytest_twisted.ensureDeferred
async def test_two_workers_share_a_port_and_serve_one_map(cluster, redis, monkeypatch):
    # A password in the environment, not on any command line.
    redis.command("CONFIG", "SET", "requirepass", "s3cret")
    monkeypatch.setenv("LIVEMAP_REDIS_PASSWORD", "s3cret")
    node = cluster("--workers", "2")
    assert "s3cret" not in " ".join(open(f"/proc/{pid}/cmdline").read()
                                    for pid in worker_pids(node))
    ports = private_ports(node)
    assert len(ports) == 2
    # One client on each worker for sure (their private ports), two more
    # wherever the kernel puts them.
    views = [await open_view(f"ws://127.0.0.1:{port}/ws/public") for port in ports]
    views += [await open_view(node.ws_url()) for _ in range(2)]
    for number, view in enumerate(views):
        view.move(number, number)
    truth = {view.id: (n, n, None) for n, view in enumerate(views)}
    for view in views:
        await view.until(lambda pins: pins == truth)
    # SockJS over HTTP polling through the shared port: every request is a new
    # connection the kernel gives to either worker; the session's owner gets them.
    pool = HTTPConnectionPool(reactor, persistent=False)
    names = [f"s{n}" for n in range(20)]
    names = ([n for n in names if session_owner(n.encode(), 2) == 0][:2]
             + [n for n in names if session_owner(n.encode(), 2) == 1][:2])
    sessions = [await sockjs_session(node.url, name, pool) for name in names]
    for session in sessions:
        await session.poll()  # the welcome
        assert session.view.id is not None and session.view.pins == truth
    for number, session in enumerate(sessions):
        await session.send({"type": "move", "lat": 50 + number, "lng": 5})
    everyone = {**truth, **{s.view.id: (50 + n, 5, None) for n, s in enumerate(sessions)}}
    await views[0].until(lambda pins: pins == everyone)
    for session in sessions:
        deadline = reactor.seconds() + WAIT
        while session.view.pins != everyone and reactor.seconds() < deadline:
            await session.poll()
        assert session.view.pins == everyone
    await close_all(*views)


@needs_redis
@pytest_twisted.ensureDeferred
async def test_a_private_map_made_through_the_shared_port_opens_on_every_worker(cluster):
    node = cluster("--workers", "2", "--no-open-maps")
    # The private ports are not held back until a worker is linked, as the
    # shared one is: wait for both workers to be.
    for port in private_ports(node):
        await wait_health(TwistdServer(node.process, port, node.log_path),
                          lambda body: body == "ok")
    name = (await create_map(node, "900"))["map"]
    views = []
    for port in private_ports(node):
        assert await status(f"http://127.0.0.1:{port}/m/{name}") == 200
        views.append(await open_view(f"ws://127.0.0.1:{port}/ws/{name}"))
    views[0].move(5, 6)
    await views[1].until(lambda pins: pins == {views[0].id: (5, 6, None)})
    await close_all(*views)


@needs_redis
@pytest_twisted.ensureDeferred
async def test_a_crashed_worker_is_restarted_and_workers_die_with_the_parent(cluster):
    node = cluster("--workers", "2")
    pids = worker_pids(node)
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)
    await eventually(lambda: len(re.findall(r"worker \d started", node.log())) == 3,
                     what="restart")
    assert "worker 0 exited" in node.log()
    view = await open_view(f"ws://127.0.0.1:{private_ports(node)[0]}/ws/public")
    await close_all(view)
    restarted = int(re.findall(r"worker 0 started \(pid (\d+)\)", node.log())[-1])
    node.process.send_signal(signal.SIGKILL)  # no chance to stop its children
    node.process.wait()
    await eventually(lambda: not alive(pids[1]) and not alive(restarted),
                     what="children gone with the parent")


def worker_pids(node: TwistdServer) -> list[int]:
    return [int(pid) for pid in re.findall(r"worker \d started \(pid (\d+)\)", node.log())]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too: it only waits for its parent to read its status.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


# The session router in one process: the owner is asked, not the kernel


@pytest_twisted.ensureDeferred
async def test_session_router_forwards_to_the_owner_and_streams_back():
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET, Site

    class Owner(Resource):
        isLeaf = True

        def __init__(self, name: bytes) -> None:
            super().__init__()
            self.name = name

        def render(self, request: Any) -> Any:
            self.forwarded_for = request.getHeader(b"x-forwarded-for")
            request.write(self.name + b":" + request.uri + b":" + request.content.read())
            reactor.callLater(0.01, lambda: (request.write(b":end"), request.finish()))
            return NOT_DONE_YET

    # Each worker: a private port, and a public one (the shared port's stand-in).
    private = [reactor.listenTCP(0, Site(Resource()), interface="127.0.0.1") for _ in range(2)]
    public = [reactor.listenTCP(0, Site(Resource()), interface="127.0.0.1") for _ in range(2)]
    ports = tuple(listener.getHost().port for listener in private)
    routers = []
    for index in range(2):
        router = SessionRouter(Owner(b"w%d" % index), WorkerSpec(index, 2, ports), reactor)
        root = Resource()
        root.putChild(b"sockjs", router)
        private[index].factory.resource = public[index].factory.resource = root
        routers.append(router)
    listeners = private + public
    entry = public[0].getHost().port
    try:
        session = next(name for name in (b"s%d" % n for n in range(50))
                       if session_owner(name, 2) == 1)
        # Asked on worker 0 (as if the kernel gave it the connection): worker 1
        # answers, through worker 0, streamed.
        response = await treq.post(f"http://127.0.0.1:{entry}/sockjs/000/"
                                   f"{session.decode()}/xhr_send", data=b"body")
        assert await response.content() == (b"w1:/sockjs/000/" + session + b"/xhr_send:body:end")
        assert routers[0].forwarded == 1 and routers[1].forwarded == 0
        # The owner is told who the client was (its per-address limits apply).
        assert routers[1].local.forwarded_for == b"127.0.0.1"
        # Its own sessions, WebSocket and info requests are served where they land.
        mine = next(name for name in (b"s%d" % n for n in range(50)) if session_owner(name, 2) == 0)
        for path in (f"000/{mine.decode()}/xhr", f"000/{session.decode()}/websocket", "info"):
            response = await treq.post(f"http://127.0.0.1:{entry}/sockjs/{path}")
            assert (await response.content()).startswith(b"w0:")
        assert routers[0].forwarded == 1
    finally:
        for router in routers:
            await router.pool.closeCachedConnections()
        for listener in listeners:
            await listener.stopListening()

