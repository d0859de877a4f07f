"""
The load-balancer configurations of the docs, run for real: nginx
(docs/deploy/nginx.conf) and HAProxy (docs/deploy/haproxy.cfg), their
placeholders filled with loopback addresses, in front of two livemap "machines"
linked through a private redis-server: `twistd -n livemap --redis ...
--trust-proxy 127.0.0.1`, the second one with `--workers 2`, as in
docs/deployment.md.

Through each balancer: the page, its assets, the API and the health check
load; a plain WebSocket client and the real sockjs-client (Node; websocket,
xhr-streaming, xhr-polling) on one map see each other's pins, and every
request of the SockJS session reached one machine (the machines' own logs
say so); many SockJS sessions, sharing kept-alive connections to the
balancer, spread over both machines and each stays on its own; the
balancer refuses oversized SockJS bodies itself; X-Forwarded-For makes
livemap count the real client, never the proxy and never a forged header.

Skipped, with the reason, when nginx, haproxy or redis-server is not
installed (`scripts/install --test` installs them; CI runs it).
"""

from __future__ import annotations

import inspect
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import orjson
import pytest
import pytest_twisted
import treq
from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import defer, endpoints, protocol, reactor
from twisted.web.client import HTTPConnectionPool

from conftest import TwistdServer, eventually, free_port, start_twistd, wait_healthy
from livemap_tx.service import Options
from livemap_tx.sockjs import SockJSResource
from redis_server import REDIS_SERVER, RedisServer
from wsclient import WAIT, WSClient, _Protocol, connect

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "docs" / "deploy"
CLIENT_JS = ROOT / "tests" / "sockjs" / "client.js"
NODE_MODULES = ROOT / "web" / "node_modules"
NODE = shutil.which("node")
# Debian puts both in /usr/sbin, which a non-root PATH may lack.
_SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
BINARIES = {"nginx": shutil.which("nginx", path=_SBIN),
            "haproxy": shutil.which("haproxy", path=_SBIN)}
KINDS = ["nginx", "haproxy"]
PLACEHOLDER = re.compile(r"\{\{([A-Z0-9_]+)\}\}")
# An access-log line of a request of one SockJS session (map names other
# than `public` are written as `*`): the session id and the transport.
SESSION_REQUEST = re.compile(
    r'"(?:GET|POST|OPTIONS) /sockjs/[^/ ]+/[^/ ]+/([^/ ]+)/(\w+)[^" ]* HTTP/1\.[01]"')

needs_node = pytest.mark.skipif(
    NODE is None or not (NODE_MODULES / "sockjs-client").exists(),
    reason="node or sockjs-client is not installed (npm ci --prefix web)")




# The livemap machines


@dataclass
class Machines:
    """Two livemap nodes; `nodes[1]` may be several worker processes behind one port."""

    nodes: list[TwistdServer]

    def marks(self) -> list[int]:
        """Where each node's log ends now: what a test looks at starts there."""
        return [len(node.log()) for node in self.nodes]

    def logs_since(self, marks: list[int]) -> list[str]:
        return [node.log()[mark:] for node, mark in zip(self.nodes, marks)]

    def opened_on(self, client_id: str, marks: list[int]) -> list[int]:
        """The nodes that logged opening the connection of pin `client_id`."""
        return [index for index, text in enumerate(self.logs_since(marks))
                if f"client {client_id} opened" in text]

    def session_requests(self, marks: list[int]) -> list[dict[str, list[str]]]:
        """Per node: SockJS session id -> the transports of its requests logged there."""
        found: list[dict[str, list[str]]] = []
        for text in self.logs_since(marks):
            sessions: dict[str, list[str]] = {}
            for session, transport in SESSION_REQUEST.findall(text):
                sessions.setdefault(session, []).append(transport)
            found.append(sessions)
        return found


def _stop_all(nodes: list[TwistdServer]) -> None:
    """SIGTERM to all at once: each waits a few seconds for its SockJS sessions to go."""
    for node in nodes:
        if node.process.poll() is None:
            node.process.send_signal(signal.SIGTERM)
    for node in nodes:
        try:
            node.process.wait(15)
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait()


