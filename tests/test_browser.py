"""
The map page in a real headless Chromium against a real `twistd livemap`.

Playwright's sync API blocks, so the server runs as a subprocess (the
`twistd_server` fixture). Nothing leaves the machine: map tiles are answered
with a small local PNG (or aborted, to play "no internet"), and any other
request to a host that is not the server fails the test.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import struct
import time
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence
from urllib.parse import urlsplit

import pytest

sync_api = pytest.importorskip("playwright.sync_api")
from playwright.sync_api import Browser, BrowserContext, Page, expect  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
ROOT = Path(__file__).resolve().parent.parent
# Generous: waits end as soon as the page gets there; this only bounds a hang.
WAIT_MS = 20_000

BERLIN = {"latitude": 52.5200, "longitude": 13.4050, "accuracy": 12}
NEARBY = {"latitude": 52.5155, "longitude": 13.3940, "accuracy": 20}

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason="Debian chromium is not installed")


def tile_png(size: int = 256) -> bytes:
    """A made-up street tile (land, a park, a grid of roads): offline, yet it reads as a map."""
    land, park, casing, road = (242, 239, 233), (205, 235, 176), (214, 208, 200), (255, 255, 255)

    def colour(x: int, y: int) -> tuple[int, int, int]:
        for centre, half in ((64, 5), (192, 5), (128, 2)):
            for v in (x, y):
                distance = abs(v - centre)
                if distance <= half:
                    return road
                if distance <= half + 1:
                    return casing
        if 140 <= x <= 180 and 140 <= y <= 180:
            return park
        return land

    rows = b"".join(b"\x00" + b"".join(bytes(colour(x, y)) for x in range(size))
                    for y in range(size))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))


TILE = tile_png()


def is_tile(url: str) -> bool:
    return urlsplit(url).hostname == "tile.openstreetmap.org"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def base_url(request: pytest.FixtureRequest) -> str:
    """The server under test: LIVEMAP_TEST_URL if set (a server run by hand), else twistd."""
    given = os.environ.get("LIVEMAP_TEST_URL")
    if given:
        return given.rstrip("/")
    return request.getfixturevalue("twistd_server").url


@pytest.fixture
def map_name() -> str:
    """A map of this test's own, so tests never see each other's pins."""
    return "t-" + secrets.token_hex(6)


@dataclass
class Viewer:
    """One person: a browser context with its page and everything that went wrong in it."""

    context: BrowserContext
    page: Page
    problems: list[str] = field(default_factory=list)
    third_party: list[str] = field(default_factory=list)

    def state(self) -> dict[str, Any]:
        return self.page.evaluate("window.livemap.state()")

    def pin(self, pin_id: str) -> Optional[dict[str, Any]]:
        return self.page.evaluate("(id) => window.livemap.pin(id)", pin_id)

    def wait(self, predicate: str, arg: Any = None) -> None:
        self.page.wait_for_function(predicate, arg=arg, timeout=WAIT_MS)

    def own_id(self) -> str:
        self.wait("() => window.livemap && window.livemap.state().connected")
        return self.state()["id"]

    def assert_clean(self) -> None:
        assert self.problems == [], "\n".join(self.problems)
        assert self.third_party == [], f"third-party requests: {self.third_party}"


def open_viewer(browser: Browser, url: str, *, geolocation: Optional[dict] = None,
                grant: bool = True, name: Optional[str] = None, tiles: str = "local",
                viewport: Optional[dict] = None, mobile: bool = False,
                scale: Optional[float] = None, color_scheme: str = "light",
                permissions: Sequence[str] = (),
                before_load: Optional[Callable[[Page], None]] = None) -> Viewer:
    """Open the page in a fresh context, watching for errors and stray requests."""
    context = browser.new_context(
        geolocation=geolocation,
        permissions=(["geolocation"] if grant else []) + list(permissions),
        viewport=viewport or {"width": 1100, "height": 640}, locale="en-US",
        is_mobile=mobile, has_touch=mobile, device_scale_factor=scale,
        color_scheme=color_scheme)
    if name is not None:
        context.add_init_script(f"localStorage.setItem('livemap.name', {json.dumps(name)})")
    page = context.new_page()
    viewer = Viewer(context, page)
    server_host = urlsplit(url).hostname

    def route(route: Any) -> None:
        request_url = route.request.url
        if is_tile(request_url):
            if tiles == "local":
                route.fulfill(status=200, content_type="image/png", body=TILE)
            else:
                route.abort("internetdisconnected")
        elif urlsplit(request_url).scheme in ("http", "https") and \
                urlsplit(request_url).hostname != server_host:
            viewer.third_party.append(request_url)
            route.abort()
        else:
            route.continue_()

    def on_console(message: Any) -> None:
        if message.type != "error":
            return
        if tiles != "local" and is_tile(message.location.get("url", "")):
            return  # the expected noise of playing offline
        viewer.problems.append(f"console error: {message.text} at {message.location}")

    def on_failed(request: Any) -> None:
        # Leaflet cancels tile loads it no longer needs; tiles are not the page.
        if not is_tile(request.url):
            viewer.problems.append(f"request failed: {request.url} ({request.failure})")

    def on_response(response: Any) -> None:
        if response.status >= 400:
            viewer.problems.append(f"HTTP {response.status}: {response.url}")

    context.route("**/*", route)
    page.on("console", on_console)
    page.on("pageerror", lambda error: viewer.problems.append(f"page error: {error}"))
    page.on("requestfailed", on_failed)
    page.on("response", on_response)
    page.on("dialog", lambda dialog: (viewer.problems.append(f"dialog: {dialog.message}"),
                                      dialog.dismiss()))
    if before_load is not None:
        before_load(page)
    # Not "load": a SockJS iframe transport (htmlfile) started before the
    # page's load event can hold that event back for as long as it streams.
    page.goto(url, wait_until="domcontentloaded")
    return viewer


def pin_centre(viewer: Viewer, pin_id: str) -> tuple[float, float]:
    box = viewer.page.locator(f'[data-pin-id="{pin_id}"]').bounding_box()
    assert box is not None
    return box["x"] + box["width"] / 2, box["y"] + box["height"] / 2


def assert_in_free_area(viewer: Viewer, pin_ids: Sequence[str]) -> None:
    """Each pin is on screen where no panel or button covers it."""
    free = viewer.state()["free"]
    for pin_id in pin_ids:
        x, y = pin_centre(viewer, pin_id)
        assert free["left"] < x < free["right"] and free["top"] < y < free["bottom"], (
            f"pin {pin_id} at {(x, y)} is outside the free part of the map {free}")


def test_two_viewers_see_each_other_move_and_leave(
        browser: Browser, base_url: str, map_name: str) -> None:
    """The core promise: every viewer sees every pin, live, and pins go when people go."""
    two_viewers_see_each_other_move_and_leave(browser, base_url, map_name)


def two_viewers_see_each_other_move_and_leave(
        browser: Browser, base_url: str, map_name: str,
        screenshot: Optional[Path] = None) -> None:
    """The scenario, also run against a server installed from the wheel (test_packaging.py)."""
    url = f"{base_url}/m/{map_name}"
    ada = open_viewer(browser, url, geolocation=BERLIN, name="Ada")
    ada_id = ada.own_id()
    # Ada is alone when she arrives: her first fix shows her at street level.
    expect(ada.page.locator(f'[data-pin-id="{ada_id}"].mine')).to_have_count(1, timeout=WAIT_MS)
    grace = open_viewer(browser, url, geolocation=NEARBY, mobile=True,
                        viewport={"width": 390, "height": 780})
    grace_id = grace.own_id()
    assert ada_id != grace_id
    grace.page.fill("#name", "Grace")  # a name typed in is sent as hello

    for viewer, own in ((ada, ada_id), (grace, grace_id)):
        expect(viewer.page.locator("[data-pin-id]")).to_have_count(2, timeout=WAIT_MS)
        mine = viewer.page.locator("[data-pin-id].mine")
        expect(mine).to_have_count(1)
        expect(mine).to_have_attribute("data-pin-id", own)
        expect(viewer.page.locator("#count")).to_have_text("2 people")
        expect(viewer.page.locator("#status")).to_have_text("connected \u00b7 WebSocket")
        assert sorted(viewer.state()["pins"]) == sorted([ada_id, grace_id])
        assert viewer.state()["transport"] == "websocket"
    expect(grace.page.locator(f'[data-pin-id="{ada_id}"] .pin-label')).to_have_text("Ada")
    expect(ada.page.locator(f'[data-pin-id="{grace_id}"] .pin-label')).to_have_text(
        "Grace", timeout=WAIT_MS)
    # The first fix centres the map on the viewer (in the part no panel
    # covers), close enough to see a street; Grace's arrival moved nothing.
    x, y = pin_centre(ada, ada_id)
    middle = ada.state()["middle"]
    assert abs(x - middle["x"]) <= 2 and abs(y - middle["y"]) <= 2, (x, y, middle)
    assert ada.state()["zoom"] == 15
    # Grace arrived second: her view fits both of them.
    assert_in_free_area(grace, [ada_id, grace_id])

    # A compass heading turns the dot into an arrow for everyone.
    ada.page.evaluate("""window.dispatchEvent(new DeviceOrientationEvent(
        'deviceorientationabsolute', {alpha: 300, beta: 0, gamma: 0, absolute: true}))""")
    grace.wait("(id) => { const p = window.livemap.pin(id); return p && p.heading === 60; }",
               ada_id)
    arrow = grace.page.locator(f'[data-pin-id="{ada_id}"] .pin-arrow')
    expect(arrow).to_be_visible()
    expect(arrow).to_have_attribute("style", "transform: rotate(60deg);")
    expect(grace.page.locator(f'[data-pin-id="{grace_id}"] .pin-dot')).to_be_visible()

    # "Show everyone": both pins with their names, in view.
    expect(ada.page.get_by_role("button", name="Show everyone")).to_be_visible()
    ada.page.click("#fit-all")
    ada.page.wait_for_timeout(800)  # let the fly-to animation settle; not an assertion
    if screenshot is not None:
        ada.page.screenshot(path=str(screenshot))
    assert_in_free_area(ada, [ada_id, grace_id])

    # Ada moves; Grace sees the same pin object move, not a new one.
    before = pin_centre(grace, ada_id)
    ada.context.set_geolocation({"latitude": 52.5230, "longitude": 13.4130})
    grace.wait("(id) => { const p = window.livemap.pin(id);"
               " return p && Math.abs(p.lat - 52.523) < 1e-9 && Math.abs(p.lng - 13.413) < 1e-9; }",
               ada_id)
    after = pin_centre(grace, ada_id)
    assert after[0] > before[0] and after[1] < before[1], (before, after)  # north-east
    expect(grace.page.locator("[data-pin-id]")).to_have_count(2)

    # A name with HTML in it is text, on every screen.
    evil = "<img src=x onerror=alert(1)><b>bold</b>"
    ada.page.fill("#name", evil)
    ada.page.press("#name", "Enter")
    label = grace.page.locator(f'[data-pin-id="{ada_id}"] .pin-label')
    expect(label).to_have_text(evil, timeout=WAIT_MS)
    assert grace.page.locator(".leaflet-marker-pane img, .leaflet-marker-pane b").count() == 0
    expect(ada.page.locator(".mine .pin-label")).to_have_text(evil, timeout=WAIT_MS)
    assert ada.page.evaluate("localStorage.getItem('livemap.name')") == evil

    for viewer in (ada, grace):
        viewer.assert_clean()

    # Grace leaves; her pin leaves Ada's map.
    grace.context.close()
    expect(ada.page.locator(f'[data-pin-id="{grace_id}"]')).to_have_count(0, timeout=WAIT_MS)
    expect(ada.page.locator("[data-pin-id]")).to_have_count(1)
    expect(ada.page.locator("#count")).to_have_text("1 person")
    assert ada.state()["pins"] == [ada_id]
    ada.assert_clean()
    ada.context.close()


def test_denied_location_lets_the_user_place_themselves(
        browser: Browser, base_url: str, map_name: str) -> None:
    """No permission and no internet: the page says so and a tap on the map places the pin."""
    viewer = open_viewer(browser, f"{base_url}/m/{map_name}", grant=False, tiles="offline")
    notice = viewer.page.locator("#notice")
    expect(notice).to_be_visible(timeout=WAIT_MS)
    expect(notice).to_contain_text("Tap the map to place yourself")
    own = viewer.own_id()
    expect(viewer.page.locator("[data-pin-id]")).to_have_count(0)

    viewer.page.mouse.click(550, 330)
    mine = viewer.page.locator(f'[data-pin-id="{own}"].mine')
    expect(mine).to_have_count(1, timeout=WAIT_MS)
    expect(notice).to_be_hidden()
    x, y = pin_centre(viewer, own)
    assert abs(x - 550) <= 2 and abs(y - 330) <= 2, (x, y)
    pin = viewer.pin(own)
    assert pin is not None and pin["accuracy"] is None and pin["heading"] is None

    # Another tap moves the same pin.
    viewer.page.mouse.click(300, 400)
    viewer.wait("(id) => { const b = document.querySelector(`[data-pin-id='${id}']`)"
                ".getBoundingClientRect(); return Math.abs(b.x + b.width / 2 - 300) <= 2; }", own)
    expect(viewer.page.locator("[data-pin-id]")).to_have_count(1)
    viewer.assert_clean()
    viewer.context.close()


class WebSocketTap:
    """
    Stands between the page and the server's WebSocket (Playwright's
    route_web_socket): records what the page sends on each connection, and
    can cut a connection or refuse them all, as a flaky network would.
    """

    def __init__(self, refuse: bool = False, refuse_first: int = 0) -> None:
        self.refuse = refuse
        self.refuse_first = refuse_first
        self.connections: list[dict[str, Any]] = []

    def install(self, page: Page) -> None:
        page.route_web_socket(re.compile(r"/ws/"), self._handle)

    def _handle(self, route: Any) -> None:
        if self.refuse or len(self.connections) < self.refuse_first:
            self.connections.append({"route": route, "server": None, "sent": []})
            route.close(code=1011, reason="blocked by the test")
            return
        server = route.connect_to_server()
        record: dict[str, Any] = {"route": route, "server": server, "sent": []}
        self.connections.append(record)

        def from_page(message: str | bytes) -> None:
            record["sent"].append(json.loads(message))
            server.send(message)
        route.on_message(from_page)

    def moves(self, connection: int = -1) -> list[dict[str, Any]]:
        return [m for m in self.connections[connection]["sent"] if m["type"] == "move"]

    def cut(self, connection: int = -1) -> None:
        record = self.connections[connection]
        record["server"].close(code=1000)
        record["route"].close(code=1001, reason="going away")


def until(page: Page, condition: Callable[[], bool], what: str) -> None:
    """Let Playwright deliver events until `condition` holds (bounded, never timed)."""
    for _ in range(WAIT_MS // 50):
        if condition():
            return
        page.wait_for_timeout(50)
    raise AssertionError(f"gave up waiting for {what}")


def set_compass(page: Page, heading: float) -> None:
    page.evaluate("""(alpha) => window.dispatchEvent(new DeviceOrientationEvent(
        'deviceorientationabsolute', {alpha, beta: 0, gamma: 0, absolute: true}))""",
                  (360 - heading) % 360)


def test_moves_are_throttled_and_small_turns_are_not_sent(
        browser: Browser, base_url: str, map_name: str) -> None:
    """At most `rate` moves a second with the latest state last; turns under 5 degrees stay home."""
    tap = WebSocketTap()
    viewer = open_viewer(browser, f"{base_url}/m/{map_name}", geolocation=BERLIN,
                         before_load=tap.install)
    viewer.own_id()
    until(viewer.page, lambda: len(tap.moves()) >= 1, "the first move")
    first = tap.moves()[0]
    assert (first["lat"], first["lng"], first["accuracy"]) == (52.52, 13.405, 12)
    assert first["heading"] is None

    set_compass(viewer.page, 100)
    until(viewer.page, lambda: tap.moves()[-1]["heading"] == 100, "heading 100")
    sent_before = len(tap.moves())
    viewer.page.wait_for_timeout(300)  # leave the throttle window, so a send would be at once

    # 3 degrees: nothing. The hello right after marks the point a move would have been sent by.
    set_compass(viewer.page, 103)
    viewer.page.fill("#name", "marker")
    viewer.page.press("#name", "Enter")
    sent = tap.connections[-1]["sent"]
    until(viewer.page, lambda: sent[-1] == {"type": "hello", "name": "marker"}, "the hello")
    assert len(tap.moves()) == sent_before
    set_compass(viewer.page, 106)  # 6 degrees from what was sent: goes
    until(viewer.page, lambda: tap.moves()[-1]["heading"] == 106, "heading 106")
    viewer.page.wait_for_timeout(300)

    # Thirty turns in one go: the first is sent at once, the rest coalesce into the last.
    burst_start = len(tap.moves())
    viewer.page.evaluate("""() => { for (let i = 1; i <= 30; i++) {
        window.dispatchEvent(new DeviceOrientationEvent('deviceorientationabsolute',
            {alpha: (360 - (106 + 10 * i) % 360) % 360, beta: 0, gamma: 0, absolute: true}));
    } }""")
    final = (106 + 300) % 360
    until(viewer.page, lambda: tap.moves()[-1]["heading"] == final, "the trailing move")
    burst = tap.moves()[burst_start:]
    assert [m["heading"] for m in burst] == [116, final]
    viewer.page.fill("#name", "marker two")
    viewer.page.press("#name", "Enter")
    until(viewer.page, lambda: sent[-1] == {"type": "hello", "name": "marker two"}, "a hello")
    assert len(tap.moves()) == burst_start + 2

    seqs = [m["seq"] for m in tap.moves()]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    viewer.assert_clean()
    viewer.context.close()


def test_reconnects_after_a_drop_and_says_who_and_where_again(
        browser: Browser, base_url: str, map_name: str) -> None:
    """A dropped connection keeps the own pin (not live), backs off, and rebuilds from a welcome."""
    tap = WebSocketTap()
    viewer = open_viewer(browser, f"{base_url}/m/{map_name}", geolocation=BERLIN,
                         name="Ada", before_load=tap.install)
    first_id = viewer.own_id()
    expect(viewer.page.locator(".mine")).to_have_count(1, timeout=WAIT_MS)

    tap.cut()
    expect(viewer.page.locator("#status")).to_contain_text("reconnecting in", timeout=WAIT_MS)
    expect(viewer.page.locator(f'[data-pin-id="{first_id}"].mine')).to_have_count(1)
    expect(viewer.page.locator("body")).to_have_class(re.compile(r"\bnot-live\b"))
    state = viewer.state()
    assert state["connected"] is False and state["notLive"] is True

    viewer.wait("(old) => { const s = window.livemap.state();"
                " return s.connected && s.id !== old && s.pins.includes(s.id); }", first_id)
    assert len(tap.connections) == 2
    sent = tap.connections[1]["sent"]
    assert {"type": "hello", "name": "Ada"} in sent
    assert [(m["lat"], m["lng"]) for m in tap.moves(1)] == [(52.52, 13.405)]
    expect(viewer.page.locator(f'[data-pin-id="{first_id}"]')).to_have_count(0)
    expect(viewer.page.locator(".mine .pin-label")).to_have_text("Ada", timeout=WAIT_MS)
    expect(viewer.page.locator("#status")).to_have_text("connected \u00b7 WebSocket")
    expect(viewer.page.locator("body")).not_to_have_class(re.compile(r"\bnot-live\b"))
    viewer.assert_clean()
    viewer.context.close()


def test_forced_websocket_does_not_fall_back(
        browser: Browser, base_url: str, map_name: str) -> None:
    """?transport=websocket means exactly that: a blocked WebSocket is retried, not replaced."""
    tap = WebSocketTap(refuse=True)
    viewer = open_viewer(browser, f"{base_url}/m/{map_name}?transport=websocket",
                         geolocation=BERLIN, before_load=tap.install)
    sockjs_requests: list[str] = []
    viewer.page.on("request", lambda r: "sockjs" in r.url and sockjs_requests.append(r.url))
    expect(viewer.page.locator("#status")).to_contain_text("reconnecting in", timeout=WAIT_MS)
    until(viewer.page, lambda: len(tap.connections) >= 2, "a second try")
    assert sockjs_requests == []
    assert viewer.state()["connected"] is False
    viewer.assert_clean()
    viewer.context.close()


def test_one_refused_websocket_is_no_reason_to_leave_it(
        browser: Browser, base_url: str, map_name: str) -> None:
    """A server back from a restart may refuse the upgrade and answer a moment later."""
    tap = WebSocketTap(refuse_first=1)
    viewer = open_viewer(browser, f"{base_url}/m/{map_name}", geolocation=BERLIN,
                         before_load=tap.install)
    sockjs_requests: list[str] = []
    viewer.page.on("request", lambda r: "sockjs" in r.url and sockjs_requests.append(r.url))
    viewer.own_id()
    expect(viewer.page.locator("#status")).to_have_text("connected \u00b7 WebSocket")
    assert len(tap.connections) == 2 and sockjs_requests == []
    viewer.assert_clean()
    viewer.context.close()


def require_sockjs(base_url: str, map_name: str) -> None:
    try:
        with urllib.request.urlopen(f"{base_url}/sockjs/{map_name}/info", timeout=5) as response:
            if response.status == 200:
                return
    except OSError:
        pass
    pytest.skip("this server does not serve SockJS yet")


def see_each_other(one: Viewer, other: Viewer) -> tuple[str, str]:
    one_id, other_id = one.own_id(), other.own_id()
    for viewer in (one, other):
        viewer.wait("(ids) => { const s = window.livemap.state();"
                    " return ids.every((id) => s.pins.includes(id)); }", [one_id, other_id])
        expect(viewer.page.locator("[data-pin-id]")).to_have_count(2)
    return one_id, other_id


def test_blocked_websocket_falls_back_to_sockjs_unnoticed(
        browser: Browser, base_url: str, map_name: str) -> None:
    """A network that refuses WebSocket gets SockJS, and stays on it once it worked."""
    require_sockjs(base_url, map_name)
    url = f"{base_url}/m/{map_name}"
    tap = WebSocketTap(refuse=True)
    blocked = open_viewer(browser, url, geolocation=BERLIN, name="Behind a proxy",
                          before_load=tap.install)
    direct = open_viewer(browser, url, geolocation=NEARBY)
    blocked_id, direct_id = see_each_other(blocked, direct)
    state = blocked.state()
    assert state["sockjs"] is True and state["transport"] == "xhr-streaming"
    expect(blocked.page.locator("#status")).to_have_text("connected \u00b7 SockJS xhr-streaming")
    expect(direct.page.locator(f'[data-pin-id="{blocked_id}"] .pin-label')).to_have_text(
        "Behind a proxy", timeout=WAIT_MS)
    assert len(tap.connections) == 2  # WebSocket is tried twice before SockJS

    blocked.context.set_geolocation({"latitude": 52.5210, "longitude": 13.4070})
    direct.wait("(id) => { const p = window.livemap.pin(id);"
                " return p && Math.abs(p.lat - 52.521) < 1e-9; }", blocked_id)
    direct.context.set_geolocation({"latitude": 52.5160, "longitude": 13.3950})
    blocked.wait("(id) => { const p = window.livemap.pin(id);"
                 " return p && Math.abs(p.lat - 52.516) < 1e-9; }", direct_id)

    # A send that fails drops the session; the reconnect is SockJS again, no new WebSocket try.
    xhr_send = re.compile(r"/xhr_send(\?|$)")
    blocked.page.route(xhr_send, lambda route: route.abort())
    blocked.context.set_geolocation({"latitude": 52.5220, "longitude": 13.4080})
    expect(blocked.page.locator("#status")).to_contain_text("reconnecting in", timeout=WAIT_MS)
    blocked.page.unroute(xhr_send)
    blocked.wait("([old, other]) => { const s = window.livemap.state();"
                 " return s.connected && s.id !== old && s.pins.includes(s.id)"
                 " && s.pins.includes(other); }", [blocked_id, direct_id])
    # The failed send is this test's doing, and so is the old session's
    # stream, which the client aborts when it gives that session up (Playwright
    # may report that abort after the page already said "reconnecting").
    blocked.problems[:] = [p for p in blocked.problems if not re.search(
        r"/sockjs/.*/xhr_(send|streaming)\b", p)]
    assert blocked.state()["transport"] == "xhr-streaming"
    assert len(tap.connections) == 2
    for viewer in (blocked, direct):
        viewer.assert_clean()
        viewer.context.close()


@pytest.mark.parametrize("transport", ["xhr-streaming", "xhr-polling", "eventsource",
                                       "htmlfile", "jsonp-polling", "sockjs-websocket"])
def test_forced_sockjs_transport(
        browser: Browser, base_url: str, map_name: str, transport: str) -> None:
    """?transport=NAME uses SockJS with only that transport, and it carries the whole protocol."""
    require_sockjs(base_url, map_name)
    url = f"{base_url}/m/{map_name}"
    viewer = open_viewer(browser, f"{url}?transport={transport}", geolocation=BERLIN)
    other = open_viewer(browser, url, geolocation=NEARBY, name="Other")
    viewer_id, other_id = see_each_other(viewer, other)
    name = transport.removeprefix("sockjs-")
    assert viewer.state()["transport"] == name and viewer.state()["sockjs"] is True
    expect(viewer.page.locator("#status")).to_have_text(f"connected \u00b7 SockJS {name}")
    expect(viewer.page.locator(f'[data-pin-id="{other_id}"] .pin-label')).to_have_text(
        "Other", timeout=WAIT_MS)
    other.context.set_geolocation({"latitude": 52.5170, "longitude": 13.3960})
    viewer.wait("(id) => { const p = window.livemap.pin(id);"
                " return p && Math.abs(p.lat - 52.517) < 1e-9; }", other_id)
    viewer.assert_clean()
    other.assert_clean()
    other.context.close()
    expect(viewer.page.locator("[data-pin-id]")).to_have_count(1, timeout=WAIT_MS)
    viewer.context.close()


IOS_COMPASS = """
// Play iOS Safari: no absolute-orientation event, and a compass that needs a tap to ask.
delete window.ondeviceorientationabsolute;
window.compassAsked = 0;
DeviceOrientationEvent.requestPermission = () => {
  window.compassAsked += 1;
  return Promise.resolve('granted');
};
"""


def test_ios_compass_needs_a_tap_then_gives_the_heading(
        browser: Browser, base_url: str, map_name: str) -> None:
    """On iOS the compass button asks for permission; webkitCompassHeading then turns the arrow."""
    tap = WebSocketTap()

    def prepare(page: Page) -> None:
        page.add_init_script(IOS_COMPASS)
        tap.install(page)

    viewer = open_viewer(browser, f"{base_url}/m/{map_name}", geolocation=BERLIN,
                         mobile=True, viewport={"width": 390, "height": 780},
                         before_load=prepare)
    own = viewer.own_id()
    until(viewer.page, lambda: len(tap.moves()) >= 1, "the first move")
    button = viewer.page.locator("#compass")
    expect(button).to_be_visible()
    assert viewer.page.evaluate("window.compassAsked") == 0  # never without a tap
    button.tap()
    expect(button).to_be_hidden(timeout=WAIT_MS)
    assert viewer.page.evaluate("window.compassAsked") == 1
    viewer.page.evaluate("""() => {
        const event = new DeviceOrientationEvent('deviceorientation', {alpha: 10});
        Object.defineProperty(event, 'webkitCompassHeading', {value: 90});
        window.dispatchEvent(event);
    }""")
    until(viewer.page, lambda: tap.moves()[-1]["heading"] == 90, "heading 90")
    expect(viewer.page.locator(f'[data-pin-id="{own}"] .pin-arrow')).to_have_attribute(
        "style", "transform: rotate(90deg);", timeout=WAIT_MS)
    viewer.assert_clean()
    viewer.context.close()


NO_FIX = """
// A device that never gets a fix: every watch ends in a timeout.
navigator.geolocation.watchPosition = (ok, fail) => {
  setTimeout(() => fail({code: 3, message: 'Timeout expired', TIMEOUT: 3}), 0);
  return 1;
};
"""


def test_no_fix_says_so_and_lets_the_user_place_themselves(
        browser: Browser, base_url: str, map_name: str) -> None:
    """A location that never comes (timeout) is named as such, and a click places the pin."""
    viewer = open_viewer(browser, f"{base_url}/m/{map_name}", grant=True,
                         before_load=lambda page: page.add_init_script(NO_FIX))
    expect(viewer.page.locator("#notice")).to_have_text(
        "No location fix yet. Tap the map to place yourself.", timeout=WAIT_MS)
    own = viewer.own_id()
    viewer.page.mouse.click(700, 420)
    expect(viewer.page.locator(f'[data-pin-id="{own}"].mine')).to_have_count(1, timeout=WAIT_MS)
    viewer.assert_clean()
    viewer.context.close()


def test_server_errors_are_shown_briefly_not_logged_as_errors(
        browser: Browser, base_url: str, map_name: str) -> None:
    """An `error` message shows as a passing note; odd messages break nothing."""
    tap = WebSocketTap()
    viewer = open_viewer(browser, f"{base_url}/m/{map_name}", geolocation=BERLIN,
                         before_load=tap.install)
    own = viewer.own_id()
    expect(viewer.page.locator(".mine")).to_have_count(1, timeout=WAIT_MS)
    route = tap.connections[-1]["route"]
    route.send(json.dumps({"type": "error", "code": "rate_limited",
                           "message": "more than 10 moves a second; excess dropped"}))
    toast = viewer.page.locator("#toast")
    expect(toast).to_have_text("Server: more than 10 moves a second; excess dropped",
                               timeout=WAIT_MS)
    expect(toast).to_be_hidden(timeout=WAIT_MS)
    for odd in ("not json", json.dumps({"type": "surprise"}),
                json.dumps({"type": "update", "pins": [{"id": "x", "lat": "north"}], "gone": []})):
        route.send(odd)
    route.send(json.dumps({"type": "update", "pins": [], "gone": [own]}))
    expect(viewer.page.locator("[data-pin-id]")).to_have_count(0, timeout=WAIT_MS)
    assert viewer.state()["connected"] is True
    viewer.assert_clean()
    viewer.context.close()


def test_silent_websocket_falls_back_to_sockjs(
        browser: Browser, base_url: str, map_name: str) -> None:
    """A WebSocket that opens but never says welcome (a stalling proxy) is given up for SockJS."""
    require_sockjs(base_url, map_name)
    stalled: list[Any] = []
    viewer = open_viewer(browser, f"{base_url}/m/{map_name}", geolocation=BERLIN,
                         before_load=lambda page: page.route_web_socket(
                             re.compile(r"/ws/"), lambda route: stalled.append(route)))
    viewer.wait("() => window.livemap.state().connected")
    assert len(stalled) == 1
    assert viewer.state()["transport"] == "xhr-streaming"
    expect(viewer.page.locator(".mine")).to_have_count(1, timeout=WAIT_MS)
    viewer.assert_clean()
    viewer.context.close()


# ---------------------------------------------------------------- safe to put on the internet

MAP_NAME_24 = re.compile(r"^[A-Za-z0-9_-]{24}$")
CLIPBOARD = ["clipboard-read", "clipboard-write"]


def expect_problems(viewer: Viewer, *expected: str) -> None:
    """Drop the problems a test provoked on purpose (each must have happened), keep the rest."""
    for pattern in expected:
        matching = [p for p in viewer.problems if re.search(pattern, p)]
        assert matching, f"expected a problem matching {pattern!r} in {viewer.problems}"
        viewer.problems[:] = [p for p in viewer.problems if p not in matching]


def test_new_private_map_and_its_copied_link_bring_a_friend(
        browser: Browser, base_url: str, map_name: str) -> None:
    """The button makes a private map and goes there; the copied link lets a second person in."""
    ada = open_viewer(browser, f"{base_url}/m/{map_name}", geolocation=BERLIN, name="Ada",
                      permissions=CLIPBOARD)
    ada.own_id()
    answers: list[tuple[Any, Any]] = []

    def pass_through(route: Any) -> None:  # the server's own answer, read on its way
        response = route.fetch()
        answers.append((route.request, response))
        route.fulfill(response=response)

    ada.page.route(re.compile(r"/api/maps(\?|$)"), pass_through)
    ada.page.select_option("#new-map-ttl", "3600")
    started = time.time()
    ada.page.click("#new-map")
    ada.page.wait_for_url(re.compile(r"/m/[A-Za-z0-9_-]{24}$"), timeout=WAIT_MS)
    [(request, response)] = answers
    assert request.method == "POST" and urlsplit(request.url).query == "ttl=3600"
    assert response.status == 201
    body = response.json()
    assert MAP_NAME_24.match(body["map"]) and body["path"] == f"/m/{body['map']}"
    assert ada.page.url == f"{base_url}{body['path']}"
    assert started + 3600 - 60 < body["expires"] / 1000 < time.time() + 3600 + 60
    ada_id = ada.own_id()
    expect(ada.page.locator(".mine")).to_have_count(1, timeout=WAIT_MS)
    info = ada.page.locator("#map-info")
    expect(info).to_be_visible()
    expect(info).to_contain_text("Private map, until")
    # The choice of lifetime is kept for the next map.
    expect(ada.page.locator("#new-map-ttl")).to_have_value("3600")

    ada.page.click("#copy-link")
    expect(ada.page.locator("#toast")).to_contain_text("Link copied", timeout=WAIT_MS)
    expect(ada.page.locator("#copy-text")).to_have_text("Copied")
    expect(ada.page.locator("#link-box")).to_be_hidden()
    link = ada.page.evaluate("navigator.clipboard.readText()")
    assert link == f"{base_url}/m/{body['map']}"
    assert MAP_NAME_24.match(urlsplit(link).path.removeprefix("/m/"))
    expect(ada.page.locator("#copy-text")).to_have_text("Copy link", timeout=WAIT_MS)

    grace = open_viewer(browser, link, geolocation=NEARBY)
    grace_id = grace.own_id()
    grace.wait("(id) => window.livemap.state().pins.includes(id)", ada_id)
    expect(grace.page.locator(f'[data-pin-id="{ada_id}"] .pin-label')).to_have_text(
        "Ada", timeout=WAIT_MS)
    expect(ada.page.locator(f'[data-pin-id="{grace_id}"]')).to_have_count(1, timeout=WAIT_MS)
    expect(grace.page.locator("#count")).to_have_text("2 people")
    # Only its maker is told how long it lasts.
    expect(grace.page.locator("#map-info")).to_be_hidden()
    for viewer in (ada, grace):
        viewer.assert_clean()
        viewer.context.close()


NO_CLIPBOARD = "Object.defineProperty(Navigator.prototype, 'clipboard', {get: () => undefined});"


def test_copy_link_without_the_clipboard_api_shows_the_link_selected(
        browser: Browser, base_url: str, map_name: str) -> None:
    """No Clipboard API (plain http on a LAN): the link appears selected; never the query string."""
    viewer = open_viewer(browser, f"{base_url}/m/{map_name}?transport=websocket",
                         geolocation=BERLIN,
                         before_load=lambda page: page.add_init_script(NO_CLIPBOARD))
    viewer.own_id()
    assert viewer.page.evaluate("navigator.clipboard") is None
    viewer.page.click("#copy-link")
    field = viewer.page.locator("#link-field")
    expect(field).to_be_visible(timeout=WAIT_MS)
    expect(field).to_have_value(f"{base_url}/m/{map_name}")
    expect(field).to_be_focused()
    assert viewer.page.evaluate("""() => { const f = document.getElementById('link-field');
        return f.readOnly && f.selectionStart === 0 && f.selectionEnd === f.value.length; }""")
    viewer.page.press("#link-field", "Escape")
    expect(field).to_be_hidden()
    viewer.assert_clean()
    viewer.context.close()


def test_new_private_map_errors_show_the_servers_message(
        browser: Browser, base_url: str, map_name: str) -> None:
    """A refused map (bad ttl: 400, server full: 503) says why, and the page stays where it is."""
    url = f"{base_url}/m/{map_name}"
    viewer = open_viewer(browser, url, geolocation=BERLIN)
    viewer.own_id()
    # A lifetime the server does not take: its real 400 answer is shown.
    viewer.page.evaluate("document.querySelector('#new-map-ttl option').value = '60'")
    viewer.page.select_option("#new-map-ttl", "60")
    viewer.page.click("#new-map")
    toast = viewer.page.locator("#toast")
    expect(toast).to_have_text(
        "Could not create a map: ttl must be from 900 to 259200 seconds, or 'never'",
        timeout=WAIT_MS)
    expect(viewer.page.locator("#new-map")).to_be_enabled()
    expect_problems(viewer, r"HTTP 400: .*/api/maps\?ttl=60", r"status of 400")

    viewer.page.route(re.compile(r"/api/maps(\?|$)"), lambda route: route.fulfill(
        status=503, content_type="application/json",
        body=json.dumps({"error": "full", "message": "too many private maps"})))
    viewer.page.select_option("#new-map-ttl", "never")
    viewer.page.click("#new-map")
    expect(toast).to_have_text("Could not create a map: too many private maps",
                               timeout=WAIT_MS)
    expect(viewer.page.locator("#new-map")).to_be_enabled()
    expect_problems(viewer, r"HTTP 503: .*/api/maps$", r"status of 503")
    assert viewer.page.url == url
    assert viewer.state()["connected"] is True
    viewer.assert_clean()
    viewer.context.close()


def pin_age(viewer: Viewer, pin_id: str) -> Any:
    return viewer.page.locator(f'[data-pin-id="{pin_id}"] .pin-age')


def test_a_pin_that_stops_moving_turns_stale_on_the_viewers_clock(
        browser: Browser, base_url: str, map_name: str) -> None:
    """A real pin whose server `ts` is older than `stale` (600 s) is dimmed and says how old."""
    url = f"{base_url}/m/{map_name}"
    ada = open_viewer(browser, url, geolocation=BERLIN, name="Ada")
    ada_id = ada.own_id()
    # Bob only watches (no location, so no moves of his own), on a clock the test can move.
    bob = open_viewer(browser, url, grant=False,
                      before_load=lambda page: page.clock.install())
    bob.own_id()
    bob.wait("(id) => window.livemap.pin(id) !== null", ada_id)
    ada_pin = bob.page.locator(f'[data-pin-id="{ada_id}"] .pin-inner')
    expect(ada_pin).not_to_have_class(re.compile(r"\bstale\b"))
    expect(pin_age(bob, ada_id)).to_have_text("")
    assert abs(bob.state()["skew"]) < 5000  # both clocks are this machine's

    # Eleven minutes pass on Bob's page without a word from Ada.
    bob.page.clock.fast_forward("11:00")
    expect(ada_pin).to_have_class(re.compile(r"\bstale\b"), timeout=WAIT_MS)
    expect(pin_age(bob, ada_id)).to_have_text("last seen 11 min ago")
    expect(ada_pin).to_have_attribute("title", "Ada, last seen 11 min ago")
    expect(bob.page.locator(f'[data-pin-id="{ada_id}"] .pin-name')).to_have_text("Ada")
    assert bob.pin(ada_id)["stale"] is True
    expect(bob.page.locator("#count")).to_have_text("1 person")  # stale is still there
    # The periodic check keeps the age up to date.
    bob.page.clock.fast_forward("50:00")
    expect(pin_age(bob, ada_id)).to_have_text("last seen 1 h ago", timeout=WAIT_MS)
    # Ada's own page, on the real clock, sees herself as fresh.
    expect(ada.page.locator(f'[data-pin-id="{ada_id}"] .pin-inner')).not_to_have_class(
        re.compile(r"\bstale\b"))
    for viewer in (ada, bob):
        viewer.assert_clean()
        viewer.context.close()


def install_clock_off_by(minutes: int) -> Callable[[Page], None]:
    def install(page: Page) -> None:
        page.clock.install(time=time.time() + minutes * 60)
    return install


def test_a_wrong_device_clock_does_not_make_fresh_pins_stale(
        browser: Browser, base_url: str, map_name: str) -> None:
    """Ages are measured on the server's clock: a device 20 minutes off sees fresh pins as fresh."""
    url = f"{base_url}/m/{map_name}"
    tap = WebSocketTap()
    ada = open_viewer(browser, url, geolocation=BERLIN, name="Ada")
    ada_id = ada.own_id()
    # Fast and only watching: the Date header of the server's answer sets it right.
    fast = open_viewer(browser, url, grant=False, before_load=install_clock_off_by(20))

    # Slow, with a pin of its own: the echo of its own moves sets it right.
    def slow_setup(page: Page) -> None:
        install_clock_off_by(-20)(page)
        tap.install(page)
    slow = open_viewer(browser, url, geolocation=NEARBY, name="Slow", before_load=slow_setup)
    slow_id = slow.own_id()
    until(slow.page, lambda: len(tap.moves()) >= 1, "the first move")
    for viewer in (fast, slow):
        viewer.wait("(ids) => ids.every((id) => window.livemap.pin(id) !== null)",
                    [ada_id, slow_id])
    assert abs(fast.state()["skew"] + 20 * 60_000) < 5000, fast.state()["skew"]
    slow.wait("() => Math.abs(window.livemap.state().skew - 20 * 60000) < 5000")
    for viewer in (fast, slow):
        for pin_id in (ada_id, slow_id):
            assert viewer.pin(pin_id)["stale"] is False
            expect(pin_age(viewer, pin_id)).to_have_text("")
    for viewer in (ada, fast, slow):
        viewer.assert_clean()
        viewer.context.close()


