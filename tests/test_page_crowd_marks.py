"""
A big map's cluster marks (web/static/crowd.js), with the server's side
played by the test (test_page_crowd.ClusterServer): Tab reaches a mark, its
accessible name says how many and what it does, Enter or Space zooms in as
a tap does, it shows a focus ring; no name (the viewer's own neither)
covers a mark's count; axe-core finds nothing serious on a clustered page.
"""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
from playwright.sync_api import Browser, expect

from test_browser import WAIT_MS, Viewer, open_viewer
from test_browser import base_url, browser, map_name  # noqa: F401 (fixtures)
from test_page import AXE, axe_violations
from test_page_crowd import BERLIN, DESKTOP, ClusterServer, cluster, visible_boxes
from test_page_crowd import opened  # noqa: F401 (fixture)
from test_page_crowd import pytestmark  # noqa: F401 (needs Chromium)

ME = "ME00000000000000"


def welcome(*clusters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "welcome", "id": ME, "pins": [], "clusters": list(clusters),
            "total": 10_000}


def open_clustered(browser: Browser, url: str, server: ClusterServer,
                   opened: list[Viewer]) -> Viewer:
    ada = open_viewer(browser, url, geolocation=BERLIN, name="Ada",
                      before_load=server.install, **DESKTOP)
    opened.append(ada)
    expect(ada.page.locator("#count")).to_have_text("10,000 people", timeout=WAIT_MS)
    expect(ada.page.locator('[data-pin-id="ME00000000000000"].mine')).to_have_count(1)
    return ada


def settle(viewer: Viewer) -> None:
    """Until the map has stopped moving (the arrival's fit is animated)."""
    last = None
    deadline = time.monotonic() + WAIT_MS / 1000
    while True:
        viewer.page.wait_for_timeout(300)
        now = viewer.state()
        place = (now["zoom"], tuple(round(x, 7) for x in now["centre"]))
        if place == last:
            return
        assert time.monotonic() < deadline, now
        last = place


def mercator(lat: float, lng: float, zoom: float) -> tuple[float, float]:
    scale = 256 * 2 ** zoom
    y = math.log(math.tan(math.pi / 4 + math.radians(lat) / 2))
    return (lng + 180) / 360 * scale, (1 - y / math.pi) / 2 * scale


def lat_lng_at(viewer: Viewer, x: float, y: float) -> tuple[float, float]:
    """The place at container point (x, y): the map fills the viewport."""
    state = viewer.state()
    zoom, (lat, lng) = state["zoom"], state["centre"]
    size = viewer.page.viewport_size
    cx, cy = mercator(lat, lng, zoom)
    wx, wy = cx + x - size["width"] / 2, cy + y - size["height"] / 2
    scale = 256 * 2 ** zoom
    at_lng = wx / scale * 360 - 180
    at_lat = math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * wy / scale))))
    return at_lat, at_lng


def mark_boxes(viewer: Viewer) -> list[dict[str, float]]:
    return viewer.page.evaluate("""() => [...document.querySelectorAll('[data-cluster-id]')]
        .map((el) => { const b = el.getBoundingClientRect();
                       return {id: el.dataset.clusterId, left: b.left, top: b.top,
                               right: b.right, bottom: b.bottom}; })""")


def focused_mark(viewer: Viewer) -> Any:
    return viewer.page.evaluate("""() => {
        const el = document.activeElement;
        if (!el || !el.dataset || !el.dataset.clusterId) return null;
        const s = getComputedStyle(el);
        return {id: el.dataset.clusterId, tag: el.tagName,
                ring: s.outlineStyle !== 'none' && parseFloat(s.outlineWidth) >= 2};
    }""")


def tab_to_a_mark(viewer: Viewer) -> dict[str, Any]:
    viewer.page.evaluate("document.activeElement && document.activeElement.blur()")
    for _ in range(60):
        viewer.page.keyboard.press("Tab")
        found = focused_mark(viewer)
        if found is not None:
            return found
    pytest.fail("Tab never reached a cluster mark")