@pytest.fixture(scope="module")
def machines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machines]:
    """Two machines on one map through a private Redis, trusting the balancer on 127.0.0.1."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (scripts/install --test installs it; "
                    "CI does)")
    directory = tmp_path_factory.mktemp("machines")
    redis = RedisServer(directory)
    redis.start()
    nodes: list[TwistdServer] = []
    try:
        # --log-sockjs-requests: the nodes' access logs show where each of a
        # session's requests went (livemap leaves them out by default).
        common = ("--pirate", "none", "--redis", redis.url, "--trust-proxy", "127.0.0.1",
                  "--log-sockjs-requests")
        nodes.append(start_twistd(directory, *common))
        nodes.append(start_twistd(directory, *common, "--workers", "2"))
        yield Machines(nodes)
    finally:
        _stop_all(nodes)
        redis.stop()


@pytest.fixture(scope="module")
def strict_machines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machines]:
    """Two stand-alone nodes that take one connection per client address."""
    directory = tmp_path_factory.mktemp("strict")
    nodes: list[TwistdServer] = []
    try:
        for _ in range(2):
            nodes.append(start_twistd(directory, "--pirate", "none", "--max-per-ip", "1",
                                      "--trust-proxy", "127.0.0.1", "--log-sockjs-requests"))
        yield Machines(nodes)
    finally:
        _stop_all(nodes)


# The balancers, from the docs' own files


def render(template: Path, values: dict[str, str]) -> str:
    """The docs' template with its placeholders filled: every one, and only those."""
    text = template.read_text()
    assert set(PLACEHOLDER.findall(text)) == set(values), (
        f"{template.name} has placeholders {sorted(set(PLACEHOLDER.findall(text)))}")
    return PLACEHOLDER.sub(lambda found: values[found.group(1)], text)


@dataclass
class Balancer:
    kind: str
    process: subprocess.Popen
    port: int
    directory: Path
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, map_name: str) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/{map_name}"

    def log(self) -> str:
        text = self.log_path.read_text(errors="replace")
        error_log = self.directory / "error.log"
        if error_log.exists():
            text += error_log.read_text(errors="replace")
        return text

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# What the tests add around docs/deploy/nginx.conf, which goes inside an
# `http { }` block: a private prefix, pid file, logs and temporary files, so
# that nginx runs as a foreground process of the test, on no system path.
NGINX_MAIN = """\
pid nginx.pid;
error_log error.log info;
worker_processes 1;
{user}
events {{ worker_connections 1024; }}
http {{
    access_log access.log;
    client_body_temp_path tmp/client_body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    include livemap.conf;
}}
"""


def start_balancer(kind: str, directory: Path, machines: Machines) -> Balancer:
    """nginx or HAProxy on a free port in front of `machines`, with the docs' config."""
    binary = BINARIES[kind]
    assert binary is not None
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    values = {"LISTEN": f"127.0.0.1:{port}",
              **{f"NODE_{n + 1}": f"127.0.0.1:{node.port}"
                 for n, node in enumerate(machines.nodes)}}
    if kind == "nginx":
        (directory / "livemap.conf").write_text(render(DEPLOY / "nginx.conf", values))
        (directory / "tmp").mkdir(exist_ok=True)
        # As root, nginx would run its workers as `nobody`, who may not enter
        # the test's private directory: keep them the test's own user.
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
        (directory / "nginx.conf").write_text(NGINX_MAIN.format(user=user))
        command = [binary, "-p", f"{directory}/", "-e", str(directory / "error.log"),
                   "-c", str(directory / "nginx.conf"), "-g", "daemon off;"]
    else:
        (directory / "haproxy.cfg").write_text(render(DEPLOY / "haproxy.cfg", values))
        command = [binary, "-f", str(directory / "haproxy.cfg"), "-db"]
    log_path = directory / f"{kind}.out"
    with open(log_path, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, cwd=directory)
    balancer = Balancer(kind, process, port, directory, log_path)
    try:
        wait_healthy(f"{balancer.url}/healthz", process, kind, balancer.log, timeout=10,
                     interval=0.05)
    except TimeoutError:
        balancer.stop()
        raise
    return balancer


