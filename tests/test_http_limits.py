"""Limits on the HTTP side: slow headers and bodies, idle keep-alive, connections per
address and per descriptor, full maps, TLS end to end."""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import socket
import subprocess
import time

import orjson
import pytest
import pytest_twisted
import treq
from twisted.internet import defer, protocol, reactor, ssl
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import ClientCreator

from conftest import (deferLater, eventually, free_port, server_options, twistd_command,
                      wait_healthy)
from livemap_tx.admission import Admission, Refused
from livemap_tx.service import make_server
from livemap_tx.http_site import make_site
from wsclient import connect


async def listen(site_resource, header_timeout=20.0):
    return reactor.listenTCP(0, make_site(site_resource, reactor, header_timeout=header_timeout),
                             interface="127.0.0.1")


async def wait_closed(sock: socket.socket, timeout: float = 5.0) -> bool:
    """Whether the server closed the socket within `timeout` (polling, non-blocking)."""
    sock.setblocking(False)
    for _ in range(int(timeout / 0.05)):
        try:
            if sock.recv(4096) == b"":
                return True
        except BlockingIOError:
            pass
        except ConnectionResetError:
            return True
        await deferLater(0.05)
    return False


@pytest_twisted.ensureDeferred
async def test_slow_headers_are_cut_off_and_others_are_served():
    hub, factory, site = make_server(reactor, server_options())
    listener = await listen(site.resource(), header_timeout=0.5)
    port = listener.getHost().port
    try:
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finishes
        idle = socket.create_connection(("127.0.0.1", port))  # says nothing at all
        response = await treq.get(f"http://127.0.0.1:{port}/healthz")
        assert (await response.content()) == b"ok"
        assert await wait_closed(slow) and await wait_closed(idle)
        slow.close()
        idle.close()
    finally:
        await listener.stopListening()


@pytest_twisted.ensureDeferred
async def test_full_map_refuses_the_upgrade_with_503(server):
    server.hub.max_members = 1
    first = await connect(server.ws_url("small"))
    await first.next("welcome")
    with pytest.raises(Exception, match="503"):
        await connect(server.ws_url("small"))
    other = await connect(server.ws_url("other"))  # other maps are not affected
    await other.next("welcome")
    for client in (first, other):
        client.close()
        await client.wait_closed()


def make_certificate(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
            .sign(key, hashes.SHA256()))
    key_path, cert_path = tmp_path / "key.pem", tmp_path / "cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@pytest_twisted.ensureDeferred
async def test_tls_end_to_end_page_and_websocket(tmp_path):
    """`--port ssl:...` serves the page and a wss:// WebSocket with a real certificate."""
    key_path, cert_path = make_certificate(tmp_path)
    hub, factory, site = make_server(reactor, server_options())
    endpoint = serverFromString(
        reactor, f"ssl:0:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path}")
    listener = await endpoint.listen(make_site(site.resource(), reactor))
    port = listener.getHost().port
    trust = ssl.Certificate.loadPEM(cert_path.read_bytes())
    tls = ssl.optionsForClientTLS("localhost", trustRoot=trust)
    try:
        from treq.client import HTTPClient
        from twisted.web.client import Agent, BrowserLikePolicyForHTTPS
        from twisted.web.iweb import IPolicyForHTTPS
        from zope.interface import implementer

        @implementer(IPolicyForHTTPS)
        class TrustOurs:
            def creatorForNetloc(self, hostname, port):
                return tls

        http = HTTPClient(Agent(reactor, contextFactory=TrustOurs()))
        response = await http.get(f"https://localhost:{port}/healthz")
        assert (await response.content()) == b"ok"

        client = await connect(f"wss://localhost:{port}/ws/secure", tls=tls)
        assert (await client.next())["type"] == "welcome"
        client.send({"type": "move", "lat": 1, "lng": 2})
        assert (await client.next("update"))["pins"][0]["lat"] == 1
        client.close()
        await client.wait_closed()
    finally:
        await listener.stopListening()


