"""
SockJS over HTTP, in memory: every HTTP transport, frame type, timer and
limit, through twisted.web's real HTTP channel on a StringTransport, with
time driven by task.Clock.
"""

from __future__ import annotations

import json

import orjson
import pytest
from twisted.internet.task import Clock
from twisted.web.resource import Resource

from livemap_tx.sockjs import (
    CONNECTION_INTERRUPTED,
    SEND_QUEUE_FULL,
    SESSION_TIMED_OUT,
    SockJSResource,
)
from livemap_tx.sockjs.testing import HandlerLog, MemoryClient

NO_CACHE = "no-store, no-cache, no-transform, must-revalidate, max-age=0"


class Service:
    """A SockJS resource mounted at /echo (and /other), with its clock and handlers."""

    def __init__(self, echo: bool = True, **options: object) -> None:
        self.clock = Clock()
        self.log = HandlerLog(echo=echo)
        options.setdefault("response_limit", 4096)
        self.resource = SockJSResource(self.log, self.clock, **options)  # type: ignore[arg-type]
        root = Resource()
        root.putChild(b"echo", self.resource)
        other = Resource()
        other.putChild(b"deep", self.resource)
        root.putChild(b"other", other)
        self.client = MemoryClient(root, self.clock)

    def post(self, path: str, body: bytes = b"", **kw: object):  # type: ignore[no-untyped-def]
        return self.client.post("/echo" + path, body, **kw)

    def get(self, path: str, **kw: object):  # type: ignore[no-untyped-def]
        return self.client.get("/echo" + path, **kw)

    def options(self, path: str, **kw: object):  # type: ignore[no-untyped-def]
        return self.client.options("/echo" + path, **kw)


@pytest.fixture
def svc() -> Service:
    return Service()


def open_polling(svc: Service, sid: str = "s1") -> None:
    r = svc.post(f"/000/{sid}/xhr")
    assert (r.status, r.body) == (200, b"o\n")


# -- static URLs -------------------------------------------------------------


def test_greeting_at_base_url_with_and_without_slash(svc: Service) -> None:
    for path in ["", "/"]:
        r = svc.get(path)
        assert r.status == 200
        assert r.header("content-type") == "text/plain; charset=UTF-8"
        assert r.body == b"Welcome to SockJS!\n"
        assert r.header("set-cookie") is None


@pytest.mark.parametrize("suffix", ["/a", "/a.html", "//", "///", "/a/a", "/a/a/", "/a/"])
def test_unknown_paths_are_404(svc: Service, suffix: str) -> None:
    assert svc.get(suffix).status == 404


@pytest.mark.parametrize("suffix", ["//", "/a./a", "/a/a.", "/./.", "/", "///"])
def test_invalid_session_paths_are_404(svc: Service, suffix: str) -> None:
    assert svc.get(suffix + "/xhr").status == 404
    assert svc.post(suffix + "/xhr").status == 404


@pytest.mark.parametrize("name", ["iframe.html", "iframe-a.html", "iframe-0.1.2.html", "iframe-0.1.2abc-dirty.2144.html"])
def test_iframe_page_is_strongly_cacheable(svc: Service, name: str) -> None:
    r = svc.get("/" + name + "?t=1")
    assert r.status == 200
    assert r.header("content-type") == "text/html; charset=UTF-8"
    assert "public" in r.header("cache-control")
    assert "max-age=31536000" in r.header("cache-control")
    assert r.header("expires")
    assert r.header("etag")
    assert r.header("last-modified") is None
    assert b"SockJS.bootstrap_iframe();" in r.body
    assert r.header("set-cookie") is None


def test_iframe_etag_is_stable_and_answers_304(svc: Service) -> None:
    etag = svc.get("/iframe.html").header("etag")
    assert etag == svc.get("/iframe-x.html").header("etag")
    r = svc.get("/iframe.html", headers={"If-None-Match": etag})
    assert r.status == 304
    assert r.header("content-type") is None
    assert r.body == b""


@pytest.mark.parametrize("name", ["iframe.htm", "iframe", "IFRAME.HTML", "iframe.HTML", "iframe.xml", "iframe-/.html"])
def test_malformed_iframe_urls_are_404(svc: Service, name: str) -> None:
    assert svc.get("/" + name).status == 404


def test_iframe_uses_configured_sockjs_url() -> None:
    svc = Service(sockjs_url="/static/sockjs.min.js")
    assert b'<script src="/static/sockjs.min.js"></script>' in svc.get("/iframe.html").body


