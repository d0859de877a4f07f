"""
A private map's name is its link, and a device's token its only credential:
nothing the server writes anywhere may contain either. Two real `twistd` nodes (twistd writes every level of
twisted.logger's events to its log) are driven through everything a map's
clients and the world can do to them: the page, the API, WebSocket and
SockJS clients, every kind of bad message, a client too slow to read, the
cluster's lookups, the map's expiry and the error pages after it. Then the
logs of both nodes, their /metrics and every body they answered are
searched for the name.
"""

from __future__ import annotations

import base64
import re
import time

import orjson
import pytest_twisted
import treq

from conftest import deferLater
from liveclients import StalledSocket, open_view, sockjs_session
from redis_server import needs_redis
from test_cluster import cluster, redis  # noqa: F401 (fixtures)
from wsclient import connect


class Answers:
    """
    What the servers answered that must not hold the name: every error page
    (with its headers), and /metrics and /healthz. (The map's own page
    carries its name: the page needs it to connect.)
    """

    def __init__(self) -> None:
        self.bodies: list[str] = []

    async def request(self, method: str, url: str, **kwargs: object) -> tuple[int, str]:
        response = await treq.request(method, url, **kwargs)
        body = (await response.content()).decode("utf-8", "replace")
        if response.code >= 400 or url.endswith(("/metrics", "/healthz")):
            headers = " ".join(f"{k.decode()}: {' '.join(v.decode() for v in vs)}"
                               for k, vs in response.headers.getAllRawHeaders())
            self.bodies.append(f"{response.code} {headers}\n{body}")
        return response.code, body