def test_accepted_connections_detect_half_open_peers():
    from livemap_tx.http_site import KEEPALIVE_IDLE, detect_half_open

    class Transport:
        def __init__(self, sock):
            self.sock = sock

        def getHandle(self):  # noqa: N802
            return self.sock

    with socket.socket() as sock:
        detect_half_open(Transport(sock))
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        if hasattr(socket, "TCP_KEEPIDLE"):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE
    detect_half_open(object())  # no socket: nothing to do, no error


@pytest_twisted.ensureDeferred
async def test_accepted_connections_have_a_bounded_kernel_send_buffer(server):
    """A stalled client can hold at most twice SEND_BUFFER in the kernel, not 4 MiB."""
    from livemap_tx.http_site import SEND_BUFFER

    client = await connect(server.ws_url())
    my_id = (await client.next("welcome"))["id"]
    [protocol] = [p for p in server.factory.protocols if p.client and p.client.id == my_id]
    sock = protocol.transport.getHandle()
    # Linux doubles the value for its bookkeeping and stops autotuning it.
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) <= 2 * SEND_BUFFER
    client.close()
    await client.wait_closed()


@pytest.mark.parametrize("chunked", [False, True])
@pytest_twisted.ensureDeferred
async def test_a_request_body_over_the_bound_is_refused_unread(server, chunked):
    """twisted.web would read any body; livemap answers 413 and closes instead."""
    from livemap_tx.http_site import MAX_BODY
    from twisted.internet import protocol

    received: list[bytes] = []
    done = defer.Deferred()

    class Sender(protocol.Protocol):
        def connectionMade(self) -> None:  # noqa: N802
            if chunked:
                self.transport.write(b"POST /apps/overland/x HTTP/1.1\r\nHost: a\r\n"
                                     b"Transfer-Encoding: chunked\r\n\r\n")
                chunk = b"x" * 65536
                for _ in range(MAX_BODY // 65536 + 4):
                    self.transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            else:
                self.transport.write(b"POST /apps/overland/x HTTP/1.1\r\nHost: a\r\n"
                                     b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1) + b"x" * 1000)

        def dataReceived(self, data: bytes) -> None:  # noqa: N802
            received.append(data)

        def connectionLost(self, reason: object = None) -> None:  # noqa: N802
            done.callback(None)

    factory = protocol.ClientFactory()
    factory.protocol = Sender
    reactor.connectTCP("127.0.0.1", server.port, factory)
    await done.addTimeout(10, reactor)
    assert b"".join(received).startswith(b"HTTP/1.1 413")


# A client as most HTTP libraries are (http.client, OkHttp, URLSession):
# it writes its whole request before it reads the answer.
WRITE_THEN_READ = r"""
import socket, sys
port, size, tries = (int(arg) for arg in sys.argv[1:])
for _ in range(tries):
    sock = socket.create_connection(("127.0.0.1", port))
    head = b"POST /apps/overland/x HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size
    try:
        sock.sendall(head + b"x" * size)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    except OSError as error:
        answer = repr(error).encode()
    print(answer.split(b"\r\n")[0].decode())
    sock.close()
"""


@pytest_twisted.ensureDeferred
async def test_a_client_that_writes_its_whole_body_first_still_reads_the_413(server):
    """Closing with the body still arriving would reset the connection, 413 unread."""
    import sys

    from twisted.internet.utils import getProcessOutputAndValue

    out, err, code = await getProcessOutputAndValue(
        sys.executable, ["-c", WRITE_THEN_READ, str(server.port), str(3 * 1024 * 1024), "5"])
    assert code == 0, err
    assert out.decode().splitlines() == ["HTTP/1.1 413 Content Too Large"] * 5