def _skip_unless_installed(kind: str) -> None:
    if BINARIES[kind] is None:
        pytest.skip(f"{kind} is not installed (scripts/install --test installs it; CI does)")


@pytest.fixture(scope="module", params=KINDS)
def balancer(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balancer]:
    _skip_unless_installed(request.param)  # before any node is started for nothing
    running = start_balancer(request.param, tmp_path_factory.mktemp(request.param),
                             request.getfixturevalue("machines"))
    yield running
    running.stop()


@pytest.fixture(scope="module", params=KINDS)
def strict_balancer(request: pytest.FixtureRequest,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balancer]:
    _skip_unless_installed(request.param)
    running = start_balancer(request.param, tmp_path_factory.mktemp(f"strict-{request.param}"),
                             request.getfixturevalue("strict_machines"))
    yield running
    running.stop()


# Clients


class NodeClient(protocol.ProcessProtocol):
    """sockjs-client (tests/sockjs/client.js) in a Node process; its events as JSON lines."""

    def __init__(self) -> None:
        self.buffer = b""
        self.events: list[dict] = []
        self.ended: defer.Deferred = defer.Deferred()

    def outReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's names)
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        self.events.extend(json.loads(line) for line in lines if line.strip())

    def processEnded(self, reason: Any) -> None:  # noqa: N802
        self.ended.callback(None)

    def messages(self) -> list[dict]:
        return [json.loads(e["data"]) for e in self.events if e["event"] == "message"]

    async def until(self, predicate: Callable[[dict], bool], what: str) -> dict:
        def found() -> Optional[dict]:
            return next((m for m in self.messages() if predicate(m)), None)
        try:
            return await eventually(found, f"sockjs-client never saw {what}", timeout=15)
        except AssertionError as missed:
            raise AssertionError(f"{missed}; its last events: {self.events[-3:]}") from None

    async def stop(self) -> None:
        if not self.ended.called:
            self.transport.signalProcess("KILL")  # type: ignore[union-attr]
        await self.ended


def start_sockjs_client(url: str, transport: str, messages: list[dict]) -> NodeClient:
    client = NodeClient()
    assert NODE is not None
    reactor.spawnProcess(client, NODE, [NODE, str(CLIENT_JS), url, transport,
                                        json.dumps([json.dumps(m) for m in messages]), "wait"],
                         env={**os.environ, "NODE_PATH": str(NODE_MODULES)})
    return client


class Poller:
    """A SockJS xhr-polling session spoken by hand, so the test knows its session id."""

    def __init__(self, url: str, map_name: str, session: str, pool: HTTPConnectionPool) -> None:
        self.session = session
        self.base = f"{url}/sockjs/{map_name}/000/{session}"
        self.pool = pool
        self.id: Optional[str] = None
        self.pins: dict[str, tuple] = {}
        self.polling: Optional[defer.Deferred] = None
        self.stopped = False
        self.done: Optional[defer.Deferred] = None

    async def poll(self) -> list[dict]:
        self.polling = treq.post(f"{self.base}/xhr", pool=self.pool)
        response = await self.polling
        body = (await response.text()).strip()
        assert response.code == 200, body
        messages = [orjson.loads(item) for item in orjson.loads(body[1:])] \
            if body.startswith("a") else []
        for message in messages:
            if message["type"] == "welcome":
                self.id = message["id"]
            apply_pins(self.pins, message)
        return messages

    async def send(self, message: dict) -> None:
        response = await treq.post(f"{self.base}/xhr_send", pool=self.pool,
                                   data=orjson.dumps([orjson.dumps(message).decode()]))
        assert response.code == 204, await response.text()

    def start(self) -> None:
        """Poll from now on until stop(), as a browser does: the session never expires."""
        async def loop() -> None:
            try:
                while not self.stopped:
                    await self.poll()
            except Exception:
                if not self.stopped:  # stop() cancels the poll in flight
                    raise
        self.done = defer.Deferred.fromCoroutine(loop())

    async def stop(self) -> None:
        self.stopped = True
        if self.done is None:
            return
        if self.polling is not None:
            self.polling.cancel()
        await self.done


