"""Limits on the HTTP side: slow headers, idle keep-alive, full maps, TLS end to end."""

from __future__ import annotations

import datetime
import socket

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor, ssl
from twisted.internet.endpoints import serverFromString

from conftest import deferLater, server_options
from livemap_tx.service import make_server
from livemap_tx.web import make_site
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
    from livemap_tx.web import KEEPALIVE_IDLE, detect_half_open

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
    from livemap_tx.web import SEND_BUFFER

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
    from livemap_tx.web import MAX_BODY
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
    from livemap_tx.web import BoundedChannel

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
