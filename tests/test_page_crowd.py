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
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import TwistdServer, start_twistd
from test_browser import WAIT_MS, Viewer, open_viewer
from test_browser import browser  # noqa: F401 (fixture)
from playwright.sync_api import Browser, expect

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
             **extra: Any) -> Viewer:
    server, map_name = crowd_server
    viewer = open_viewer(browser, f"{server.url}/m/{map_name}", geolocation=BERLIN, name="Ada",
                         **layout, **extra)
    viewer.page.wait_for_function(
        "() => { const s = window.livemap.state(); return s.connected && s.big; }",
        timeout=WAIT_MS * 3)
    expect(viewer.page.locator("#count")).to_have_text("2,000 people", timeout=WAIT_MS * 3)
    return viewer


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
        browser: Browser, crowd_server: tuple[TwistdServer, str]) -> None:
    ada = open_big(browser, crowd_server, DESKTOP)
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
    judge(figures, 50, 0.10, load)
    ada.context.close()


def test_a_phone_watching_2000_people_is_smooth_and_finds_anyone(
        browser: Browser, crowd_server: tuple[TwistdServer, str]) -> None:
    ada = open_big(browser, crowd_server, {"viewport": PHONE["viewport"], "mobile": True,
                                           "scale": PHONE["scale"]})
    cdp = ada.context.new_cdp_session(ada.page)
    cdp.send("Emulation.setCPUThrottlingRate", {"rate": 4})
    load = os.getloadavg()
    figures = measure(ada)
    cdp.send("Emulation.setCPUThrottlingRate", {"rate": 1})
    assert_names_apart(ada)

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
    rows.first.tap()
    ada.page.wait_for_function("() => window.livemap.state().following !== null",
                               timeout=WAIT_MS)
    judge(figures, 30, 0.25, load)
    ada.context.close()


# ---------------------------------------------------------------- clusters


def test_zoomed_out_clusters_show_counts_move_live_and_a_tap_zooms_in(
        browser: Browser, crowd_server: tuple[TwistdServer, str]) -> None:
    ada = open_big(browser, crowd_server, DESKTOP)
    ada.page.wait_for_function("() => window.livemap.clusters().length >= 3", timeout=WAIT_MS)
    # What a person reads on each mark is its count (one look: counts are live).
    seen = ada.page.evaluate("""() => window.livemap.clusters().map((c) => [c.count,
        document.querySelector(`[data-cluster-id="${c.id}"]`).textContent])""")
    for count, text in seen:
        assert text.replace(",", "") == str(count)
    first = {c["id"]: c["count"] for c in ada.page.evaluate("window.livemap.clusters()")}
    assert sum(first.values()) >= 1000  # most of the crowd is in clusters, zoomed out

    # People walk from one cell to the next: the counts change while the
    # marks stay (the map does not move).
    def moved() -> bool:
        now = {c["id"]: c["count"] for c in ada.page.evaluate("window.livemap.clusters()")}
        return any(cid in now and now[cid] != n for cid, n in first.items())

    deadline = time.monotonic() + 30
    while not moved():
        assert time.monotonic() < deadline, "no one moved between clusters in 30 s"
        ada.page.wait_for_timeout(500)

    # A tap on the biggest mark zooms in to its people.
    biggest = max(ada.page.evaluate("window.livemap.clusters()"), key=lambda c: c["count"])
    zoom = ada.state()["zoom"]
    ada.page.locator(f'[data-cluster-id="{biggest["id"]}"]').click()
    ada.page.wait_for_function("(z) => window.livemap.state().zoom > z", arg=zoom,
                               timeout=WAIT_MS)
    ada.context.close()


# ---------------------------------------------------------------- what the page is sent


def test_zoomed_in_five_levels_the_page_is_sent_a_fifth_of_the_bytes(
        browser: Browser, crowd_server: tuple[TwistdServer, str]) -> None:
    ada = open_big(browser, crowd_server, DESKTOP)
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
    print(f"\narrival {arrival / 1000:.1f} KB/s, zoomed in five levels {zoomed / 1000:.1f} KB/s")
    assert arrival > 0
    assert zoomed <= 0.2 * arrival, (arrival, zoomed)
    ada.context.close()