def apply_pins(pins: dict[str, tuple], message: dict) -> None:
    """Keep `pins` equal to what the server said the map holds (id -> lat, lng)."""
    if message["type"] in ("welcome", "snapshot"):
        pins.clear()
    for pin in message.get("pins", ()):
        pins[pin["id"]] = (pin["lat"], pin["lng"])
    for gone in message.get("gone", ()):
        pins.pop(gone, None)


async def watch_until(watcher: WSClient, pins: dict[str, tuple],
                      predicate: Callable[[dict], bool], what: str) -> None:
    """Read the watcher's messages into `pins` until `predicate(pins)`."""
    deadline = reactor.seconds() + 10
    while not predicate(pins):
        remaining = deadline - reactor.seconds()
        if remaining <= 0:
            raise AssertionError(f"the WebSocket watcher never saw {what}: {pins}")
        apply_pins(pins, await watcher.next(timeout=remaining))


async def connect_from(url: str, source: str, headers: dict[str, str]) -> WSClient:
    """A WebSocket from the local address `source` (any of 127.0.0.0/8) with extra headers."""
    client = WSClient()
    factory: Any = WebSocketClientFactory(url, headers=headers)
    factory.protocol = _Protocol
    factory.client = client
    factory.opened = defer.Deferred()
    factory.setProtocolOptions(autoPingInterval=None)
    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", factory.port,
                                            bindAddress=(source, 0))
    await endpoint.connect(factory)
    factory.opened.addTimeout(WAIT, reactor)
    client.protocol = await factory.opened
    return client


async def close_all(*clients: WSClient) -> None:
    for client in clients:
        client.close()
    for client in clients:
        await client.wait_closed()


# The tests


@pytest_twisted.ensureDeferred
async def test_page_assets_api_and_health_load_through_the_balancer_on_both_nodes(
        balancer, machines):
    marks = machines.marks()
    response = await treq.get(f"{balancer.url}/", allow_redirects=False)
    assert response.code == 302
    assert response.headers.getRawHeaders("location")[0].endswith("/m/public")
    response = await treq.get(f"{balancer.url}/m/public")
    page = await response.text()
    assert response.code == 200, page
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/html")
    assets = re.findall(r'(?:src|href)="(/(?:static|vendor)/[^"]+)"', page)
    assert len(assets) >= 4, page
    for path in [*assets, "/vendor/sockjs-client/sockjs.min.js"]:
        response = await treq.get(f"{balancer.url}{path}")
        assert response.code == 200, path
        await response.content()
    for _ in range(20):
        response = await treq.get(f"{balancer.url}/api/maps/public/pins")
        assert response.code == 200
        assert "pins" in orjson.loads(await response.content())
    response = await treq.get(f"{balancer.url}/healthz")
    assert (response.code, await response.text()) == (200, "ok")
    response = await treq.get(f"{balancer.url}/sockjs/public/info")
    assert response.code == 200 and orjson.loads(await response.content())["websocket"]
    # Requests that belong to no SockJS session are spread over both nodes.
    for text in machines.logs_since(marks):
        assert "GET /api/maps/public/pins" in text


@pytest_twisted.ensureDeferred
async def test_the_balancer_refuses_an_oversized_sockjs_body_itself(balancer, machines):
    marks = machines.marks()
    session = f"big{uuid.uuid4().hex}"
    response = await treq.post(f"{balancer.url}/sockjs/public/000/{session}/xhr_send",
                               data=b"x" * (300 * 1024))
    assert response.code == 413
    await response.content()
    # No node read it.
    assert all(session not in text for text in machines.logs_since(marks))
    # A body within the limit still reaches a node (an unknown session: 404).
    response = await treq.post(f"{balancer.url}/sockjs/public/000/{session}/xhr_send",
                               data=orjson.dumps(["y" * (200 * 1024)]))
    assert response.code == 404
    await response.content()


