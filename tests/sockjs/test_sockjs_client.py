"""
The real sockjs-client (npm, run with Node) against our server on
127.0.0.1: open, echo, close, over each transport it can use outside a
browser. Skipped, saying why, when Node or web/node_modules/sockjs-client is
missing (``npm ci --prefix web`` installs it).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Generator

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import Site

from livemap_tx.sockjs import SockJSResource
from livemap_tx.sockjs.testing import HandlerLog

ROOT = Path(__file__).resolve().parents[2]
CLIENT_JS = Path(__file__).resolve().parent / "client.js"
NODE_MODULES = Path(os.environ.get("SOCKJS_CLIENT_NODE_PATH", ROOT / "web" / "node_modules"))
NODE = shutil.which("node")

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not installed"),
    pytest.mark.skipif(
        not (NODE_MODULES / "sockjs-client" / "package.json").exists(),
        reason=f"sockjs-client is not installed in {NODE_MODULES} (npm ci --prefix web)",
    ),
]

# Every transport sockjs-client offers without a DOM (htmlfile and
# jsonp-polling need a browser's iframes and script tags).
TRANSPORTS = ["websocket", "xhr-streaming", "xhr-polling", "eventsource"]

MESSAGES = [
    "hello",
    "ünïcode ☃ \U0001f600 \u2028\u2029",
    "</script><script>alert(1)</script>",
    '{"type": "move", "lat": 1.5}',
    "x" * 20000,
    "",
]


class _NodeProcess(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended: defer.Deferred = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value.exitCode)


@defer.inlineCallbacks
def run_client(url: str, transport: str, messages: list[str], mode: str = "") -> Generator[Any, Any, list[dict]]:
    proc = _NodeProcess()
    env = dict(os.environ, NODE_PATH=str(NODE_MODULES))
    reactor.spawnProcess(
        proc, NODE, [NODE, str(CLIENT_JS), url, transport, json.dumps(messages), mode], env=env
    )
    code = yield proc.ended.addTimeout(60, reactor)
    events = [json.loads(line) for line in proc.out.decode().split("\n") if line.strip()]
    assert code == 0, (events, proc.err.decode()[-2000:])
    return events


class Server:
    def __init__(self) -> None:
        # Session timers on a fake clock: nothing is left scheduled on the
        # reactor when the test ends.
        self.clock = Clock()
        self.echo = HandlerLog(echo=True)
        self.closing = HandlerLog()

        def close_at_once(conn: Any) -> Any:
            handler = self.closing(conn)
            conn.close(3000, "Go away!")
            return handler

        root = Resource()
        root.putChild(b"echo", SockJSResource(self.echo, self.clock))
        root.putChild(b"close", SockJSResource(close_at_once, self.clock))
        self.port = reactor.listenTCP(0, Site(root, timeout=None), interface="127.0.0.1")

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}/{name}"

    def stop(self) -> defer.Deferred:
        self.clock.advance(60)  # expire every session
        return self.port.stopListening()


@pytest.fixture
def server() -> Generator[Server, None, None]:
    srv = Server()
    yield srv
    pytest_twisted.blockon(srv.stop())


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.inlineCallbacks
def test_sockjs_client_echo_and_close(server: Server, transport: str) -> Generator[Any, Any, None]:
    events = yield run_client(server.url("echo"), transport, MESSAGES)
    assert events[0] == {"event": "open", "transport": transport}
    assert [e["data"] for e in events if e["event"] == "message"] == MESSAGES
    assert events[-1]["event"] == "close"
    assert events[-1]["code"] == 1000
    handler = server.echo.last
    assert handler.messages == MESSAGES
    assert handler.conn.transport_name == transport


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.inlineCallbacks
def test_sockjs_client_sees_server_close(server: Server, transport: str) -> Generator[Any, Any, None]:
    events = yield run_client(server.url("close"), transport, [], mode="wait")
    assert events[0] == {"event": "open", "transport": transport}
    assert events[-1] == {"event": "close", "code": 3000, "reason": "Go away!"}
