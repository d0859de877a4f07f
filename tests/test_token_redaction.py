"""
A device's token never reaches a log line, an error or a metric, however
a request spells it. Spellings are generated (percent-escapes of any
character, doubled and trailing slashes, dot segments, case, the token in
the query) and sent to a real `twistd livemap`: each the router accepts
must reach the same device, and at the end neither the whole log, nor
/metrics, nor any error answer holds the token.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import TwistdServer, start_twistd

MAP = "redaction"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwistdServer]:
    # A high --rate: the spellings come far faster than a phone reports.
    live = start_twistd(tmp_path_factory.mktemp("redaction"), "--pirate", "none",
                        "--rate", "1000")
    yield live
    live.stop()


def request(server: TwistdServer, method: str, target: str,
            body: bytes = b"") -> tuple[int, bytes, dict[str, str]]:
    """`target` exactly as given on the request line (http.client does not normalise it)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.putrequest(method, target, skip_accept_encoding=True)
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, response.read(), dict(response.getheaders())
    finally:
        connection.close()


def percent(char: str, upper: bool) -> str:
    code = "%{:02X}".format(ord(char))
    return code if upper else code.lower()


@st.composite
def spelled_path(draw: Any, path: str) -> str:
    """
    `path` as a client may spell it: characters escaped (any of them, in
    either case of hex), and sometimes letters in another case, repeated
    slashes, dot segments, a trailing slash. (Each of the latter makes the
    router refuse the path, so they are rarer: most spellings should route.)
    """
    rare = {name: draw(st.integers(0, 5)) == 0 for name in ("case", "slashes", "dots", "trailing")}
    escape_share = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    out = []
    for index, char in enumerate(path):
        if char == "/":
            out.append("/" * (draw(st.sampled_from([1, 2, 3])) if rare["slashes"] else 1))
            if index and rare["dots"] and draw(st.booleans()):
                out.append(draw(st.sampled_from(["./", "x/../", "%2e/", ".%2F"])))
            continue
        if draw(st.floats(0, 1)) < escape_share:
            out.append(percent(char, draw(st.booleans())))
        elif rare["case"] and char.isalpha() and draw(st.booleans()):
            out.append(char.swapcase())
        else:
            out.append(char)
    if rare["trailing"]:
        out.append("/")
    return "".join(out)


@st.composite
def spelled_query_value(draw: Any, value: str) -> str:
    return "".join(percent(char, draw(st.booleans())) if draw(st.integers(0, 3)) == 0 else char
                   for char in value)


def make_device(server: TwistdServer) -> dict:
    with urllib.request.urlopen(urllib.request.Request(
            f"{server.url}/api/maps/{MAP}/devices", data=b'{"name":"Secret"}',
            method="POST")) as answer:
        return json.loads(answer.read())


def pin_of(server: TwistdServer, pin_id: str) -> Any:
    with urllib.request.urlopen(f"{server.url}/api/maps/{MAP}/pins") as answer:
        return next((pin for pin in json.loads(answer.read())["pins"] if pin["id"] == pin_id),
                    None)


def test_no_spelling_of_a_device_request_puts_its_token_in_a_log_error_or_metric(
        server: TwistdServer) -> None:
    device = make_device(server)
    token, pin_id = device["token"], device["id"]
    start = int(time.time()) - 600
    fixes = iter(range(1, 10_000))
    errors: list[bytes] = []
    routed: dict[str, int] = {}
    refused: dict[int, int] = {}

    def send(kind: str, target: str) -> None:
        n = next(fixes)
        lat, when = round(10 + n / 1000, 6), start + n
        if kind == "owntracks":
            status, body, _ = request(server, "POST", target, json.dumps(
                {"_type": "location", "lat": lat, "lon": 2.0, "tst": when}).encode())
        elif kind == "overland":
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
            status, body, _ = request(server, "POST", target, json.dumps({"locations": [
                {"type": "Feature", "geometry": {"type": "Point", "coordinates": [2.0, lat]},
                 "properties": {"timestamp": stamp}}]}).encode())
        else:
            status, body, _ = request(server, "GET",
                                      f"{target}&lat={lat}&lon=2.0&timestamp={when}")
        if status == 200:
            pin = pin_of(server, pin_id)
            assert pin is not None and pin["lat"] == lat, (target, pin)  # the same device
            routed[kind] = routed.get(kind, 0) + 1
        else:
            assert status in (308, 400, 401, 404, 405), (target, status, body)
            refused[status] = refused.get(status, 0) + 1
            if status != 308:  # a redirect sends the client its own URL back
                errors.append(body)

    # The spellings of issue 23, then generated ones.
    for target in (f"/apps/%6fwntracks/{token}", f"//apps/owntracks/{token}"):
        send("owntracks", target)

    @settings(max_examples=250, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def spelled(data: Any) -> None:
        kind = data.draw(st.sampled_from(["owntracks", "overland", "overland?token",
                                          "osmand?id"]))
        if kind == "owntracks":
            send(kind, data.draw(spelled_path(f"/apps/owntracks/{token}")))
        elif kind == "overland":
            send(kind, data.draw(spelled_path(f"/apps/overland/{token}")))
        elif kind == "overland?token":
            path = data.draw(spelled_path("/apps/overland"))
            send("overland", f"{path}?token={data.draw(spelled_query_value(token))}")
        else:
            path = data.draw(spelled_path("/apps/osmand"))
            send("osmand", f"{path}?id={data.draw(spelled_query_value(token))}")
    spelled()

    # Both kinds of outcome happened: routed spellings of every kind, refused ones too.
    assert set(routed) == {"owntracks", "overland", "osmand"}, routed
    assert refused.get(404), refused
    # Deleting it by a strange spelling too.
    status, body, _ = request(server, "DELETE", f"/api/%64evices/{token}")
    assert status == 204
    status, body, _ = request(server, "DELETE", f"/api/devices/{token}")
    assert status == 404
    errors.append(body)
    with urllib.request.urlopen(f"{server.url}/metrics") as answer:
        metrics = answer.read()
    time.sleep(0.5)  # the access log is written as each request ends
    log = Path(server.log_path).read_text(errors="replace")
    assert "/apps/owntracks/*" in log  # the requests are logged, with the token hidden
    assert token not in log
    assert token.encode() not in metrics
    assert not [body for body in errors if token.encode() in body]