def test_someone_sitting_still_is_not_left_to_go_stale(
        browser: Browser, base_url: str, map_name: str) -> None:
    """A page in view with a position that holds says it again (stale/3), so others see it fresh."""
    tap = WebSocketTap()

    def setup(page: Page) -> None:
        page.clock.install()
        tap.install(page)

    viewer = open_viewer(browser, f"{base_url}/m/{map_name}", geolocation=BERLIN,
                         before_load=setup)
    own = viewer.own_id()
    until(viewer.page, lambda: len(tap.moves()) >= 1, "the first move")
    viewer.page.clock.fast_forward("02:00")  # under 600 / 3 s: nothing to say yet
    viewer.page.clock.fast_forward("00:15")
    assert len(tap.moves()) == 1
    viewer.page.clock.fast_forward("01:30")
    until(viewer.page, lambda: len(tap.moves()) >= 2, "the position said again")
    first, again = tap.moves()[:2]
    assert (again["lat"], again["lng"], again["accuracy"]) == \
        (first["lat"], first["lng"], first["accuracy"])
    assert again["seq"] > first["seq"]
    viewer.wait("(id) => { const p = window.livemap.pin(id); return p && !p.stale; }", own)
    viewer.assert_clean()
    viewer.context.close()


def test_an_expired_map_says_so_and_stops_reconnecting(
        browser: Browser, base_url: str, map_name: str) -> None:
    """Close 1008 "map expired": no reconnect, a clear message, a way to the public map."""
    tap = WebSocketTap()
    viewer = open_viewer(browser, f"{base_url}/m/{map_name}", geolocation=BERLIN,
                         before_load=tap.install)
    viewer.own_id()
    expect(viewer.page.locator(".mine")).to_have_count(1, timeout=WAIT_MS)
    record = tap.connections[-1]
    record["server"].close(code=1000)
    record["route"].close(code=1008, reason="map expired")
    gone = viewer.page.locator("#gone")
    expect(gone).to_be_visible(timeout=WAIT_MS)
    expect(gone).to_contain_text("This map has expired")
    expect(viewer.page.locator("#status")).to_have_text("map expired")
    expect(viewer.page.locator("[data-pin-id]")).to_have_count(0)
    expect(viewer.page.locator("#copy-link")).to_be_hidden()
    state = viewer.state()
    assert state["closed"] == "expired" and state["retrying"] is False
    assert state["connected"] is False
    assert len(tap.connections) == 1
    viewer.page.evaluate("window.dispatchEvent(new Event('online'))")  # no reason to try again
    assert viewer.state()["retrying"] is False and len(tap.connections) == 1

    viewer.page.click("#gone-link")
    viewer.page.wait_for_url(f"{base_url}/m/public", timeout=WAIT_MS)
    viewer.own_id()
    expect(viewer.page.locator("#gone")).to_be_hidden()
    viewer.assert_clean()
    viewer.context.close()