@needs_node
@pytest.mark.parametrize("transport", ["websocket", "xhr-streaming", "xhr-polling"])
@pytest_twisted.ensureDeferred
async def test_sockjs_client_and_websocket_share_a_map_and_the_session_stays_on_one_node(
        balancer, machines, transport):
    map_name = f"lb-{balancer.kind}-{transport}"
    marks = machines.marks()
    # A browser's Origin: accepted only if the balancer passes the Host on.
    watcher = await connect(balancer.ws_url(map_name), origin=balancer.url)
    client = start_sockjs_client(f"{balancer.url}/sockjs/{map_name}", transport,
                                 [{"type": "hello", "name": "Node"},
                                  {"type": "move", "lat": 10.5, "lng": 20.5, "seq": 1}])
    try:
        welcome = await watcher.next("welcome")
        watcher_id = welcome["id"]
        node_id = (await client.until(lambda m: m["type"] == "welcome", "its welcome"))["id"]
        opened = [event for event in client.events if event["event"] == "open"]
        assert opened[0]["transport"] == transport
        # The WebSocket client sees the SockJS client's pin...
        update = await watcher.until(
            lambda m: m["type"] == "update" and any(p["id"] == node_id for p in m["pins"]))
        pin = next(p for p in update["pins"] if p["id"] == node_id)
        assert (pin["lat"], pin["lng"], pin["name"], pin["seq"]) == (10.5, 20.5, "Node", 1)
        # ... and the SockJS client the WebSocket client's.
        watcher.send({"type": "move", "lat": -5, "lng": -6, "seq": 7})
        await client.until(lambda m: m["type"] == "update" and any(
            p["id"] == watcher_id and p["seq"] == 7 for p in m["pins"]), "the watcher's move")

        # The session was opened on exactly one node...
        owner = await eventually(lambda: machines.opened_on(node_id, marks),
                                 "a node logging the SockJS client's connection")
        assert len(owner) == 1, owner
        # (Logs name maps by a digest, never by name.)
        owner_log = machines.logs_since(marks)[owner[0]]
        assert re.search(rf"client {re.escape(node_id)} opened on map ~[0-9a-f]{{10}} "
                         rf"over SockJS {transport}", owner_log), owner_log
        assert map_name not in owner_log
        if transport != "websocket":
            # ... and every HTTP request of it went there: its sends (whose
            # move the watcher saw) and, for polling, every poll.
            requests = machines.session_requests(marks)
            sessions = {session for found in requests for session in found}
            assert len(sessions) == 1, requests
            [session] = sessions
            assert [bool(found.get(session)) for found in requests] == \
                [index == owner[0] for index in range(2)], requests
            kinds = requests[owner[0]][session]
            assert "xhr_send" in kinds, kinds
            if transport == "xhr-polling":
                assert kinds.count("xhr") >= 2, kinds
    finally:
        await client.stop()
        await close_all(watcher)


@pytest_twisted.ensureDeferred
async def test_sockjs_sessions_spread_over_both_nodes_and_each_keeps_to_its_own(
        balancer, machines):
    map_name = f"lb-spread-{balancer.kind}"
    marks = machines.marks()
    watcher = await connect(balancer.ws_url(map_name))
    seen: dict[str, tuple] = {}
    apply_pins(seen, await watcher.next("welcome"))
    # Kept-alive connections to the balancer, shared by every session: each
    # request is routed by its own session id, not by its connection.
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 2
    sessions: list[Poller] = []
    owners: dict[str, int] = {}
    try:
        # Open sessions until each node holds three (bounded: 40 sessions).
        # Each keeps a poll open from then on, as a browser does, so that
        # none expires while the others are opened.
        while len(sessions) < 40 and min(list(owners.values()).count(n) for n in (0, 1)) < 3:
            poller = Poller(balancer.url, map_name, uuid.uuid4().hex, pool)
            assert await poller.poll() == []  # 'o'
            await poller.poll()  # the welcome
            assert poller.id is not None
            await poller.send({"type": "move", "lat": len(sessions), "lng": 1})
            poller.start()
            sessions.append(poller)
            [owners[poller.session]] = await eventually(
                lambda: machines.opened_on(poller.id, marks), "the session's node logging it")
        counts = [list(owners.values()).count(n) for n in (0, 1)]
        assert min(counts) >= 3, counts

        # One map: the watcher sees every session's pin, each session every pin.
        truth = {p.id: (n, 1) for n, p in enumerate(sessions)}
        await watch_until(watcher, seen, lambda pins: pins == truth, "every session's pin")
        for poller in sessions:
            await eventually(lambda: poller.pins == truth, f"{poller.session} seeing every pin")

        # Every request of a session reached its own node, and no other.
        requests = machines.session_requests(marks)
        for poller in sessions:
            on = [index for index, found in enumerate(requests) if poller.session in found]
            assert on == [owners[poller.session]], (poller.session, on)
            # (A request that one worker of the second node forwarded to the
            # session's worker is logged by both.)
            kinds = requests[on[0]][poller.session]
            assert kinds.count("xhr") >= 3 and kinds.count("xhr_send") >= 1, kinds
    finally:
        for poller in sessions:
            await poller.stop()
        await close_all(watcher)
        await pool.closeCachedConnections()


