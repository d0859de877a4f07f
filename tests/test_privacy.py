"""Privacy: coarsened positions, expired pins, and access logs that keep no map links."""

from __future__ import annotations

import math

import orjson
import pytest
from hypothesis import given, strategies as st
from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from livemap_tx.transports.client import Client
from livemap_tx.hub import Hub
from livemap_tx.privacy import METRES_PER_DEGREE, coarsen
from livemap_tx.http_site import private_log_formatter
from livemap_tx.wire import Move

from test_hub import FakeSubscriber


@given(st.floats(-90, 90), st.floats(-180, 180), st.sampled_from([10.0, 100.0, 1000.0, 25000.0]))
def test_coarsened_positions_are_valid_and_near(lat, lng, metres):
    c_lat, c_lng = coarsen(lat, lng, metres)
    assert -90 <= c_lat <= 90 and -180 <= c_lng <= 180
    assert abs(c_lat - lat) * METRES_PER_DEGREE <= metres / 2 + 1
    if abs(c_lat) < 80:
        d_lng = min(abs(c_lng - lng), 360 - abs(c_lng - lng))
        assert d_lng * METRES_PER_DEGREE * math.cos(math.radians(c_lat)) <= metres


def test_nearby_positions_snap_to_the_same_point():
    assert coarsen(48.85837, 2.29448, 1000) == coarsen(48.85839, 2.29452, 1000)
    assert coarsen(1.0, 2.0, 0) == (1.0, 2.0)


def pins_of(hub):
    return hub.pins("m")


def test_server_precision_is_applied_before_storing():
    hub = Hub(Clock())
    client = Client(hub, "m", FakeSubscriber(), precision=1000)
    client.message_received(b'{"type":"move","lat":48.85837,"lng":2.29448,"accuracy":5}')
    [pin] = pins_of(hub)
    assert (pin["lat"], pin["lng"]) == coarsen(48.85837, 2.29448, 1000)
    assert pin["accuracy"] == 1000


def test_client_may_ask_for_coarser_but_not_finer():
    hub = Hub(Clock())
    client = Client(hub, "m", FakeSubscriber(), precision=100)
    client.message_received(b'{"type":"hello","name":"A","precision":5000}')
    client.message_received(b'{"type":"move","lat":48.85837,"lng":2.29448}')
    assert pins_of(hub)[0]["accuracy"] == 5000
    client.message_received(b'{"type":"hello","name":"A","precision":1}')
    client.limiter.tokens = 5
    client.message_received(b'{"type":"move","lat":48.85837,"lng":2.29448}')
    assert pins_of(hub)[0]["accuracy"] == 100


def test_hello_precision_is_validated():
    hub = Hub(Clock())
    out = FakeSubscriber()
    client = Client(hub, "m", out)
    out.take()
    client.message_received(b'{"type":"hello","name":"A","precision":-1}')
    client.message_received(b'{"type":"hello","name":"A","precision":"far"}')
    assert [m["code"] for m in out.take()] == ["out_of_range", "bad_message"]


def test_pins_without_a_fresh_fix_expire_and_come_back_on_the_next_move():
    clock = Clock()
    hub = Hub(clock)
    watcher_out = FakeSubscriber()
    hub.join("m", watcher_out)
    mover = hub.join("m", FakeSubscriber())
    mover.move(Move(1.0, 2.0, None, None, 1))
    clock.advance(100)
    assert hub.expire_pins(max_age=3600) == 0
    clock.advance(3600)
    assert hub.expire_pins(max_age=3600) == 1
    clock.advance(1)
    assert orjson.loads(watcher_out.frames[-1].payload)["gone"] == [mover.id]
    assert mover.pin is None and hub.pins("m") == []
    mover.move(Move(1.0, 2.0, None, None, 2))
    assert hub.pins("m")[0]["seq"] == 2
    # Its version goes on from the expired pin's, so other nodes take it.
    assert mover.pin.version == 2


@pytest.mark.parametrize("uri, logged", [
    (b"/m/SeCrEtNaMe123?ttl=5", "/m/*"), (b"/ws/team", "/ws/*"),
    (b"/sockjs/abc/000/xyz/xhr", "/sockjs/*/000/xyz/xhr"), (b"/m/public", "/m/public"),
    (b"/api/maps/abc/pins", "/api/maps/*/pins"), (b"/static/app.js?v=1", "/static/app.js"),
])
def test_access_log_keeps_no_map_names_or_query_strings(uri, logged):
    request = DummyRequest([b""])
    request.uri = uri
    request.method = b"GET"
    request.clientproto = b"HTTP/1.1"
    request.code = 200
    request.sentLength = 10
    request.requestHeaders.setRawHeaders(b"referer", [b"http://x/m/SeCrEtNaMe123"])
    line = private_log_formatter("[ts]", request)
    assert f'"GET {logged} HTTP/1.1" 200 10' in line
    assert "SeCrEt" not in line and "ttl" not in line


def test_sockjs_transport_requests_are_not_access_logged(monkeypatch):
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from livemap_tx.http_site import make_site

    logged = []
    monkeypatch.setattr(Site, "log", lambda self, request: logged.append(request.uri))
    site = make_site(Resource(), reactor)
    for uri in (b"/sockjs/public/000/abc/xhr_send", b"/m/public", b"/sockjs/public/info"):
        request = DummyRequest([b""])
        request.uri = uri
        site.log(request)
    assert logged == [b"/m/public"]


def test_sockjs_requests_are_logged_when_asked_for(monkeypatch):
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from livemap_tx.http_site import make_site

    logged = []
    monkeypatch.setattr(Site, "log", lambda self, request: logged.append(request.uri))
    site = make_site(Resource(), reactor, log_sockjs=True)
    request = DummyRequest([b""])
    request.uri = b"/sockjs/public/000/abc/xhr_send"
    site.log(request)
    assert logged == [request.uri]