# -- /info -------------------------------------------------------------------


def test_info_reports_capabilities_uncached_with_cors(svc: Service) -> None:
    r = svc.get("/info", headers={"Origin": "test"})
    assert r.status == 200
    assert r.header("content-type") == "application/json; charset=UTF-8"
    assert r.header("cache-control") == NO_CACHE
    assert r.header("set-cookie") is None
    assert r.header("access-control-allow-origin") == "test"
    assert r.header("access-control-allow-credentials") == "true"
    data = json.loads(r.body)
    assert data["websocket"] is True
    assert data["cookie_needed"] is False
    assert data["origins"] == ["*:*"]
    assert 0 <= data["entropy"] < 2**32


def test_info_entropy_differs_between_calls(svc: Service) -> None:
    values = {json.loads(svc.get("/info").body)["entropy"] for _ in range(5)}
    assert len(values) > 1


def test_info_flags_follow_options() -> None:
    svc = Service(websocket=False, cookie_needed=True)
    data = json.loads(svc.get("/info").body)
    assert data["websocket"] is False
    assert data["cookie_needed"] is True
    assert svc.get("/info").header("set-cookie") is None


@pytest.mark.parametrize("origin", ["test", "null"])
def test_info_options_preflight_is_cacheable(svc: Service, origin: str) -> None:
    r = svc.options("/info", headers={"Origin": origin, "Access-Control-Request-Method": "GET"})
    assert r.status == 204
    assert r.header("cache-control") == "public, max-age=31536000"
    assert r.header("expires")
    assert int(r.header("access-control-max-age")) == 31536000
    assert r.header("access-control-allow-methods") == "OPTIONS, GET"
    assert r.header("access-control-allow-origin") == origin
    assert r.header("access-control-allow-credentials") == "true"
    assert r.body == b""


def test_cache_expiry_comes_from_the_injected_clock(svc: Service) -> None:
    # Clock() starts at the epoch: a year later is 1971.
    assert svc.options("/000/s/xhr").header("expires") == "Fri, 01 Jan 1971 00:00:00 GMT"
    assert svc.get("/iframe.html").header("expires") == "Fri, 01 Jan 1971 00:00:00 GMT"


# -- xhr-polling --------------------------------------------------------------


def test_xhr_polling_open_send_and_receive(svc: Service) -> None:
    r = svc.post("/000/s1/xhr", headers={"Origin": "test"})
    assert (r.status, r.body) == (200, b"o\n")
    assert r.finished
    assert r.header("content-type") == "application/javascript; charset=UTF-8"
    assert r.header("cache-control") == NO_CACHE
    assert r.header("access-control-allow-origin") == "test"
    assert len(svc.log.handlers) == 1

    r = svc.post("/000/s1/xhr_send", b'["x"]', headers={"Origin": "test"})
    assert r.status == 204
    assert r.body == b""
    assert r.header("content-type") == "text/plain; charset=UTF-8"
    assert r.header("cache-control") == NO_CACHE
    assert svc.log.last.messages == ["x"]

    r = svc.post("/000/s1/xhr")
    assert r.body == b'a["x"]\n'


def test_server_id_is_ignored(svc: Service) -> None:
    open_polling(svc, "s1")
    svc.post("/000/s1/xhr_send", b'["a"]')
    assert svc.post("/999/s1/xhr").body == b'a["a"]\n'


def test_waiting_poll_gets_message_when_it_is_sent(svc: Service) -> None:
    open_polling(svc)
    poll = svc.post("/000/s1/xhr")
    assert not poll.update().finished
    svc.log.last.conn.send("late")
    assert poll.update().body == b'a["late"]\n'
    assert poll.finished


def test_queued_messages_arrive_in_one_frame_in_order(svc: Service) -> None:
    open_polling(svc)
    for word in ["one", "two", "three"]:
        svc.log.last.conn.send(word)
    assert svc.post("/000/s1/xhr").body == b'a["one","two","three"]\n'


def test_send_to_unknown_session_is_404(svc: Service) -> None:
    assert svc.post("/000/nosuch/xhr_send", b'["x"]').status == 404


def test_second_receiver_gets_2010_and_first_keeps_session(svc: Service) -> None:
    open_polling(svc)
    first = svc.post("/000/s1/xhr")
    second = svc.post("/000/s1/xhr")
    assert second.body == b'c[2010,"Another connection still open"]\n'
    assert second.finished
    svc.log.last.conn.send("still yours")
    assert first.update().body == b'a["still yours"]\n'
    assert svc.log.last.lost == []