@pytest_twisted.ensureDeferred
async def test_x_forwarded_for_names_the_client_not_the_proxy_nor_a_forged_header(
        strict_balancer):
    # Each node takes one connection per client address. The test's clients
    # connect to the balancer from their own loopback addresses; the nodes
    # see every connection come from the balancer (127.0.0.1, trusted).
    base = 2 + 10 * KINDS.index(strict_balancer.kind)
    url = strict_balancer.ws_url("public")
    admitted: list[WSClient] = []
    try:
        # Three clients, three real addresses, one forged header: all admitted
        # (had a node counted the proxy or the forged address, two would share
        # one count on one of the two nodes).
        for n in range(3):
            admitted.append(await connect_from(url, f"127.0.0.{base + n}",
                                               {"X-Forwarded-For": "198.51.100.7"}))
        # One real address, a new forged header each time: the balancer
        # appends the real address, the node counts it, and with two nodes
        # the third connection at the latest finds its node full.
        source = f"127.0.0.{base + 3}"
        refusals = []
        for n in range(3):
            try:
                admitted.append(await connect_from(url, source,
                                                   {"X-Forwarded-For": f"198.51.100.{n + 1}"}))
            except ConnectionError as refused:
                refusals.append(str(refused))
        assert 1 <= len(refusals) <= 2, refusals
        assert all("429" in refusal for refusal in refusals), refusals
    finally:
        await close_all(*admitted)


def _seconds(value: str) -> float:
    """`75s`, `1m`, `1h`: the files always give a unit (HAProxy reads a bare number as ms)."""
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h)", value).groups()  # type: ignore[union-attr]
    return int(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def test_timeouts_outlast_the_heartbeats_and_idle_connections_are_closed_by_nginx():
    """
    Read from the files, not waited for: a quiet connection carries a SockJS
    heartbeat every 25 s and a WebSocket ping every 30 s (--ping), so a
    timeout above both never cuts a live client. Waiting that long through
    each balancer would triple this file's run time.
    """
    defaults = Options()
    heartbeat = inspect.signature(SockJSResource).parameters["heartbeat"].default
    quiet = max(heartbeat, defaults["ping"])
    nginx = (DEPLOY / "nginx.conf").read_text()
    nginx_timeouts = dict(re.findall(r"^\s*(proxy_\w+_timeout|keepalive_timeout) (\w+);",
                                     nginx, re.M))
    assert set(nginx_timeouts) == {"proxy_connect_timeout", "proxy_read_timeout",
                                   "proxy_send_timeout", "keepalive_timeout"}
    for name in ("proxy_read_timeout", "proxy_send_timeout"):
        assert _seconds(nginx_timeouts[name]) > quiet, name
    # nginx closes an idle connection to a node before the node does
    # (--header-timeout is also livemap's keep-alive), so it never sends a
    # request on a connection the node is closing.
    assert _seconds(nginx_timeouts["keepalive_timeout"]) < defaults["header-timeout"]
    haproxy = (DEPLOY / "haproxy.cfg").read_text()
    haproxy_timeouts = dict(re.findall(r"^\s*timeout ([\w-]+) (\w+)", haproxy, re.M))
    for name in ("client", "server", "tunnel"):
        assert _seconds(haproxy_timeouts[name]) > quiet, name