@pytest.mark.parametrize("code,reason", [(1008, "rate limit exceeded"),
                                         (1008, "too slow: not reading"),
                                         (1001, "server shutting down")])
def test_other_closes_reconnect(
        browser: Browser, base_url: str, map_name: str, code: int, reason: str) -> None:
    """Only "map expired" ends it: other policy closes and a shutdown are reconnected."""
    tap = WebSocketTap()
    viewer = open_viewer(browser, f"{base_url}/m/{map_name}", geolocation=BERLIN,
                         before_load=tap.install)
    first = viewer.own_id()
    record = tap.connections[-1]
    record["server"].close(code=1000)
    record["route"].close(code=code, reason=reason)
    expect(viewer.page.locator("#status")).to_contain_text("reconnecting in", timeout=WAIT_MS)
    viewer.wait("(old) => { const s = window.livemap.state();"
                " return s.connected && s.id !== old; }", first)
    assert viewer.state()["closed"] is None
    expect(viewer.page.locator("#gone")).to_be_hidden()
    viewer.assert_clean()
    viewer.context.close()


def test_a_map_that_does_not_exist_says_so(browser: Browser, base_url: str) -> None:
    """
    A refused upgrade whose map the API calls 404 (never made, or expired) ends the retries.

    The server has open maps by default (any well-formed name exists) and no
    --no-open-maps option yet, so the test plays the server that lost the
    map: the upgrade is refused and the pins API answers 404.
    """
    name = secrets.token_urlsafe(18)
    refused: list[Any] = []
    sockjs: list[str] = []

    def refuse(page: Page) -> None:
        page.route_web_socket(re.compile(r"/ws/"),
                              lambda route: (refused.append(route), route.close(code=1006)))
        page.route(re.compile(r"/api/maps/[^/]+/pins$"), lambda route: route.fulfill(
            status=404, content_type="text/html", body="<html><body>No such map.</body></html>"))
        page.on("request", lambda r: "/sockjs/" in r.url and sockjs.append(r.url))

    viewer = open_viewer(browser, f"{base_url}/m/{name}", geolocation=BERLIN, before_load=refuse)
    gone = viewer.page.locator("#gone")
    expect(gone).to_be_visible(timeout=WAIT_MS)
    expect(gone).to_contain_text("This map does not exist, or it has expired.")
    expect(viewer.page.locator("#gone-link")).to_have_attribute("href", "/m/public")
    expect(viewer.page.locator("#status")).to_have_text("no such map")
    state = viewer.state()
    assert state["closed"] == "missing" and state["retrying"] is False
    assert len(refused) == 1 and sockjs == []  # neither retried nor handed to SockJS
    expect_problems(viewer, rf"HTTP 404: .*/api/maps/{re.escape(name)}/pins", r"status of 404")
    viewer.assert_clean()
    viewer.context.close()