@needs_redis
@pytest_twisted.ensureDeferred
async def test_map_names_and_device_tokens_are_in_no_log_metric_or_error_page(cluster):  # noqa: F811
    options = ("--no-open-maps", "--min-ttl", "4", "--slow-timeout", "1")
    maker, other = cluster(*options), cluster(*options)
    answers = Answers()
    code, body = await answers.request("POST", f"{maker.url}/api/maps?ttl=10")
    assert code == 201
    name = orjson.loads(body)["map"]

    for node in (maker, other):
        for path in (f"/m/{name}", f"/api/maps/{name}/pins", f"/sockjs/{name}/info",
                     f"/m/{name}/extra", f"/api/maps/{name}/nothing", f"/m/{name}x",
                     f"/ws/{name}", f"/sockjs/{name}/000/x/nothing",
                     f"/m/{name}?ttl={name}"):
            await answers.request("GET", node.url + path)
        await answers.request("HEAD", f"{node.url}/m/{name}")
        await answers.request("POST", f"{node.url}/m/{name}")

    # Clients on both nodes, and every kind of bad message.
    views = [await open_view(node.ws_url(name)) for node in (maker, other, maker)]
    for number, view in enumerate(views):
        view.hello(f"person {number} " + "x" * 50)
        view.move(1.0, float(number))
    await views[1].until(lambda pins: len(pins) == 3)
    rude = views[0].client
    for junk in (b"not json", b"[]", b'{"type":"fly"}', b'{"type":"move","lat":99,"lng":0}',
                 b'{"type":"hello","name":""}', b'{"type":"view","bbox":[1]}'):
        rude.send_raw(junk)
    rude.send_raw(b"\x00\x01", binary=True)
    for _ in range(40):  # over the rate limit: errors, then a close if it goes on
        rude.send({"type": "move", "lat": 1, "lng": 2})
    await rude.until(lambda m: m["type"] == "error" and m["code"] == "rate_limited")
    too_big = await connect(other.ws_url(name))
    too_big.send_raw(b'{"type":"hello","name":"' + b"x" * 5000 + b'"}')
    await too_big.wait_closed()

    # SockJS: a session, a broken xhr_send, a broken framed websocket message.
    poller = await sockjs_session(maker.url, "s1", map_name=name)
    await poller.poll()
    await poller.send({"type": "move", "lat": 3, "lng": 3})
    await answers.request("POST", f"{maker.url}/sockjs/{name}/000/s1/xhr_send",
                          data=b'["broken')
    await answers.request("POST", f"{maker.url}/sockjs/{name}/000/s1/xhr_send", data=b"")
    await answers.request("POST", f"{maker.url}/sockjs/{name}/000/unknown/xhr_send",
                          data=b'["x"]')
    framed = await connect(f"ws://127.0.0.1:{other.port}/sockjs/{name}/000/s2/websocket")
    framed.send_raw(b'["a')
    await framed.wait_closed()

    # Phone apps' devices on the map: made on one node, reporting to both;
    # one deleted, then used again. A token is a secret like the name.
    tokens = []
    for node in (maker, other):
        response = await treq.post(f"{node.url}/api/maps/{name}/devices",
                                   data=b'{"name": "Phone"}')
        assert response.code == 201
        tokens.append(orjson.loads(await response.content())["token"])
    basic = base64.b64encode(b"me:" + tokens[0].encode()).decode()
    now = int(time.time())
    for node in (maker, other):
        for method, path, data, headers, status in (
                ("POST", f"/apps/owntracks/{tokens[0]}",
                 b'{"_type":"location","lat":1,"lon":2,"tst":%d}' % now, {}, 200),
                ("POST", "/apps/owntracks", b'{"_type":"location","lat":1,"lon":2,"tst":%d}' % now,
                 {"Authorization": [f"Basic {basic}"]}, 200),
                ("GET", f"/apps/osmand?id={tokens[0]}&lat=1&lon=2&timestamp={now}", b"", {}, 200),
                ("POST", f"/apps/overland?token={tokens[0]}", b'{"locations":[]}', {}, 200),
                ("POST", "/apps/overland", b'{"locations":[]}',
                 {"Authorization": [f"Bearer {tokens[0]}"]}, 200),
                ("POST", f"/apps/owntracks/{tokens[0]}", b"broken", {}, 400),
                ("POST", f"/apps/osmand?id={tokens[0]}&lat=100&lon=2", b"", {}, 400),
                # A fix from the future is skipped and answered 200 (issue 22).
                ("POST", f"/apps/owntracks/{tokens[0]}",
                 b'{"_type":"location","lat":1,"lon":2,"tst":%d}' % (now + 999), {}, 200),
                ("POST", f"/apps/owntracks/{tokens[0]}",
                 b'{"_type":"location","lat":100,"lon":2,"tst":%d}' % now, {}, 400)):
            code, body = await answers.request(method, node.url + path, data=data or None,
                                               headers=headers)
            assert code == status, (method, path, code, node is maker, body)
    assert (await answers.request("DELETE", f"{other.url}/api/devices/{tokens[1]}"))[0] == 204
    for node in (maker, other):
        assert (await answers.request("DELETE", f"{node.url}/api/devices/{tokens[1]}"))[0] == 404
        code, _ = await answers.request("POST", f"{node.url}/apps/owntracks/{tokens[1]}",
                                        data=b'{"_type":"location","lat":1,"lon":2,"tst":%d}' % now)
        assert code == 404
    secrets = [name, *tokens]

    # A client that stops reading on a busy map is closed as too slow.
    slow = StalledSocket(maker.port, f"/ws/{name}")
    await slow.open()
    for seq in range(100):  # moves under the rate limit; snapshots it asks for
        for view in views[1:]:
            view.move(2.0, float(seq % 90), seq=seq)
        for _ in range(20):
            await slow.send({"type": "view", "bbox": None})
        await deferLater(0.15)
        if "closing slow client" in maker.log():
            break
    else:
        raise AssertionError("the slow client was never closed:\n" + maker.log()[-3000:])
    slow.close()

    # The map expires on both nodes; its name is refused everywhere after.
    await views[1].client.wait_closed(timeout=15)
    for node in (maker, other):
        for path in (f"/m/{name}", f"/api/maps/{name}/pins", f"/ws/{name}",
                     f"/sockjs/{name}/info"):
            code, _ = await answers.request("GET", node.url + path)
            assert code == 404
        await answers.request("GET", f"{node.url}/metrics")
        await answers.request("GET", f"{node.url}/healthz")
    for view in views:
        view.client.close()

    logs = []
    for node in (maker, other):
        node.stop()
        logs.append(node.log())
    assert "closing slow client" in logs[0] and "a private map expired" in logs[1]
    assert re.search(r"opened on map ~[0-9a-f]{10}", logs[0])
    assert "device" in logs[0] and "deleted" in logs[1]
    for secret in secrets:
        for text in logs + answers.bodies:
            assert secret not in text, _around(text, secret)
        # Nor any long part of it (a truncated link is still most of one).
        for text in logs + answers.bodies:
            for start in range(0, len(secret) - 12):
                assert secret[start:start + 12] not in text, _around(text, secret[start:start + 12])


def _around(text: str, found: str) -> str:
    at = text.find(found)
    return text[max(0, at - 300):at + 300]


def test_the_check_would_see_a_name() -> None:
    """The search itself works: a line with the name, or most of it, is found."""
    name = "AbCdEfGhIjKlMnOpQrStUvWx"
    for line in (f"client x opened on map {name}", f"GET /m/{name[:14]}"):
        assert any(name[start:start + 12] in line for start in range(0, len(name) - 12))