@pytest.mark.parametrize(
    "ctype",
    ["text/plain", "T", "application/json", "application/xml", "", "application/json; charset=utf-8", "text/xml"],
)
def test_xhr_send_accepts_any_content_type(svc: Service, ctype: str) -> None:
    open_polling(svc)
    assert svc.post("/000/s1/xhr_send", b'["a"]', headers={"Content-Type": ctype}).status == 204
    assert svc.log.last.messages == ["a"]


@pytest.mark.parametrize(
    "body, text",
    [
        (b"", b"Payload expected."),
        (b'["x', b"Broken JSON encoding."),
        (b"{}", b"Payload expected."),
        (b'"x"', b"Payload expected."),
        (b"[1, 2]", b"Broken JSON encoding."),
        (b"\xff\xfe", b"Broken JSON encoding."),
    ],
)
def test_xhr_send_bad_payloads_are_500(svc: Service, body: bytes, text: bytes) -> None:
    open_polling(svc)
    r = svc.post("/000/s1/xhr_send", body)
    assert r.status == 500
    assert text in r.body
    assert svc.log.last.messages == []
    # The session is unharmed.
    assert svc.post("/000/s1/xhr_send", b'["ok"]').status == 204


def test_empty_array_is_a_valid_client_heartbeat(svc: Service) -> None:
    open_polling(svc)
    assert svc.post("/000/s1/xhr_send", b"[]").status == 204
    assert svc.log.last.messages == []


def test_client_unicode_is_decoded(svc: Service) -> None:
    open_polling(svc)
    svc.post("/000/s1/xhr_send", '["\\u2028 \\ud83d\\ude00 é \\u0000"]'.encode())
    assert svc.log.last.messages == ["\u2028 \U0001f600 é \x00"]


def test_server_escapes_what_clients_cannot_take_raw(svc: Service) -> None:
    open_polling(svc)
    svc.log.last.conn.send("\u2028\u200c\ufff0\x01</script>&é")
    body = svc.post("/000/s1/xhr").body
    assert body == b'a["\\u2028\\u200c\\ufff0\\u0001\\u003c/script\\u003e\\u0026\xc3\xa9"]\n'
    assert json.loads(body[1:]) == ["\u2028\u200c\ufff0\x01</script>&é"]


def test_send_encoded_bytes_are_joined_verbatim(svc: Service) -> None:
    open_polling(svc)
    encoded = orjson.dumps('{"type":"update"} ünïcode')
    conn = svc.log.last.conn
    assert conn.send_encoded(encoded)
    assert conn.send_encoded(encoded)
    assert svc.post("/000/s1/xhr").body == b"a[" + encoded + b"," + encoded + b"]\n"


# -- timers ------------------------------------------------------------------


def test_session_expires_after_disconnect_delay_without_receiver(svc: Service) -> None:
    open_polling(svc)
    handler = svc.log.last
    svc.clock.advance(4.9)
    assert handler.lost == []
    assert svc.post("/000/s1/xhr_send", b'["x"]').status == 204
    svc.clock.advance(0.2)
    assert handler.lost == [SESSION_TIMED_OUT]
    assert not handler.conn.writable
    assert svc.post("/000/s1/xhr_send", b'["x"]').status == 404
    # The same id now opens a new session.
    open_polling(svc)
    assert len(svc.log.handlers) == 2


def test_waiting_receiver_keeps_session_alive(svc: Service) -> None:
    svc = Service(heartbeat=1000.0)
    open_polling(svc)
    poll = svc.post("/000/s1/xhr")
    svc.clock.advance(60)
    assert svc.log.last.lost == []
    assert not poll.update().finished
    assert svc.resource.session_count == 1


def test_polling_receiver_gets_heartbeat_after_25s(svc: Service) -> None:
    open_polling(svc)
    poll = svc.post("/000/s1/xhr")
    svc.clock.advance(24.9)
    assert poll.update().body == b""
    svc.clock.advance(0.1)
    assert poll.update().body == b"h\n"
    assert poll.finished