def metres_between(a: tuple[float, float], b: tuple[float, float]) -> float:
    lat1, lng1, lat2, lng2 = map(math.radians, (*a, *b))
    h = (math.sin((lat2 - lat1) / 2) ** 2
         + math.cos(lat1) * math.cos(lat2) * math.sin((lng2 - lng1) / 2) ** 2)
    return 2 * 6_371_000 * math.asin(math.sqrt(h))


GATE = {"latitude": 52.516275, "longitude": 13.377704, "accuracy": 8}


def test_approximate_location_is_all_anyone_gets(
        browser: Browser, base_url: str, map_name: str) -> None:
    """The checkbox sends hello with precision 1000 first; others see a position ~1 km off."""
    url = f"{base_url}/m/{map_name}"
    true = (GATE["latitude"], GATE["longitude"])
    tap = WebSocketTap()
    ada = open_viewer(browser, url, geolocation=GATE, before_load=tap.install)  # no name
    grace = open_viewer(browser, url, geolocation=NEARBY, name="Grace")
    ada_id = ada.own_id()
    grace.wait("(id) => { const p = window.livemap.pin(id);"
               " return p && Math.abs(p.lat - 52.516275) < 1e-9; }", ada_id)

    ada.page.check("#approximate")
    sent = tap.connections[-1]["sent"]
    until(ada.page, lambda: {"type": "hello", "name": "Someone", "precision": 1000} in sent,
          "the hello asking for 1 km")
    grace.wait("(id) => { const p = window.livemap.pin(id);"
               " return p && p.accuracy >= 1000; }", ada_id)
    seen = grace.pin(ada_id)
    assert (seen["lat"], seen["lng"]) != true
    assert 0 < metres_between(true, (seen["lat"], seen["lng"])) < 1000
    expect(grace.page.locator(f'[data-pin-id="{ada_id}"] .pin-label')).to_have_text(
        "Someone", timeout=WAIT_MS)
    after_hello = sent[sent.index({"type": "hello", "name": "Someone", "precision": 1000}):]
    assert all((m["lat"], m["lng"]) != true for m in after_hello if m["type"] == "move")
    assert ada.page.evaluate("localStorage.getItem('livemap.approximate')") == "1"

    # Kept: after a reload the very first message asks for 1 km again, before any position.
    ada.page.reload()
    ada_id = ada.own_id()
    expect(ada.page.locator("#approximate")).to_be_checked()
    until(ada.page, lambda: len(tap.moves()) >= 1, "the first move after the reload")
    # (A `view` may come first: it carries no position.)
    first = [message for message in tap.connections[-1]["sent"] if message["type"] != "view"]
    assert first[0] == {"type": "hello", "name": "Someone", "precision": 1000}
    assert (first[1]["lat"], first[1]["lng"]) == (seen["lat"], seen["lng"])
    assert first[1]["accuracy"] == 1000
    grace.wait("(id) => { const p = window.livemap.pin(id); return p && p.accuracy >= 1000; }",
               ada_id)
    assert (grace.pin(ada_id)["lat"], grace.pin(ada_id)["lng"]) == (seen["lat"], seen["lng"])

    # Unticked: the server is told (a hello needs the name it has), then the exact position.
    ada.page.uncheck("#approximate")
    sent = tap.connections[-1]["sent"]
    until(ada.page, lambda: {"type": "hello", "name": "Someone", "precision": 0} in sent,
          "the hello asking for exact positions")
    grace.wait("(id) => { const p = window.livemap.pin(id);"
               " return p && Math.abs(p.lat - 52.516275) < 1e-9 && p.accuracy === 8; }", ada_id)
    for viewer in (ada, grace):
        viewer.assert_clean()
        viewer.context.close()