@pytest.mark.parametrize("key", ["Enter", " "])
def test_tab_reaches_a_cluster_mark_and_a_key_zooms_in(
        browser: Browser, opened: list[Viewer], base_url: str, map_name: str,
        key: str) -> None:
    west = cluster("c:12/2199/1342", 52.52, 13.30, 4000, 0.03)
    east = cluster("c:12/2201/1342", 52.52, 13.50, 5995, 0.03)
    server = ClusterServer(welcome(west, east))
    ada = open_clustered(browser, f"{base_url}/m/{map_name}", server, opened)
    expect(ada.page.locator("[data-cluster-id]")).to_have_count(2, timeout=WAIT_MS)
    mark = ada.page.locator(f'[data-cluster-id="{west["id"]}"]')
    expect(mark).to_have_accessible_name("4,000 people here, zoom in")
    expect(ada.page.get_by_role("button", name="5,995 people here, zoom in")).to_have_count(1)
    settle(ada)

    focused = tab_to_a_mark(ada)
    assert focused["tag"] == "BUTTON" and focused["ring"], focused
    zoom = ada.state()["zoom"]
    ada.page.keyboard.press(key)
    ada.page.wait_for_function("(z) => window.livemap.state().zoom > z", arg=zoom,
                               timeout=WAIT_MS)
    # It zoomed to the people of the mark it was on.
    lat, lng = ada.state()["centre"]
    target = west if focused["id"] == west["id"] else east
    assert abs(lat - target["lat"]) < 0.03 and abs(lng - target["lng"]) < 0.03
    ada.assert_clean()


def test_no_name_covers_a_cluster_mark_and_axe_finds_nothing_serious(
        browser: Browser, opened: list[Viewer], base_url: str, map_name: str) -> None:
    """
    A cluster right under the viewer, where their own name goes: the name
    moves above the pin rather than cover the count.
    """
    assert AXE.exists(), "axe-core is not installed: scripts/install --test"
    far = [cluster("c:12/2199/1342", 52.52, 13.30, 400, 0.03),
           cluster("c:12/2201/1342", 52.52, 13.50, 40, 0.03)]
    now = int(time.time() * 1000)
    server = ClusterServer(welcome(*far))
    ada = open_clustered(browser, f"{base_url}/m/{map_name}", server, opened)
    expect(ada.page.locator("[data-cluster-id]")).to_have_count(2, timeout=WAIT_MS)
    settle(ada)
    own = ada.page.locator(".mine .pin-label")
    expect(own).to_be_visible()
    label = own.bounding_box()
    assert label is not None
    # A mark of 22 px radius (the smallest) whose top is at the middle of the name.
    x = label["x"] + label["width"] / 2
    y = label["y"] + label["height"] / 2 + 22
    lat, lng = lat_lng_at(ada, x, y)
    under = cluster("c:13/4401/2685", lat, lng, 12, 0.001)
    # Walkers around, whose names the crowd places too.
    walkers = [{"id": f"W{n:016d}", "lat": lat + 0.002 * (n % 4 - 2),
                "lng": lng + 0.003 * (n // 4 - 2), "name": f"Walker {n}", "seq": 1, "ts": now}
               for n in range(16)]
    server.send({"type": "update", "pins": walkers, "clusters": [under], "total": 10_000})
    expect(ada.page.locator(f'[data-cluster-id="{under["id"]}"]')).to_have_text("12",
                                                                                timeout=WAIT_MS)
    ada.page.wait_for_timeout(500)
    marks = mark_boxes(ada)
    box = next(m for m in marks if m["id"] == under["id"])
    assert abs((box["left"] + box["right"]) / 2 - x) < 2 and abs(box["top"] - (y - 22)) < 2
    # Every mark is a touch target of 44 px or more, as every control of the page.
    for mark in marks:
        assert mark["right"] - mark["left"] >= 44 and mark["bottom"] - mark["top"] >= 44, mark
    names = visible_boxes(ada)
    assert any(n["text"] == "Ada" for n in names), names  # still shown: above the pin
    for name in names:
        for mark in marks:
            apart = (name["right"] <= mark["left"] or mark["right"] <= name["left"] or
                     name["bottom"] <= mark["top"] or mark["bottom"] <= name["top"])
            assert apart, f"{name} covers the mark {mark}"
    violations = axe_violations(ada)
    assert violations == [], violations
    ada.assert_clean()