def test_streaming_heartbeats_every_period_only_when_idle(svc: Service) -> None:
    r = svc.post("/000/s1/xhr_streaming")
    assert r.read() == [b"h" * 2048 + b"\n", b"o\n"]
    svc.clock.advance(25)
    assert r.read() == [b"h\n"]
    svc.clock.advance(20)
    svc.log.last.conn.send("busy")
    assert r.read() == [b'a["busy"]\n']
    svc.clock.advance(5)  # 25 s after the last heartbeat, 5 s after data
    assert r.read() == []
    svc.clock.advance(20)  # 25 s after the data
    assert r.read() == [b"h\n"]


def test_heartbeat_interval_is_configurable() -> None:
    svc = Service(heartbeat=3.0)
    r = svc.post("/000/s1/xhr_streaming")
    r.read()
    svc.clock.advance(3)
    assert r.read() == [b"h\n"]


def test_disconnect_delay_is_configurable() -> None:
    svc = Service(disconnect_delay=60.0)
    open_polling(svc)
    svc.clock.advance(59)
    assert svc.log.last.lost == []
    svc.clock.advance(1)
    assert svc.log.last.lost == [SESSION_TIMED_OUT]


# -- streaming transports ------------------------------------------------------


def test_xhr_streaming_prelude_open_and_messages(svc: Service) -> None:
    r = svc.post("/000/s1/xhr_streaming", headers={"Origin": "test"})
    assert r.status == 200
    assert r.header("content-type") == "application/javascript; charset=UTF-8"
    assert r.header("cache-control") == NO_CACHE
    assert r.header("access-control-allow-origin") == "test"
    assert r.read() == [b"h" * 2048 + b"\n", b"o\n"]
    svc.post("/000/s1/xhr_send", b'["x"]')
    assert r.read() == [b'a["x"]\n']
    assert not r.finished


def test_xhr_streaming_closes_after_response_limit_and_session_survives(svc: Service) -> None:
    r = svc.post("/000/s1/xhr_streaming")
    r.read()
    msg = '"' + "x" * 128 + '"'
    for i in range(30):
        svc.post("/000/s1/xhr_send", ("[" + msg + "]").encode())
        assert not r.update().finished, i
    svc.post("/000/s1/xhr_send", ("[" + msg + "]").encode())
    assert r.update().finished  # 2 + 31 * 134 bytes >= 4096
    # Messages sent meanwhile wait for the next request.
    svc.log.last.conn.send("next")
    r2 = svc.post("/000/s1/xhr_streaming")
    assert r2.read()[1:] == [b'a["next"]\n']
    assert len(svc.log.handlers) == 1


def test_default_response_limit_is_128k() -> None:
    svc = Service(response_limit=128 * 1024)
    r = svc.post("/000/s1/xhr_streaming")
    r.read()
    conn = svc.log.last.conn
    chunk = "y" * 1000
    sent = 2
    while not r.update().finished:
        conn.send(chunk)
        sent += 1000 + 6
        assert sent < 128 * 1024 + 2000
    assert sent >= 128 * 1024


def test_eventsource_framing_and_limit(svc: Service) -> None:
    r = svc.get("/000/s1/eventsource")
    assert r.status == 200
    assert r.header("content-type") == "text/event-stream"
    assert r.header("cache-control") == NO_CACHE
    assert r.read() == [b"\r\n", b"data: o\r\n\r\n"]
    svc.post("/000/s1/xhr_send", rb'["  \u0000\n\r "]')
    assert r.read() == [b'data: a["  \\u0000\\n\\r "]\r\n\r\n']
    svc.post("/000/s1/xhr_send", ('["' + "x" * 4096 + '"]').encode())
    r.read()
    assert r.finished


def test_eventsource_null_origin_is_star(svc: Service) -> None:
    r = svc.get("/000/s1/eventsource", headers={"Origin": "null"})
    assert r.header("access-control-allow-origin") == "*"


def test_htmlfile_framing_and_limit(svc: Service) -> None:
    r = svc.get("/000/s1/htmlfile?c=%63allback")
    assert r.status == 200
    assert r.header("content-type") == "text/html; charset=UTF-8"
    assert r.header("cache-control") == NO_CACHE
    prelude, opening = r.read()
    assert len(prelude) > 1024
    assert b"var c = parent.callback;" in prelude
    assert opening == b'<script>\np("o");\n</script>\r\n'
    svc.post("/000/s1/xhr_send", b'["x"]')
    assert r.read() == [b'<script>\np("a[\\"x\\"]");\n</script>\r\n']
    svc.post("/000/s1/xhr_send", ('["' + "x" * 4096 + '"]').encode())
    r.read()
    assert r.finished