@pytest_twisted.ensureDeferred
async def test_after_a_413_a_client_that_keeps_sending_is_cut_off(server, monkeypatch):
    """The lingering close is bounded: what comes after the 413 is dropped, then the connection."""
    from livemap_tx.http_site import BoundedChannel

    monkeypatch.setattr(BoundedChannel, "linger", 0.3)
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /apps/overland/x HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n"
                 % (10**12))
    sock.setblocking(False)
    answer, sent, closed = b"", 0, False
    for _ in range(100):  # 5 s at most
        try:
            while True:  # as much as the connection takes
                sent += sock.send(b"x" * 65536)
        except BlockingIOError:
            pass
        except OSError:
            closed = True
        try:
            chunk = sock.recv(65536)
            answer += chunk
            closed = closed or chunk == b""
        except BlockingIOError:
            pass
        except OSError:
            closed = True
        if closed:
            break
        await deferLater(0.05)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413") and closed
    assert sent > 1024 * 1024  # it was read (and dropped) while lingering, not buffered


# The body's deadlines (http_site.BODY_TIMEOUT, MIN_BODY_RATE), the per-address
# limit of every connection and the descriptor budget (connections.py).


class _Dribbler(protocol.Protocol):
    """Sends a request's head, then its body a few bytes at a time, `gap` s apart."""

    def __init__(self, head: bytes, body: bytes, chunk: int, gap: float) -> None:
        self.head, self.body, self.chunk, self.gap = head, body, chunk, gap
        self.answer = b""
        self.sent = 0
        self.lost: defer.Deferred = defer.Deferred()
        self.call = None

    def connectionMade(self) -> None:  # noqa: N802
        self.transport.write(self.head)
        self.call = reactor.callLater(self.gap, self.more)

    def more(self) -> None:
        self.call = None
        piece = self.body[self.sent:self.sent + self.chunk]
        self.sent += len(piece)
        if piece:
            self.transport.write(piece)
        if self.sent < len(self.body):
            self.call = reactor.callLater(self.gap, self.more)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.answer += data

    def connectionLost(self, reason: object = None) -> None:  # noqa: N802
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.lost.callback(reactor.seconds())


async def dribble(port: int, head: bytes, body: bytes, chunk: int, gap: float,
                  timeout: float) -> tuple[_Dribbler, float, float]:
    """Connect and dribble; returns the sender, when it connected and when it was cut off."""
    sender = _Dribbler(head, body, chunk, gap)
    connected = await ClientCreator(reactor, lambda: sender).connectTCP("127.0.0.1", port)
    started = reactor.seconds()
    ended = await connected.lost.addTimeout(timeout, reactor)
    return sender, started, ended


def upload_head(path: bytes, size: int) -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (path, size))


@pytest_twisted.ensureDeferred
async def test_a_body_dribbler_is_cut_off_at_the_body_deadline():
    """Never a long silence, but far under the minimum rate: cut off at timeout + bytes/rate."""
    hub, factory, site = make_server(reactor, server_options())
    listener = reactor.listenTCP(
        0, make_site(site.resource(), reactor, body_timeout=1.0, min_body_rate=100.0,
                     admission=factory.admission), interface="127.0.0.1")
    port = listener.getHost().port
    try:
        # One byte every 0.2 s (5 B/s): each read well within body_timeout.
        sender, started, ended = await dribble(
            port, upload_head(b"/apps/overland/x", 10_000), b"x" * 10_000, 1, 0.2, 10.0)
        assert sender.answer == b"" and 0 < sender.sent < 100
        # Its deadline: 1 s + sent / 100 B/s; nothing cut it off before.
        assert ended - started >= 1.0
        # Silence after part of the body: cut off body_timeout after the last byte.
        sender, started, ended = await dribble(
            port, upload_head(b"/apps/overland/x", 10_000), b"x" * 500, 500, 0.1, 10.0)
        assert sender.sent == 500 and ended - started >= 1.0
        # Meanwhile and after, everyone else is served.
        response = await treq.get(f"http://127.0.0.1:{port}/healthz")
        assert (await response.content()) == b"ok"
    finally:
        await listener.stopListening()


