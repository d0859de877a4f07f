"""
The map page on a big map (issue 20), in a real headless Chromium against a
real `twistd livemap`: 1,999 people (tests/crowd.py, real WebSocket
clients, each moving once a second) and the viewer make 2,000. The page
stays smooth on a laptop and on a phone with its CPU slowed four times, no
two names overlap, the people list counts and finds everyone, zoomed out
the crowd is clusters with counts (a tap zooms in), and zoomed in the page
is sent only what it shows.

Frames and long tasks are measured in the page (requestAnimationFrame,
PerformanceObserver('longtask')); the WebSocket bytes through CDP. On a
machine busier than its cores (the load average says so before a
measurement), the frame rates say nothing about the page: those tests then
report their figures as an expected failure instead of passing or failing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, urlsplit

import pytest

from conftest import TwistdServer, start_twistd
from crowd import open_socket
from test_browser import (CHROMIUM, WAIT_MS, Viewer, open_viewer, pin_centre,
                          require_sockjs)
from test_browser import base_url, browser, map_name  # noqa: F401 (fixtures)
from playwright.sync_api import Browser, expect

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason="Debian chromium is not installed")

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "docs" / "screenshots"
CROWD = 1999  # and the viewer: 2,000 people
CROWD_SECONDS = 900  # the crowd stops by itself after this, whatever happens to the test
MEASURE_S = 8
PHONE = {"viewport": {"width": 390, "height": 664}, "mobile": True, "scale": 3}
DESKTOP = {"viewport": {"width": 1200, "height": 720}}
BERLIN = {"latitude": 52.52, "longitude": 13.405, "accuracy": 10}
SEARCHED = "Walker 1234"

# Frames and long tasks, counted in the page from the moment it is called.
MEASURE_JS = """() => {
  const m = {frames: 0, long: 0, start: performance.now()};
  new PerformanceObserver((list) => {
    for (const e of list.getEntries()) m.long += e.duration;
  }).observe({type: 'longtask'});
  const tick = () => { m.frames++; requestAnimationFrame(tick); };
  requestAnimationFrame(tick);
  window.__measure = m;
}"""
RESULT_JS = """() => {
  const m = window.__measure;
  const s = (performance.now() - m.start) / 1000;
  return {fps: m.frames / s, long: m.long / (s * 1000), seconds: s};
}"""


@pytest.fixture(scope="module")
def crowd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TwistdServer, str]]:
    """One server and one crowd of CROWD walkers for the module (bounded in time)."""
    server = start_twistd(tmp_path_factory.mktemp("crowd"), "--pirate", "none")
    map_name = "crowd-" + os.urandom(4).hex()
    walkers = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "crowd.py"), "--port", str(server.port),
         "--map", map_name, "--people", str(CROWD), "--seconds", str(CROWD_SECONDS)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert walkers.stdout is not None
        line = walkers.stdout.readline()  # bounded: the crowd gives up at its deadline
        assert line.strip() == b"ready", (line, walkers.stderr.read() if walkers.stderr else b"")
        yield server, map_name
    finally:
        if walkers.stdin is not None:
            walkers.stdin.close()  # the crowd's signal to leave
        try:
            walkers.wait(timeout=10)
        except subprocess.TimeoutExpired:
            walkers.kill()
            walkers.wait()
        server.stop()


def open_big(browser: Browser, crowd_server: tuple[TwistdServer, str], layout: dict,
             opened: list[Viewer], **extra: Any) -> Viewer:
    server, map_name = crowd_server
    viewer = open_viewer(browser, f"{server.url}/m/{map_name}", geolocation=BERLIN, name="Ada",
                         **layout, **extra)
    opened.append(viewer)
    viewer.page.wait_for_function(
        "() => { const s = window.livemap.state(); return s.connected && s.big; }",
        timeout=WAIT_MS * 3)
    expect(viewer.page.locator("#count")).to_have_text("2,000 people", timeout=WAIT_MS * 3)
    return viewer


@pytest.fixture
def opened() -> Iterator[list[Viewer]]:
    """The pages a test opened, closed after it whatever happened (a page
    left open would stay on the map, one person too many for the next test)."""
    viewers: list[Viewer] = []
    yield viewers
    for viewer in viewers:
        viewer.context.close()


def measure(viewer: Viewer) -> dict[str, float]:
    viewer.page.evaluate(MEASURE_JS)
    viewer.page.wait_for_timeout(MEASURE_S * 1000)
    figures = viewer.page.evaluate(RESULT_JS)
    print(f"\n{figures} load average {os.getloadavg()}")
    return figures


def busy_machine() -> bool:
    return os.getloadavg()[0] > (os.cpu_count() or 1)


def judge(figures: dict[str, float], fps: float, long: float, load: tuple) -> None:
    ok = figures["fps"] >= fps and figures["long"] <= long
    if not ok and busy_machine():
        pytest.xfail(f"machine busier than its cores (load {load}, now {os.getloadavg()}):"
                     f" {figures['fps']:.1f} fps, {figures['long']:.0%} in long tasks")
    assert figures["fps"] >= fps, figures
    assert figures["long"] <= long, figures


def visible_boxes(viewer: Viewer) -> list[dict[str, float]]:
    """Every name on the screen: the crowd's labels and the DOM pins' own."""
    return viewer.page.evaluate("""() => {
      const out = [];
      for (const el of document.querySelectorAll('.crowd-label, .pin-label')) {
        if (getComputedStyle(el).visibility === 'hidden') continue;
        const b = el.getBoundingClientRect();
        if (b.width === 0 || b.height === 0) continue;
        out.push({text: el.textContent, left: b.left, top: b.top, right: b.right,
                  bottom: b.bottom});
      }
      return out;
    }""")


def assert_names_apart(viewer: Viewer) -> int:
    boxes = visible_boxes(viewer)
    width, height = viewer.page.viewport_size["width"], viewer.page.viewport_size["height"]
    for box in boxes:
        assert box["left"] >= 0 and box["top"] >= 0, box
        assert box["right"] <= width and box["bottom"] <= height, box
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            apart = (a["right"] <= b["left"] or b["right"] <= a["left"] or
                     a["bottom"] <= b["top"] or b["bottom"] <= a["top"])
            assert apart, f"names overlap: {a} {b}"
    return len(boxes)


# ---------------------------------------------------------------- smooth, names, list


def test_a_laptop_watching_2000_people_is_smooth_and_names_never_pile_up(
        browser: Browser, opened: list[Viewer], crowd_server: tuple[TwistdServer, str]) -> None:
    ada = open_big(browser, crowd_server, DESKTOP, opened)
    # Not one element per pin: the crowd is a canvas, a few clusters and names.
    assert ada.page.locator("[data-pin-id]").count() <= 2
    assert ada.page.locator(".leaflet-marker-pane *, .leaflet-pane .cluster, .crowd-label")\
        .count() < 400
    load = os.getloadavg()
    figures = measure(ada)
    shown = assert_names_apart(ada)
    assert shown >= 2  # the viewer's name and at least one other
    # Zoomed in, more names appear, still apart.
    for _ in range(3):
        ada.page.locator(".leaflet-control-zoom-in").click()
        ada.page.wait_for_timeout(500)
    ada.page.wait_for_timeout(1500)
    assert_names_apart(ada)
    # "Show everyone" brings the whole crowd back into view.
    zoomed = ada.state()["zoom"]
    ada.page.locator("#fit-all").click()
    ada.page.wait_for_function("(z) => window.livemap.state().zoom < z", arg=zoomed,
                               timeout=WAIT_MS)
    expect(ada.page.locator("#count")).to_have_text("2,000 people", timeout=WAIT_MS)
    judge(figures, 50, 0.10, load)
    ada.assert_clean()


def test_a_phone_watching_2000_people_is_smooth_and_finds_anyone(
        browser: Browser, opened: list[Viewer], crowd_server: tuple[TwistdServer, str]) -> None:
    ada = open_big(browser, crowd_server, {"viewport": PHONE["viewport"], "mobile": True,
                                           "scale": PHONE["scale"]}, opened)
    cdp = ada.context.new_cdp_session(ada.page)
    busy = "() => { const t = performance.now(); let x = 0;" \
        " for (let i = 0; i < 3e6; i++) x += Math.sqrt(i); return performance.now() - t; }"
    before = ada.page.evaluate(busy)
    cdp.send("Emulation.setCPUThrottlingRate", {"rate": 4})
    print(f"\na busy loop: {before:.0f} ms, throttled {ada.page.evaluate(busy):.0f} ms")
    load = os.getloadavg()
    figures = measure(ada)
    cdp.send("Emulation.setCPUThrottlingRate", {"rate": 1})
    assert_names_apart(ada)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    ada.page.screenshot(path=str(SCREENSHOTS / "phone-crowd-2000.png"))

    # The list: everyone counted, and a search finds a given person.
    toggle = ada.page.locator("[data-people-toggle]")
    toggle.tap()
    expect(ada.page.locator("[data-people-list]")).to_be_visible()
    expect(ada.page.locator("#count")).to_have_text("2,000 people")
    search = ada.page.get_by_role("searchbox", name="Find someone by name")
    search.fill(SEARCHED.lower())
    rows = ada.page.locator("[data-people-list] [data-person-id]")
    expect(rows.locator(".person-name")).to_have_text([SEARCHED], timeout=WAIT_MS)
    # A tap on them follows them.
    walker_id = rows.first.get_attribute("data-person-id")
    rows.first.tap()
    ada.page.wait_for_function("(id) => window.livemap.state().following === id",
                               arg=walker_id, timeout=WAIT_MS)
    # The person followed is a pin of their own, ringed, above the crowd.
    expect(ada.page.locator(f'[data-pin-id="{walker_id}"] .pin-inner')).to_have_class(
        re.compile(r"\bfollowed\b"), timeout=WAIT_MS)
    expect(ada.page.locator(f'[data-pin-id="{walker_id}"] .pin-name')).to_have_text(SEARCHED)
    judge(figures, 30, 0.25, load)
    ada.assert_clean()


# ---------------------------------------------------------------- clusters


PHONE_LAYOUT = {"viewport": PHONE["viewport"], "mobile": True, "scale": PHONE["scale"]}


@pytest.mark.parametrize("layout", ["phone", "desktop"])
def test_zoomed_out_clusters_show_counts_move_live_and_a_tap_zooms_in(
        browser: Browser, opened: list[Viewer], crowd_server: tuple[TwistdServer, str],
        layout: str) -> None:
    ada = open_big(browser, crowd_server, PHONE_LAYOUT if layout == "phone" else DESKTOP,
                   opened)
    ada.page.wait_for_function("() => window.livemap.clusters().length >= 3", timeout=WAIT_MS)
    # What a person reads on each mark is its count (one look: counts are live).
    seen = ada.page.evaluate("""() => window.livemap.clusters().map((c) => [c.count,
        document.querySelector(`[data-cluster-id="${c.id}"]`).textContent])""")
    for count, text in seen:
        assert text.replace(",", "") == str(count)
    first = {c["id"]: c["count"] for c in ada.page.evaluate("window.livemap.clusters()")}
    # Zoomed out over the crowd, most of it is in clusters.
    ada.page.wait_for_function(
        "() => window.livemap.clusters().reduce((n, c) => n + c.count, 0) >= 1000",
        timeout=WAIT_MS)
    first = {c["id"]: c["count"] for c in ada.page.evaluate("window.livemap.clusters()")}

    # People walk from one cell to the next: the counts change while the
    # marks stay (the map does not move).
    def moved() -> bool:
        now = {c["id"]: c["count"] for c in ada.page.evaluate("window.livemap.clusters()")}
        return any(cid in now and now[cid] != n for cid, n in first.items())

    deadline = time.monotonic() + 30
    while not moved():
        assert time.monotonic() < deadline, "no one moved between clusters in 30 s"
        ada.page.wait_for_timeout(500)

    # A tap on the biggest mark in sight (no panel over it) zooms in to its people.
    free = ada.state()["free"]
    in_sight = [c for c in ada.page.evaluate("window.livemap.clusters()")
                if free["left"] + 30 < c["x"] < free["right"] - 30
                and free["top"] + 30 < c["y"] < free["bottom"] - 30]
    biggest = max(in_sight, key=lambda c: c["count"])
    zoom = ada.state()["zoom"]
    mark = ada.page.locator(f'[data-cluster-id="{biggest["id"]}"]')
    if layout == "phone":
        mark.tap()  # a finger
    else:
        mark.click()
    ada.page.wait_for_function("(z) => window.livemap.state().zoom > z", arg=zoom,
                               timeout=WAIT_MS)
    ada.assert_clean()


# ---------------------------------------------------------------- what the page is sent


def v1_arrival_rate(server: TwistdServer, map_name: str, seconds: float) -> float:
    """
    Bytes a second a v1 reader of the map is sent (no view: every pin's
    every move), which is what every page received at arrival before the
    clusters extension: the yardstick of "a fifth of the bytes".
    """
    sock, rest = open_socket(server.port, f"/ws/{map_name}")
    received = len(rest)
    try:
        time.sleep(1.0)  # past the welcome: the moves alone
        while True:
            try:
                if not sock.recv(1 << 16):
                    break
            except BlockingIOError:
                break
        received = 0
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            try:
                chunk = sock.recv(1 << 16)
            except BlockingIOError:
                time.sleep(0.01)
                continue
            if not chunk:
                raise ConnectionError("the v1 reader was closed")
            received += len(chunk)
        return received / (time.monotonic() - start)
    finally:
        sock.close()


def test_zoomed_in_five_levels_the_page_is_sent_a_fifth_of_the_bytes(
        browser: Browser, opened: list[Viewer], crowd_server: tuple[TwistdServer, str]) -> None:
    """
    Zoomed in five levels, the page receives at most a fifth of what a page
    received at arrival when every page was sent the whole map (a v1 reader,
    measured beside it), and at most 10 KB/s; at arrival, zoomed out over
    the crowd, clusters keep it under 20 KB/s (issue 20).
    """
    whole_map = v1_arrival_rate(*crowd_server, MEASURE_S)
    ada = open_big(browser, crowd_server, DESKTOP, opened)
    cdp = ada.context.new_cdp_session(ada.page)
    received = {"bytes": 0}

    def on_frame(event: dict[str, Any]) -> None:
        received["bytes"] += len(event["response"]["payloadData"].encode())

    cdp.on("Network.webSocketFrameReceived", on_frame)
    cdp.send("Network.enable")

    def rate() -> float:
        received["bytes"] = 0
        start = time.monotonic()
        ada.page.wait_for_timeout(MEASURE_S * 1000)
        return received["bytes"] / (time.monotonic() - start)

    ada.page.wait_for_timeout(2000)  # the view of the arrival is the server's
    arrival = rate()
    zoom = ada.state()["zoom"]
    free = ada.state()["free"]
    ada.page.mouse.move((free["left"] + free["right"]) / 2, (free["top"] + free["bottom"]) / 2)
    # A notch at a time, as a person turns the wheel, until five levels in.
    for _ in range(20):
        before = ada.state()["zoom"]
        if before >= zoom + 5:
            break
        ada.page.mouse.wheel(0, -50)
        ada.page.wait_for_function("(z) => window.livemap.state().zoom !== z", arg=before,
                                   timeout=WAIT_MS)
        ada.page.wait_for_timeout(300)
    assert ada.state()["zoom"] == zoom + 5
    ada.page.wait_for_timeout(2000)  # the view is told, the server answers it
    zoomed = rate()
    print(f"\nwhole map (v1) {whole_map / 1000:.1f} KB/s, page at arrival "
          f"{arrival / 1000:.1f} KB/s, zoomed in five levels {zoomed / 1000:.1f} KB/s")
    assert arrival > 0 and zoomed > 0  # the page is sent something in either view
    assert arrival <= 20_000, (whole_map, arrival)
    assert zoomed <= min(0.2 * whole_map, 10_000), (whole_map, arrival, zoomed)
    ada.assert_clean()


def test_over_sockjs_a_big_map_says_its_view_after_the_welcome(
        browser: Browser, opened: list[Viewer], crowd_server: tuple[TwistdServer, str]) -> None:
    """SockJS has no URL for the view: the page sends it once welcomed, and
    zoomed in it holds only the pins around what it shows."""
    server, map_name = crowd_server
    require_sockjs(server.url, map_name)
    ada = open_viewer(browser, f"{server.url}/m/{map_name}?transport=xhr-streaming",
                      geolocation=BERLIN, name="Ada", **DESKTOP)
    opened.append(ada)
    ada.page.wait_for_function(
        "() => { const s = window.livemap.state(); return s.sockjs && s.big; }",
        timeout=WAIT_MS * 3)
    expect(ada.page.locator("#count")).to_have_text("2,000 people", timeout=WAIT_MS * 3)
    ada.page.mouse.move(*pin_centre(ada, ada.own_id()))
    zoom = ada.state()["zoom"]
    for level in range(1, 5):
        ada.page.mouse.wheel(0, -50)
        ada.page.wait_for_function("(z) => window.livemap.state().zoom >= z",
                                   arg=zoom + level, timeout=WAIT_MS)
        ada.page.wait_for_timeout(300)
    ada.page.wait_for_function("() => window.livemap.state().pins.length < 200",
                               timeout=WAIT_MS)
    ada.assert_clean()


# ---------------------------------------------------------------- the clusters extension


class ClusterServer:
    """
    The server's side of the clusters extension (docs/protocol.md), played
    by the test in place of the server's WebSocket (Playwright's
    route_web_socket), so that the page's side is checked message by
    message: what it asks on connecting and on every move, and what it
    shows of `clusters`, `total` and a cluster's `gone`.
    """

    def __init__(self, welcome: dict[str, Any]) -> None:
        self.welcome = welcome
        self.urls: list[str] = []
        self.sent: list[dict[str, Any]] = []
        self.route: Any = None

    def install(self, page: Any) -> None:
        page.route_web_socket(re.compile(r"/ws/"), self._handle)

    def _handle(self, route: Any) -> None:
        self.urls.append(route.url)
        self.route = route
        route.on_message(lambda message: self.sent.append(json.loads(message)))
        route.send(json.dumps(self.welcome))

    def send(self, message: dict[str, Any]) -> None:
        self.route.send(json.dumps(message))

    def views(self) -> list[dict[str, Any]]:
        return [m for m in self.sent if m["type"] == "view"]


def cluster(cid: str, lat: float, lng: float, count: int, half: float) -> dict[str, Any]:
    return {"id": cid, "lat": lat, "lng": lng, "count": count,
            "bbox": [lng - half, lat - half, lng + half, lat + half]}


def test_the_servers_clusters_total_and_search_are_what_the_page_shows(
        browser: Browser, opened: list[Viewer], base_url: str, map_name: str) -> None:
    west = cluster("c:12/2199/1342", 52.52, 13.30, 4000, 0.03)
    east = cluster("c:12/2201/1342", 52.52, 13.50, 5995, 0.03)
    walker = {"id": "W0000000000000001", "lat": 52.60, "lng": 13.40, "name": "Walker 0001",
              "seq": 1, "ts": int(time.time() * 1000)}
    server = ClusterServer({"type": "welcome", "id": "ME00000000000000", "pins": [walker],
                            "clusters": [west, east], "total": 10_000})
    searched: list[str] = []
    zoe = {"id": "Z0000000000000001", "lat": 52.40, "lng": 13.60, "name": "Zoe Far",
           "seq": 3, "ts": int(time.time() * 1000)}

    def people_api(route: Any) -> None:
        searched.append(route.request.url)
        route.fulfill(status=200, content_type="application/json",
                      body=json.dumps({"total": 10_000, "people": [zoe]}))

    def prepare(page: Any) -> None:
        server.install(page)
        page.route(re.compile(r"/api/maps/[^/]+/people\?"), people_api)

    ada = open_viewer(browser, f"{base_url}/m/{map_name}", geolocation=BERLIN, name="Ada",
                      before_load=prepare, **DESKTOP)
    opened.append(ada)
    # The view is in the URL of the WebSocket, so the welcome is already for it.
    query = parse_qs(urlsplit(server.urls[0]).query)
    assert len(query["bbox"][0].split(",")) == 4
    assert 0 <= int(query["zoom"][0]) <= 22

    # Its clusters, with their counts; the list counts the whole map.
    marks = ada.page.locator("[data-cluster-id]")
    expect(marks).to_have_count(2, timeout=WAIT_MS)
    expect(ada.page.locator(f'[data-cluster-id="{west["id"]}"]')).to_have_text("4,000")
    expect(ada.page.locator(f'[data-cluster-id="{east["id"]}"]')).to_have_text("5,995")
    expect(ada.page.locator("#count")).to_have_text("10,000 people")
    assert ada.state()["big"] is True
    # The server sends the viewer's own pin in a cluster: the page shows it anyway.
    expect(ada.page.locator('[data-pin-id="ME00000000000000"].mine')).to_have_count(1)

    # The arrival fitted the clusters; the map at rest says its view and zoom.
    until_views = time.monotonic() + WAIT_MS / 1000
    while not server.views() or server.views()[-1].get("zoom") != ada.state()["zoom"]:
        assert time.monotonic() < until_views, (server.sent, ada.state())
        ada.page.wait_for_timeout(100)
    view = server.views()[-1]
    w, s, e, n = view["bbox"]
    assert w < 13.30 < 13.50 < e and s < 52.52 < n

    # People walk from the west cluster to a new one: counts change, the
    # emptied cell goes (`gone`).
    north = cluster("c:12/2200/1341", 52.56, 13.40, 12, 0.01)
    server.send({"type": "update", "pins": [], "clusters": [
        {**west, "count": 3988}, north], "gone": [east["id"]], "total": 10_000})
    expect(ada.page.locator(f'[data-cluster-id="{west["id"]}"]')).to_have_text("3,988",
                                                                                timeout=WAIT_MS)
    expect(ada.page.locator(f'[data-cluster-id="{north["id"]}"]')).to_have_text("12")
    expect(ada.page.locator(f'[data-cluster-id="{east["id"]}"]')).to_have_count(0)

    # A tap on a cluster zooms to its box.
    zoom = ada.state()["zoom"]
    ada.page.locator(f'[data-cluster-id="{west["id"]}"]').click()
    ada.page.wait_for_function("(z) => window.livemap.state().zoom > z", arg=zoom,
                               timeout=WAIT_MS)
    lat, lng = ada.state()["centre"]
    assert abs(lat - 52.52) < 0.03 and abs(lng - 13.30) < 0.03

    # The search asks the server, near the viewer, and finds someone the
    # page is not sent; a tap goes there and follows her once she comes.
    search = ada.page.get_by_role("searchbox", name="Find someone by name")
    search.fill("zoe")
    rows = ada.page.locator("[data-people-list] [data-person-id]")
    expect(rows.locator(".person-name")).to_have_text(["Zoe Far"], timeout=WAIT_MS)
    asked = parse_qs(urlsplit(searched[-1]).query)
    assert asked["q"] == ["zoe"]
    near = [float(x) for x in asked["near"][0].split(",")]
    assert abs(near[0] - 52.52) < 1e-3 and abs(near[1] - 13.405) < 1e-3
    rows.first.click()
    ada.page.wait_for_function(
        "() => Math.abs(window.livemap.state().centre[0] - 52.40) < 0.01", timeout=WAIT_MS)
    assert ada.state()["zoom"] == 18
    server.send({"type": "update", "pins": [zoe], "total": 10_000})
    ada.page.wait_for_function(f"() => window.livemap.state().following === '{zoe['id']}'",
                               timeout=WAIT_MS)
    ada.assert_clean()


def test_a_small_map_behind_a_clustered_welcome_gets_every_pin_as_in_v1(
        browser: Browser, opened: list[Viewer], base_url: str, map_name: str) -> None:
    """
    The first connection asks for a clustered view (it cannot know the
    map's size); a map of 12 answered with a cluster is small: the page asks
    for every pin (a view without a zoom) and shows each as its own pin.
    """
    now = int(time.time() * 1000)
    twelve = [{"id": f"P{i:015d}", "lat": 52.50 + 0.002 * i, "lng": 13.40, "name": f"Pat {i}",
               "seq": 1, "ts": now} for i in range(12)]
    server = ClusterServer({"type": "welcome", "id": "ME00000000000000", "pins": [],
                            "clusters": [cluster("c:3/4/2", 52.51, 13.40, 12, 0.02)],
                            "total": 12})
    ada = open_viewer(browser, f"{base_url}/m/{map_name}", geolocation=BERLIN, name="Ada",
                      before_load=server.install, **DESKTOP)
    opened.append(ada)
    deadline = time.monotonic() + WAIT_MS / 1000
    while {"type": "view", "bbox": None} not in server.sent:
        assert time.monotonic() < deadline, server.sent
        ada.page.wait_for_timeout(100)
    server.send({"type": "snapshot", "pins": twelve, "total": 12})
    expect(ada.page.locator("[data-pin-id]")).to_have_count(12, timeout=WAIT_MS)
    expect(ada.page.locator("[data-cluster-id]")).to_have_count(0)
    expect(ada.page.locator("#count")).to_have_text("12 people")
    assert ada.state()["big"] is False
    # The arrival waited for the pins: every one of them is in view.
    ada.page.wait_for_timeout(500)
    for pin in twelve:
        box = ada.page.locator(f'[data-pin-id="{pin["id"]}"]').bounding_box()
        assert box is not None and 0 <= box["x"] <= 1200 and 0 <= box["y"] <= 720, pin
    # A small map never narrows its view: no view with a box is sent.
    assert all(m.get("bbox") is None for m in server.views()), server.views()
    ada.assert_clean()


# ---------------------------------------------------------------- small maps


def test_on_a_small_map_names_never_pile_up_either(
        browser: Browser, opened: list[Viewer], tmp_path: Path) -> None:
    """
    Thirty people within a few streets: still every one its own pin (a
    small map is drawn as before), but only the names that fit are shown,
    the viewer's first; zoomed in, more of them.
    """
    server = start_twistd(tmp_path, "--pirate", "none")
    walkers = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "crowd.py"), "--port", str(server.port),
         "--map", "street", "--people", "30", "--spread", "150", "--seconds", "300"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert walkers.stdout is not None
        assert walkers.stdout.readline().strip() == b"ready"
        ada = open_viewer(browser, f"{server.url}/m/street", geolocation=BERLIN, name="Ada",
                          **DESKTOP)
        opened.append(ada)
        expect(ada.page.locator("[data-pin-id]")).to_have_count(31, timeout=WAIT_MS)
        assert ada.state()["big"] is False
        ada.page.wait_for_timeout(1500)
        hidden = ada.page.locator(".pin-label.crowded").count()
        assert hidden > 0  # thirty names in 150 m do not fit at street level
        expect(ada.page.locator(".mine .pin-label")).not_to_have_class(re.compile("crowded"))
        assert_names_apart(ada)
        shown = len(visible_boxes(ada))
        # Zoomed in on the viewer (the mouse wheel over their pin), more names find room.
        ada.page.mouse.move(*pin_centre(ada, ada.own_id()))
        zoom = ada.state()["zoom"]
        for level in (1, 2):
            ada.page.mouse.wheel(0, -50)
            ada.page.wait_for_function("(z) => window.livemap.state().zoom >= z",
                                       arg=zoom + level, timeout=WAIT_MS)
            ada.page.wait_for_timeout(400)
        ada.page.wait_for_timeout(1000)
        assert len(visible_boxes(ada)) > shown
        assert_names_apart(ada)
        ada.assert_clean()
    finally:
        if walkers.stdin is not None:
            walkers.stdin.close()
        try:
            walkers.wait(timeout=10)
        except subprocess.TimeoutExpired:
            walkers.kill()
            walkers.wait()
        server.stop()
