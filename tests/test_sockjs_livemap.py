"""
livemap over SockJS with the real sockjs-client (npm, run by Node): the same
messages as WebSocket, and SockJS and WebSocket clients share one map.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor

from conftest import deferLater
from wsclient import connect

ROOT = Path(__file__).resolve().parent.parent
CLIENT_JS = ROOT / "tests" / "sockjs" / "client.js"
NODE_MODULES = ROOT / "web" / "node_modules"
NODE = shutil.which("node")

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not installed"),
    pytest.mark.skipif(not (NODE_MODULES / "sockjs-client").exists(),
                       reason="sockjs-client is not installed (npm ci --prefix web)"),
]


class NodeClient(protocol.ProcessProtocol):
    """sockjs-client in a Node process; its events arrive as JSON lines."""

    def __init__(self) -> None:
        self.buffer = b""
        self.events: list[dict] = []
        self.ended: defer.Deferred = defer.Deferred()

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        self.events.extend(json.loads(line) for line in lines if line.strip())

    def processEnded(self, reason) -> None:  # noqa: N802
        self.ended.callback(None)

    def messages(self) -> list[dict]:
        return [json.loads(e["data"]) for e in self.events if e["event"] == "message"]

    async def until(self, predicate, timeout: float = 15.0):
        for _ in range(int(timeout / 0.05)):
            for message in self.messages():
                if predicate(message):
                    return message
            await deferLater(0.05)
        raise AssertionError(f"sockjs-client never saw it; events: {self.events[-5:]}")


def start_node(url: str, transport: str, messages: list[dict]) -> NodeClient:
    client = NodeClient()
    env = {**os.environ, "NODE_PATH": str(NODE_MODULES)}
    reactor.spawnProcess(client, NODE, [NODE, str(CLIENT_JS), url, transport,
                                        json.dumps([json.dumps(m) for m in messages]), "wait"],
                         env=env)
    return client


@pytest.mark.parametrize("transport", ["websocket", "xhr-streaming", "xhr-polling", "eventsource"])
@pytest_twisted.ensureDeferred
async def test_sockjs_and_websocket_clients_share_a_map(server, transport):
    map_name = f"mixed-{transport}"
    watcher = await connect(server.ws_url(map_name))
    await watcher.next("welcome")
    node = start_node(f"{server.url}/sockjs/{map_name}", transport,
                      [{"type": "hello", "name": "Node"},
                       {"type": "move", "lat": 10.5, "lng": 20.5, "seq": 1}])
    try:
        welcome = await node.until(lambda m: m["type"] == "welcome")
        node_id = welcome["id"]
        update = await watcher.until(lambda m: m["type"] == "update" and m["pins"])
        [pin] = update["pins"]
        assert (pin["id"], pin["lat"], pin["name"], pin["seq"]) == (node_id, 10.5, "Node", 1)

        watcher.send({"type": "move", "lat": -5, "lng": -6, "seq": 7})
        seen = await node.until(
            lambda m: m["type"] == "update" and any(p["seq"] == 7 for p in m["pins"]))
        assert seen["gone"] == []

        server.hub.maps[map_name].members[node_id].subscriber.close(3001, "test over")
        await node.ended
        closes = [e for e in node.events if e["event"] == "close"]
        assert closes and closes[0]["code"] == 3001
        gone = await watcher.until(lambda m: m["type"] == "update" and m["gone"])
        assert gone["gone"] == [node_id]
    finally:
        if not node.ended.called:
            node.transport.signalProcess("KILL")
            await node.ended
        watcher.close()
        await watcher.wait_closed()