@pytest.mark.waits  # mostly waiting: scripts/test runs it beside the rest
@pytest_twisted.ensureDeferred
async def test_an_honest_large_overland_batch_over_a_slow_link_is_taken(server):
    """About 110 KB at 4 KB/s in bursts (28 s) under the default deadlines: 200 and the pin."""
    from livemap_tx.http_site import BODY_TIMEOUT

    made = await treq.post(f"{server.url}/api/maps/slowlink/devices", data=b'{"name":"Far"}')
    device = orjson.loads(await made.content())
    token = device["apps"]["overland"]["token"]
    now = int(time.time())
    points = [{"type": "Feature",
               "geometry": {"type": "Point", "coordinates": [13.0 + i / 1e4, 52.5]},
               "properties": {"timestamp": time.strftime(
                   "%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 300 + i)),
                   "horizontal_accuracy": 30, "altitude": 0, "speed": 4,
                   "motion": ["driving"], "activity": "other_navigation",
                   "battery_state": "unplugged", "battery_level": 0.8, "wifi": ""}}
              for i in range(400)]
    body = orjson.dumps({"locations": points})
    assert len(body) > 60_000
    chunk = 1000  # a packet every quarter second: 4 KB/s
    took = len(body) / chunk * 0.25
    assert took > BODY_TIMEOUT  # longer than any fixed deadline for a whole body would allow
    head = upload_head(f"/apps/overland/{token}".encode(), len(body)).replace(
        b"Host: a\r\n", b"Host: a\r\nConnection: close\r\n")
    sender, _, _ = await dribble(server.port, head, body, chunk, 0.25, took + 30)
    assert sender.answer.startswith(b"HTTP/1.1 200") and b'{"result":"ok"}' in sender.answer
    pins = server.hub.pins("slowlink")
    assert [pin["lng"] for pin in pins] == [13.0 + 399 / 1e4]


def test_every_connection_counts_against_the_per_address_limit():
    """Plain HTTP and WebSocket: one limit; a WebSocket counts once."""
    admission = Admission(max_per_ip=3)
    http, ws = object(), object()
    admission.open_connection(http, "a")
    admission.open_connection(ws, "a")
    assert admission.acquire("a", carrier=ws) is False  # its TCP connection counts already
    assert admission.per_ip == {"a": 2} and admission.total == 1
    assert admission.acquire("a") is True  # a SockJS session: a place of its own
    with pytest.raises(Refused) as refused:
        admission.open_connection(object(), "a")
    assert refused.value.status == 429
    admission.release("a", counted=False)
    admission.release("a")
    admission.close_connection(ws)
    admission.close_connection(http)
    assert (admission.per_ip, admission.total, admission.sockets) == ({}, 0, {})


@pytest_twisted.ensureDeferred
async def test_plain_http_connections_count_against_the_address_limit(server):
    """At the limit an address's idle connection makes room (its /healthz gets in); else 429."""
    server.factory.admission.max_per_ip = 3
    live = [await connect(server.ws_url()) for _ in range(2)]
    idle = socket.create_connection(("127.0.0.1", server.port))
    await eventually(lambda: server.factory.admission.per_ip.get("127.0.0.1") == 3, "counted")
    response = await treq.get(f"{server.url}/healthz", persistent=False)  # a fourth
    assert (await response.content()) == b"ok"
    assert await wait_closed(idle)  # it made room
    idle.close()
    live.append(await connect(server.ws_url()))
    with pytest.raises(Exception, match="429"):
        await connect(server.ws_url())  # the upgrade's own connection is refused
    response = await treq.get(f"{server.url}/healthz", persistent=False)
    assert response.code == 429 and response.headers.getRawHeaders("retry-after") == ["10"]
    await response.content()
    for client in live:
        client.close()
        await client.wait_closed()
    await eventually(lambda: not server.factory.admission.per_ip, "all released")
    assert server.factory.admission.total == 0
    response = await treq.get(f"{server.url}/healthz", persistent=False)
    assert (await response.content()) == b"ok"


@pytest_twisted.ensureDeferred
async def test_at_the_descriptor_budget_the_longest_waiting_connection_makes_room():
    hub, factory, site = make_server(reactor, server_options())
    built = make_site(site.resource(), reactor, admission=factory.admission, max_sockets=20)
    listener = reactor.listenTCP(0, built, interface="127.0.0.1")
    port = listener.getHost().port
    table = built.connections
    # Live connections may take only part of the budget.
    assert factory.admission.max_connections == 20 - 16
    try:
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        await eventually(lambda: table.open == 20, "twenty open")
        client = await connect(f"ws://127.0.0.1:{port}/ws/budget")  # the 21st: makes room
        await client.next("welcome")
        assert await wait_closed(idle[0])  # the one that waited longest went
        response = await treq.get(f"http://127.0.0.1:{port}/healthz", persistent=False)
        assert (await response.content()) == b"ok"
        assert table.shed >= 2 and table.open <= 20
        client.close()
        await client.wait_closed()
        for sock in idle:
            sock.close()
        await eventually(lambda: table.open == 0 and not factory.admission.per_ip,
                         "all released")
        assert factory.admission.total == 0
    finally:
        await listener.stopListening()


def _probe(port: int, path: str = "/healthz", timeout: float = 1.0) -> bytes:
    """One request on a new connection; the whole answer, or what came within `timeout`."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(b"GET %s HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n" % path.encode())
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            pass
        return answer


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="util-linux's prlimit is missing")
def test_620_body_dribblers_under_600_descriptors_leave_healthz_answering(tmp_path):
    """A real twistd under `prlimit --nofile=600`; 620 bodies dribbled from one address."""
    port = free_port()
    log_path = tmp_path / "twistd.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            ["prlimit", "--nofile=600", *twistd_command(
                "--port", f"tcp:{port}:interface=127.0.0.1", "--pirate", "none")],
            stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp_path,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    head = upload_head(b"/apps/overland/x", 100_000)
    dribblers: list[socket.socket] = []

    def dribbler() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(head)
        sock.setblocking(False)
        return sock
    try:
        wait_healthy(f"http://127.0.0.1:{port}/healthz", process, "twistd",
                     lambda: log_path.read_text(errors="replace"), timeout=20)
        dribblers = [dribbler() for _ in range(620)]
        reconnected = 0
        for round_number in range(8):  # 8 s of dribbling, a byte a second each
            for index, sock in enumerate(dribblers):
                try:
                    sock.send(b"x")
                except OSError:  # dropped to make room: an attacker comes back
                    sock.close()
                    if reconnected < 2000:
                        reconnected += 1
                        dribblers[index] = dribbler()
            answer = _probe(port, "/metrics" if round_number == 4 else "/healthz")
            assert answer.startswith(b"HTTP/1.1 200"), (round_number, answer)
            assert b"\r\nok\r\n" in answer or b"livemap_connections" in answer
            time.sleep(1)
        assert process.poll() is None
        assert reconnected > 0  # the server did make room (and never ran out)
        assert "EMFILE" not in log_path.read_text(errors="replace")
    finally:
        for sock in dribblers:
            sock.close()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest_twisted.ensureDeferred
async def test_a_large_body_takes_a_descriptor_only_once_it_is_large_and_it_is_counted():
    hub, factory, site = make_server(reactor, server_options())
    built = make_site(site.resource(), reactor, admission=factory.admission, max_sockets=1000)
    listener = reactor.listenTCP(0, built, interface="127.0.0.1")
    port = listener.getHost().port
    table = built.connections
    try:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(upload_head(b"/apps/overland/x", 300_000) + b"x" * 50_000)
        await eventually(lambda: table.open == 1, "the connection counted")
        await deferLater(0.2)
        assert table.open == 1  # declared large, but only 50 KB in: in memory
        sock.sendall(b"x" * 100_000)
        await eventually(lambda: table.open == 2, "the temporary file counted")
        sock.sendall(b"x" * 150_000)
        sock.setblocking(False)  # this test shares its thread with the server

        def answer() -> bytes:
            try:
                return sock.recv(65536)
            except BlockingIOError:
                return b""
        # Not an Overland batch: 400.
        assert (await eventually(answer, "the answer")).startswith(b"HTTP/1.1 400")
        await eventually(lambda: table.open == 1, "the file closed once answered")
        sock.close()
        await eventually(lambda: table.open == 0, "the connection closed")
    finally:
        await listener.stopListening()