def test_htmlfile_cannot_be_broken_out_of(svc: Service) -> None:
    r = svc.get("/000/s1/htmlfile?c=cb")
    r.read()
    svc.log.last.conn.send_encoded(orjson.dumps("</script><script>alert(1)</script>"))
    (frame,) = r.read()
    assert b"</script><script>" not in frame
    assert frame.count(b"</script>") == 1


@pytest.mark.parametrize("transport", ["htmlfile", "jsonp"])
def test_callback_parameter_is_required(svc: Service, transport: str) -> None:
    r = svc.get(f"/a/a/{transport}")
    assert r.status == 500
    assert b'"callback" parameter required' in r.body


@pytest.mark.parametrize("transport", ["htmlfile", "jsonp"])
@pytest.mark.parametrize("callback", ["%20", "*", "abc(", "abc%28", "a" * 33])
def test_invalid_callbacks_are_500(svc: Service, transport: str, callback: str) -> None:
    r = svc.get(f"/a/a/{transport}?c={callback}")
    assert r.status == 500
    assert b'invalid "callback" parameter' in r.body
    assert svc.log.handlers == []


def test_callback_may_use_long_name_parameter(svc: Service) -> None:
    assert svc.get("/000/s1/jsonp?callback=my.cb_1-2").body == b'/**/my.cb_1-2("o");\r\n'


# -- jsonp ---------------------------------------------------------------------


def test_jsonp_polling_and_send(svc: Service) -> None:
    r = svc.get("/000/s1/jsonp?c=%63allback")
    assert r.status == 200
    assert r.header("content-type") == "application/javascript; charset=UTF-8"
    assert r.header("x-content-type-options") == "nosniff"
    assert r.header("cache-control") == NO_CACHE
    assert r.body == b'/**/callback("o");\r\n'
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    r = svc.post("/000/s1/jsonp_send", b"d=%5B%22x%22%5D", headers=form)
    assert (r.status, r.body) == (200, b"ok")
    assert r.header("content-type") == "text/plain; charset=UTF-8"
    assert r.header("cache-control") == NO_CACHE
    r = svc.post("/000/s1/jsonp_send", b'["%61bc"]', headers={"Content-Type": "text/plain"})
    assert r.body == b"ok"
    assert svc.log.last.messages == ["x", "%61bc"]
    assert svc.get("/000/s1/jsonp?c=x").body == b'/**/x("a[\\"x\\",\\"%61bc\\"]");\r\n'


@pytest.mark.parametrize(
    "body, text",
    [
        (b"d=%5B%22x", b"Broken JSON encoding."),
        (b"", b"Payload expected."),
        (b"d=", b"Payload expected."),
        (b"p=p", b"Payload expected."),
        (b"d=%7B%7D", b"Payload expected."),
    ],
)
def test_jsonp_send_bad_payloads_are_500(svc: Service, body: bytes, text: bytes) -> None:
    svc.get("/000/s1/jsonp?c=x")
    r = svc.post("/000/s1/jsonp_send", body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 500
    assert text in r.body


def test_jsonp_send_to_unknown_session_is_404(svc: Service) -> None:
    r = svc.post("/000/nosuch/jsonp_send", b"d=%5B%5D", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 404


# -- closing -------------------------------------------------------------------


def test_app_close_is_served_until_session_expires(svc: Service) -> None:
    open_polling(svc)
    handler = svc.log.last
    handler.conn.close(3000, "Go away!")
    assert not handler.conn.writable
    assert handler.lost == []  # never re-entrantly
    svc.clock.advance(0)
    assert handler.lost == [(3000, "Go away!")]
    for _ in range(2):
        r = svc.post("/000/s1/xhr")
        assert r.body == b'c[3000,"Go away!"]\n'
    assert svc.post("/000/s1/xhr_send", b'["x"]').status == 204
    assert handler.messages == []
    svc.clock.advance(5)
    assert svc.post("/000/s1/xhr").body == b"o\n"
    assert handler.lost == [(3000, "Go away!")]


def test_close_during_streaming_sends_close_frame_and_ends_response(svc: Service) -> None:
    r = svc.post("/000/s1/xhr_streaming")
    r.read()
    svc.log.last.conn.send("bye")
    svc.log.last.conn.close(4001, "custom")
    assert r.read() == [b'a["bye"]\n', b'c[4001,"custom"]\n']
    assert r.finished
    r2 = svc.post("/000/s1/xhr_streaming")
    assert r2.read()[1:] == [b'c[4001,"custom"]\n']
    assert r2.finished


def test_close_from_handler_factory() -> None:
    class Closer:
        def __init__(self, conn):  # type: ignore[no-untyped-def]
            conn.close(3000, "Go away!")

    clock = Clock()
    root = Resource()
    root.putChild(b"close", SockJSResource(Closer, clock))  # type: ignore[arg-type]
    client = MemoryClient(root, clock)
    assert client.post("/close/0/s/xhr").body == b"o\n"
    assert client.post("/close/0/s/xhr").body == b'c[3000,"Go away!"]\n'
    r = client.post("/close/0/t/xhr_streaming")
    assert r.read()[1:] == [b"o\n", b'c[3000,"Go away!"]\n']
    assert r.finished
    clock.advance(0)


def test_aborted_streaming_request_ends_session_at_once(svc: Service) -> None:
    r = svc.post("/000/s1/xhr_streaming")
    handler = svc.log.last
    second = svc.post("/000/s1/xhr_streaming")
    assert second.read()[1:] == [b'c[2010,"Another connection still open"]\n']
    r.abort()
    svc.clock.advance(0)
    assert handler.lost == [CONNECTION_INTERRUPTED]
    r3 = svc.post("/000/s1/xhr_streaming")
    assert r3.read()[1:] == [b"o\n"]
    assert len(svc.log.handlers) == 2


def test_aborted_poll_ends_session(svc: Service) -> None:
    open_polling(svc)
    poll = svc.post("/000/s1/xhr")
    poll.abort()
    svc.clock.advance(0)
    assert svc.log.last.lost == [CONNECTION_INTERRUPTED]
    assert svc.post("/000/s1/xhr").body == b"o\n"


def test_close_all_closes_every_session(svc: Service) -> None:
    open_polling(svc, "a")
    r = svc.post("/000/b/xhr_streaming")
    svc.resource.close_all()
    svc.clock.advance(0)
    assert [h.lost for h in svc.log.handlers] == [[(1001, "Server shutting down")]] * 2
    assert r.read()[-1] == b'c[1001,"Server shutting down"]\n'


# -- cookies, CORS, methods ------------------------------------------------------


@pytest.mark.parametrize(
    "method, transport",
    [("POST", "xhr"), ("POST", "xhr_streaming"), ("GET", "eventsource"), ("GET", "htmlfile?c=x"), ("GET", "jsonp?c=x"), ("OPTIONS", "xhr")],
)
def test_jsessionid_cookie_when_needed(method: str, transport: str) -> None:
    svc = Service(cookie_needed=True)
    r = svc.client.request(method, "/echo/000/s1/" + transport)
    cookie = r.header("set-cookie")
    assert cookie.split(";")[0] == "JSESSIONID=dummy"
    assert cookie.split(";")[1].strip().lower() == "path=/"


def test_jsessionid_cookie_is_echoed() -> None:
    svc = Service(cookie_needed=True)
    r = svc.post("/000/s1/xhr", headers={"Cookie": "JSESSIONID=abcdef"})
    assert r.header("set-cookie").split(";")[0] == "JSESSIONID=abcdef"
    svc.get("/000/s1/jsonp?c=x")
    r = svc.post("/000/s1/jsonp_send", b"d=%5B%5D", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.header("set-cookie").split(";")[0] == "JSESSIONID=dummy"


def test_no_cookie_unless_needed(svc: Service) -> None:
    assert svc.post("/000/s1/xhr", headers={"Cookie": "JSESSIONID=abc"}).header("set-cookie") is None


def test_cors_without_origin_is_star_without_credentials(svc: Service) -> None:
    r = svc.post("/000/s1/xhr")
    assert r.header("access-control-allow-origin") == "*"
    assert r.header("access-control-allow-credentials") is None


def test_cors_request_headers_are_echoed(svc: Service) -> None:
    r = svc.options(
        "/000/s1/xhr",
        headers={"Origin": "test", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "a, b, c"},
    )
    assert r.status == 204
    assert r.header("access-control-allow-headers") == "a, b, c"
    assert r.header("access-control-allow-methods") == "OPTIONS, POST"
    r = svc.options("/000/s1/xhr", headers={"Origin": "test", "Access-Control-Request-Headers": ""})
    assert r.header("access-control-allow-headers") is None


@pytest.mark.parametrize(
    "method, path, allow",
    [
        ("GET", "/000/s1/xhr", "POST, OPTIONS"),
        ("GET", "/000/s1/xhr_send", "POST, OPTIONS"),
        ("GET", "/000/s1/xhr_streaming", "POST, OPTIONS"),
        ("POST", "/000/s1/jsonp", "GET"),
        ("GET", "/000/s1/jsonp_send", "POST"),
        ("POST", "/000/s1/eventsource", "GET"),
        ("POST", "/000/s1/htmlfile", "GET"),
        ("POST", "/000/s1/websocket", "GET"),
        ("POST", "/websocket", "GET"),
        ("POST", "/info", "GET, OPTIONS"),
        ("POST", "/iframe.html", "GET"),
        ("POST", "", "GET"),
        ("PUT", "/000/s1/xhr", "POST, OPTIONS"),
    ],
)
def test_wrong_method_is_405_with_allow(svc: Service, method: str, path: str, allow: str) -> None:
    r = svc.client.request(method, "/echo" + path)
    assert r.status == 405
    assert r.header("allow") == allow
    assert r.header("content-type") is None
    assert r.body == b""


def test_websocket_urls_need_an_upgrade(svc: Service) -> None:
    assert svc.get("/0/0/websocket").status == 400
    r = svc.get("/0/0/websocket", headers={"Upgrade": "WebSocket", "Connection": "close"})
    assert r.status == 400
    r = svc.get("/websocket", headers={"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "7"})
    assert r.status == 400


def test_disabled_websocket_is_404() -> None:
    svc = Service(websocket=False)
    headers = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "x3JJHMbDL1EzLkh9GBhXDw=="}
    assert svc.get("/websocket", headers=headers).status == 404
    assert svc.get("/0/0/websocket", headers=headers).status == 404
    assert svc.log.handlers == []


def test_trailing_slash_is_accepted_on_transport_urls(svc: Service) -> None:
    assert svc.post("/000/s1/xhr/").body == b"o\n"
    assert svc.get("/info/").status == 200


# -- mounting ------------------------------------------------------------------


def test_two_mount_points_never_share_a_session(svc: Service) -> None:
    assert svc.client.post("/echo/0/same/xhr").body == b"o\n"
    assert svc.client.post("/other/deep/0/same/xhr").body == b"o\n"
    first, second = svc.log.handlers
    assert first.conn.prefix == (b"echo",)
    assert second.conn.prefix == (b"other", b"deep")
    svc.client.post("/other/deep/0/same/xhr_send", b'["x"]')
    assert first.messages == [] and second.messages == ["x"]


def test_connection_exposes_opening_request(svc: Service) -> None:
    svc.post(
        "/000/s1/xhr",
        headers={"Origin": "http://m.example", "User-Agent": "ua/1", "X-Forwarded-For": "1.2.3.4", "Cookie": "secret=1"},
    )
    conn = svc.log.last.conn
    assert conn.transport_name == "xhr-polling"
    assert conn.remote_address.host == "10.0.0.7"
    assert conn.headers["origin"] == "http://m.example"
    assert conn.headers["user-agent"] == "ua/1"
    assert conn.headers["x-forwarded-for"] == "1.2.3.4"
    assert "cookie" not in conn.headers
    assert conn.writable


@pytest.mark.parametrize(
    "method, transport, name",
    [("POST", "xhr_streaming", "xhr-streaming"), ("GET", "eventsource", "eventsource"), ("GET", "htmlfile?c=x", "htmlfile"), ("GET", "jsonp?c=x", "jsonp-polling")],
)
def test_transport_names(svc: Service, method: str, transport: str, name: str) -> None:
    svc.client.request(method, "/echo/000/s1/" + transport)
    assert svc.log.last.conn.transport_name == name


# -- limits and flow control -------------------------------------------------------


def test_message_over_max_message_size_closes_session() -> None:
    svc = Service(echo=False, max_message_size=100)
    open_polling(svc)
    ok = "x" * 100
    assert svc.post("/000/s1/xhr_send", json.dumps([ok, "y" * 101, "after"]).encode()).status == 204
    assert svc.log.last.messages == [ok]
    assert svc.post("/000/s1/xhr").body == b'c[1009,"Message too big"]\n'
    svc.clock.advance(0)
    assert svc.log.last.lost == [(1009, "Message too big")]


def test_message_size_counts_utf8_bytes() -> None:
    svc = Service(max_message_size=100)
    open_polling(svc)
    svc.post("/000/s1/xhr_send", json.dumps(["é" * 50]).encode())
    assert svc.log.last.messages == ["é" * 50]
    svc.post("/000/s1/xhr_send", json.dumps(["é" * 51]).encode())
    assert svc.log.last.messages == ["é" * 50]
    assert not svc.log.last.conn.writable


def test_payload_over_max_payload_size_is_413_and_closes() -> None:
    svc = Service(max_payload_size=1000)
    open_polling(svc)
    r = svc.post("/000/s1/xhr_send", json.dumps(["x"] * 300).encode())
    assert r.status == 413
    assert svc.log.last.messages == []
    assert not svc.log.last.conn.writable


def test_polling_queue_pauses_and_resumes_app() -> None:
    svc = Service(outgoing_high_water=1000, outgoing_low_water=100)
    open_polling(svc)
    handler = svc.log.last
    for _ in range(9):
        handler.conn.send("x" * 100)  # 102 bytes each encoded
    assert handler.flow == []
    handler.conn.send("x" * 100)
    assert handler.flow == ["pause"]
    assert handler.conn.paused
    body = svc.post("/000/s1/xhr").body
    assert body.count(b'"' + b"x" * 100 + b'"') == 10
    assert handler.flow == ["pause", "resume"]


def test_send_queue_limit_closes_session_with_1013() -> None:
    svc = Service(outgoing_high_water=1000, send_queue_limit=2000)
    open_polling(svc)
    handler = svc.log.last
    sent = 0
    while handler.conn.send("z" * 98):
        sent += 1
        assert sent < 100
    assert sent == 20  # 20 * 100 bytes fit, the 21st overflows
    svc.clock.advance(0)
    assert handler.lost == [SEND_QUEUE_FULL]
    assert svc.post("/000/s1/xhr").body == b'c[1013,"Send queue full"]\n'


def test_paused_transport_buffers_then_flushes_in_one_frame(svc: Service) -> None:
    r = svc.post("/000/s1/xhr_streaming")
    r.read()
    handler = svc.log.last
    r.pause()
    assert handler.flow == ["pause"]
    handler.conn.send("a")
    handler.conn.send("b")
    assert r.read() == []
    assert handler.conn.buffered_bytes == 6
    svc.clock.advance(25)  # no heartbeat into a full buffer either
    r.resume()
    assert r.read() == [b'a["a","b"]\n']
    assert handler.flow == ["pause", "resume"]


def test_send_after_close_is_refused(svc: Service) -> None:
    open_polling(svc)
    conn = svc.log.last.conn
    conn.close()
    assert conn.send("x") is False
    assert conn.send_encoded(b'"x"') is False


# -- app errors --------------------------------------------------------------------


def test_failing_handler_factory_closes_with_1011() -> None:
    def broken(conn):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")

    clock = Clock()
    root = Resource()
    root.putChild(b"x", SockJSResource(broken, clock))
    client = MemoryClient(root, clock)
    assert client.post("/x/0/s/xhr").body == b"o\n"
    assert client.post("/x/0/s/xhr").body == b'c[1011,"Internal error"]\n'


def test_failing_message_handler_does_not_kill_session(svc: Service) -> None:
    open_polling(svc)
    handler = svc.log.last
    calls = []

    def explode(message: str) -> None:
        calls.append(message)
        raise ValueError(message)

    handler.message_received = explode  # type: ignore[method-assign]
    assert svc.post("/000/s1/xhr_send", b'["a","b"]').status == 204
    assert calls == ["a", "b"]
    assert handler.conn.writable


# -- HTTP versions -------------------------------------------------------------------


def test_http10_streaming_has_no_chunking_and_closes() -> None:
    clock = Clock()
    root = Resource()

    class Closer:
        def __init__(self, conn):  # type: ignore[no-untyped-def]
            conn.close(3000, "Go away!")

    root.putChild(b"close", SockJSResource(Closer, clock))  # type: ignore[arg-type]
    r = MemoryClient(root, clock).request("POST", "/close/0/s/xhr_streaming", http="1.0", headers={"Connection": "Keep-Alive"})
    assert r.header("transfer-encoding") is None
    assert r.header("content-length") is None
    assert r.body.endswith(b'o\nc[3000,"Go away!"]\n')
    assert r.transport.disconnecting
    clock.advance(0)
