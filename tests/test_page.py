"""
The map page as people use it on a phone and a laptop (issue 14), in a real
headless Chromium against a real `twistd livemap`: a newcomer sees everyone
at once, finds someone in the people list and follows them; the page is
accessible (axe-core), keeps the map through a server restart, draws short
trails from what it received, and works held sideways and in dark mode.

The tests save the screenshots in docs/screenshots/ (the README shows two).
axe-core comes from npm as a test-only package (tests/browser/, installed by
`scripts/install --test`); the test itself injects it into the page.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence
from urllib.parse import urlencode

import pytest

from conftest import TwistdServer, start_twistd
from test_browser import (BERLIN, ROOT, WAIT_MS, Viewer, WebSocketTap, assert_in_free_area,
                          open_viewer, pin_centre, set_compass)
from test_browser import base_url, browser, map_name  # noqa: F401 (fixtures)
from playwright.sync_api import Browser, expect

SCREENSHOTS = ROOT / "docs" / "screenshots"
AXE = ROOT / "tests" / "browser" / "node_modules" / "axe-core" / "axe.min.js"

# An iPhone-sized screen (iPhone 12 to 15: 390 points wide, 664 of them left
# to the page under Safari's bars), touch, three pixels a point.
PHONE = {"viewport": {"width": 390, "height": 664}, "mobile": True, "scale": 3}
SIDEWAYS = {"viewport": {"width": 664, "height": 390}, "mobile": True, "scale": 3}
DESKTOP = {"viewport": {"width": 1200, "height": 720}}
LAYOUTS = {"phone": PHONE, "desktop": DESKTOP}

# Three people spread over Berlin, and the newcomer in the middle.
CITY = [("Grace", 52.5300, 13.3700), ("Linus", 52.4980, 13.4400),
        ("Margaret", 52.5450, 13.4300)]
NEWCOMER = ("Ada", 52.5200, 13.4050)


def fix(lat: float, lng: float, accuracy: float = 15) -> dict[str, float]:
    return {"latitude": lat, "longitude": lng, "accuracy": accuracy}


def distance(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Metres between two (lat, lng), as the page reckons them (format.js: haversine)."""
    lat1, lng1, lat2, lng2 = map(math.radians, (*a, *b))
    h = (math.sin((lat2 - lat1) / 2) ** 2
         + math.cos(lat1) * math.cos(lat2) * math.sin((lng2 - lng1) / 2) ** 2)
    return 2 * 6_371_008.8 * math.asin(min(1.0, math.sqrt(h)))


def format_distance(metres: float) -> str:
    """What the page says for a distance (web/static/format.js)."""
    if metres < 995:
        return f"{max(10, round(metres / 10) * 10)} m"
    if metres < 9950:
        return f"{metres / 1000:.1f} km"
    return f"{round(metres / 1000):,} km"


def screenshot(viewer: Viewer, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    viewer.page.wait_for_timeout(400)  # animations settle: a picture, not an assertion
    viewer.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


def open_city(browser: Browser, url: str) -> list[tuple[Viewer, str]]:
    """The three who are on the map before the newcomer, each with their pin."""
    others = []
    for name, lat, lng in CITY:
        viewer = open_viewer(browser, url, geolocation=fix(lat, lng), name=name,
                             viewport={"width": 480, "height": 360})
        own = viewer.own_id()
        viewer.wait("(id) => window.livemap.pin(id) !== null", own)
        others.append((viewer, own))
    return others


def close(*viewers: Viewer) -> None:
    for viewer in viewers:
        viewer.assert_clean()
        viewer.context.close()


def people_rows(viewer: Viewer) -> Any:
    return viewer.page.locator("[data-people-list] [data-person-id]")


def open_people(viewer: Viewer) -> None:
    """Opens the people list with the control a person would use (a tap on a phone)."""
    toggle = viewer.page.locator("[data-people-toggle]")
    if toggle.get_attribute("aria-expanded") == "true":
        return
    if viewer.state()["peopleOpen"] is False and viewer.page.evaluate("navigator.maxTouchPoints") > 0:
        toggle.tap()
    else:
        toggle.click()
    expect(viewer.page.locator("[data-people-list]")).to_be_visible()


def near_middle(viewer: Viewer, pin_id: str, within: float = 3) -> None:
    """Waits (bounded) until the pin sits in the middle of the map's free part."""
    try:
        _near_middle(viewer, pin_id, within)
    except Exception:
        raise AssertionError(f"pin {pin_id} at {pin_centre(viewer, pin_id)}, not in the middle:"
                             f" {viewer.state()}") from None


def _near_middle(viewer: Viewer, pin_id: str, within: float) -> None:
    viewer.wait("""([id, within]) => {
        const el = document.querySelector(`[data-pin-id="${id}"]`);
        if (!el) return false;
        const b = el.getBoundingClientRect();
        const m = window.livemap.state().middle;
        return Math.abs(b.x + b.width / 2 - m.x) <= within &&
               Math.abs(b.y + b.height / 2 - m.y) <= within;
    }""", [pin_id, within])


def drag_map(viewer: Viewer, touch: bool, dx: float, dy: float) -> None:
    """Pans the map by hand: a finger on a phone, the mouse on a laptop."""
    free = viewer.state()["free"]
    x, y = (free["left"] + free["right"]) / 2 - dx / 2, (free["top"] + free["bottom"]) / 2 - dy / 2
    steps = 8
    if touch:
        cdp = viewer.context.new_cdp_session(viewer.page)
        cdp.send("Input.dispatchTouchEvent", {"type": "touchStart",
                                              "touchPoints": [{"x": x, "y": y}]})
        for i in range(1, steps + 1):
            cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [
                {"x": x + dx * i / steps, "y": y + dy * i / steps}]})
        cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
        cdp.detach()
    else:
        viewer.page.mouse.move(x, y)
        viewer.page.mouse.down()
        viewer.page.mouse.move(x + dx, y + dy, steps=steps)
        viewer.page.mouse.up()


# ---------------------------------------------------------------- arrival, people, following


@pytest.mark.parametrize("layout", ["phone", "desktop"])
def test_a_newcomer_sees_everyone_then_finds_and_follows_someone(
        browser: Browser, base_url: str, map_name: str, layout: str) -> None:
    """
    Opening a shared link on a map where three people are spread over a city
    shows all four pins without a touch; the people list names them with
    distance and age, nearest first; a tap follows a person as they move,
    and panning the map stops it.
    """
    url = f"{base_url}/m/{map_name}"
    others = open_city(browser, url)
    me, lat, lng = NEWCOMER
    ada = open_viewer(browser, url, geolocation=fix(lat, lng, 12), name=me, **LAYOUTS[layout])
    ada_id = ada.own_id()
    ids = [ada_id] + [pin_id for _, pin_id in others]
    ada.wait("(ids) => ids.every((id) => window.livemap.pin(id) !== null)", ids)
    expect(ada.page.locator("[data-pin-id]")).to_have_count(4)

    # Everyone in view at once, where no panel covers them, each a dot of its own.
    assert_in_free_area(ada, ids)
    centres = [pin_centre(ada, pin_id) for pin_id in ids]
    for i, a in enumerate(centres):
        for b in centres[i + 1:]:
            assert math.dist(a, b) > 40, f"pins {a} and {b} overlap"
    assert 10 <= ada.state()["zoom"] <= 15  # a city, never closer than street level

    toggle = ada.page.locator("[data-people-toggle]")
    expect(ada.page.locator("#count")).to_have_text("4 people", timeout=WAIT_MS)
    if layout == "phone":
        # One line until it is opened: the count and the nearest person.
        expect(toggle).to_have_attribute("aria-expanded", "false")
        expect(ada.page.locator("[data-people-list]")).to_be_hidden()
        expect(toggle).to_contain_text("nearest: Grace")
        screenshot(ada, "phone-closed")
        open_people(ada)
        assert_in_free_area(ada, [])  # the free part is still a real area
    else:
        expect(toggle).to_have_attribute("aria-expanded", "true")

    # The list: the viewer first as "you", then the others by distance, each
    # with distance and the age of their last fix.
    rows = people_rows(ada)
    expect(rows).to_have_count(4, timeout=WAIT_MS)
    here = (lat, lng)
    expected = sorted(CITY, key=lambda p: distance(here, (p[1], p[2])))
    expect(rows.locator(".person-name")).to_have_text([me] + [n for n, _, _ in expected])
    expect(rows.first.locator(".person-you")).to_have_text("you")
    assert rows.first.get_attribute("data-person-id") == ada_id
    for row, (name, plat, plng) in zip(rows.all()[1:], expected):
        expect(row.locator(".person-distance")).to_have_text(
            format_distance(distance(here, (plat, plng))))
        expect(row.locator(".person-age")).to_have_text(re.compile(r"^(now|\d+ s ago)$"))
    screenshot(ada, f"{layout}-light")
    ada.page.emulate_media(color_scheme="dark")
    screenshot(ada, f"{layout}-dark")
    ada.page.emulate_media(color_scheme="light")

    # A tap on Grace: the map centres on her and follows her.
    grace, grace_id = others[0]
    row = ada.page.locator(f'[data-people-list] [data-person-id="{grace_id}"]')
    if layout == "phone":
        row.tap()
        # The list gives the map back; its line says who is followed.
        expect(toggle).to_have_attribute("aria-expanded", "false")
        expect(toggle).to_contain_text("Following Grace")
    else:
        row.click()
        expect(row).to_have_attribute("aria-pressed", "true")
    assert ada.state()["following"] == grace_id
    expect(ada.page.locator(f'[data-pin-id="{grace_id}"] .pin-inner')).to_have_class(
        re.compile(r"\bfollowed\b"))
    near_middle(ada, grace_id)
    assert ada.state()["zoom"] >= 15
    if layout == "phone":
        screenshot(ada, "phone-following")

    for step in (1, 2):
        grace.context.set_geolocation(fix(52.5300 + 0.0008 * step, 13.3700 + 0.0012 * step))
        ada.wait("([id, lat]) => { const p = window.livemap.pin(id);"
                 " return p && Math.abs(p.lat - lat) < 1e-9; }", [grace_id, 52.5300 + 0.0008 * step])
        near_middle(ada, grace_id)

    # Panning by hand ends it: Grace's next move leaves the map where it is.
    drag_map(ada, layout == "phone", 90, 60)
    ada.wait("() => window.livemap.state().following === null")
    expect(toggle).not_to_contain_text("Following")
    ada.page.wait_for_timeout(300)  # the drag's inertia ends; not an assertion
    centre = ada.state()["centre"]
    grace.context.set_geolocation(fix(52.5330, 13.3750))
    ada.wait("(id) => { const p = window.livemap.pin(id);"
             " return p && Math.abs(p.lat - 52.533) < 1e-9; }", grace_id)
    ada.page.wait_for_timeout(300)  # a pan would have started by now; not a timed assertion
    assert ada.state()["centre"] == centre

    close(ada, *(viewer for viewer, _ in others))


def test_tapping_the_person_followed_again_stops_and_someone_leaving_ends_it(
        browser: Browser, base_url: str, map_name: str) -> None:
    """The list's row toggles following; a person who leaves is no longer followed, and it says so."""
    url = f"{base_url}/m/{map_name}"
    ada = open_viewer(browser, url, geolocation=BERLIN, name="Ada")
    ada.own_id()
    grace = open_viewer(browser, url, geolocation=fix(52.5155, 13.3940), name="Grace")
    grace_id = grace.own_id()
    row = ada.page.locator(f'[data-person-id="{grace_id}"]')
    expect(row).to_be_visible(timeout=WAIT_MS)
    row.click()
    expect(row).to_have_attribute("aria-pressed", "true")
    row.click()
    expect(row).to_have_attribute("aria-pressed", "false")
    assert ada.state()["following"] is None

    # Keyboard: the row is a button; Enter follows, the bar's "stop" button ends it.
    row.focus()
    ada.page.keyboard.press("Enter")
    expect(row).to_have_attribute("aria-pressed", "true")
    stop = ada.page.get_by_role("button", name="Stop following Grace")
    expect(stop).to_be_visible()
    stop.click()
    assert ada.state()["following"] is None

    row.click()
    grace.context.close()
    expect(ada.page.locator("#toast")).to_have_text("Grace left the map", timeout=WAIT_MS)
    assert ada.state()["following"] is None
    close(ada)


def api(url: str, body: Any = None, method: str = "POST") -> Any:
    """One request to the server, as a phone app would make it; the JSON answer, if any."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status in (200, 201), (url, response.status)
        text = response.read()
    return json.loads(text) if text.strip() else None


def add_device(base_url: str, map_name: str, name: str) -> tuple[str, str]:
    """A phone app's device on the map: (its token, its pin id)."""
    device = api(f"{base_url}/api/maps/{map_name}/devices", {"name": name})
    return device["token"], device["id"]


def test_app_fed_pins_show_their_app_battery_and_age_and_a_crowd_can_be_searched(
        browser: Browser, base_url: str, map_name: str) -> None:
    """
    Pins that phone apps feed (OwnTracks, OsmAnd, Overland, through the
    server's real app endpoints) carry a badge with the app, the battery
    and the age of their fix, in the list and on the pin; an old fix is
    stale; over 8 people the list gets a search box.
    """
    tap = WebSocketTap()
    ada = open_viewer(browser, f"{base_url}/m/{map_name}", geolocation=BERLIN, name="Ada",
                      before_load=tap.install)
    ada.own_id()
    expect(ada.page.locator(".mine")).to_have_count(1, timeout=WAIT_MS)
    now = time.time()
    olga, olga_id = add_device(base_url, map_name, "Olga")
    api(f"{base_url}/apps/owntracks/{olga}", {"_type": "location", "lat": 52.523, "lon": 13.414,
                                              "tst": int(now), "acc": 20, "batt": 54})
    oskar, oskar_id = add_device(base_url, map_name, "Oskar")
    api(f"{base_url}/apps/osmand?" + urlencode({"id": oskar, "lat": 52.526, "lon": 13.418,
                                                "timestamp": int(now - 180), "batt": 9}),
        method="GET")
    ola, ola_id = add_device(base_url, map_name, "Ola")
    stamp = datetime.fromtimestamp(now - 25 * 60, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    api(f"{base_url}/apps/overland/{ola}", {"locations": [{
        "type": "Feature", "geometry": {"type": "Point", "coordinates": [13.422, 52.529]},
        "properties": {"timestamp": stamp, "horizontal_accuracy": 30}}]})
    # A crowd of walkers, so that the list has ten people.
    for i in range(6):
        token, _ = add_device(base_url, map_name, f"Walker {i}")
        api(f"{base_url}/apps/owntracks/{token}", {"_type": "location", "lat": 52.50 - 0.002 * i,
                                                   "lon": 13.40, "tst": int(now)})
    expect(people_rows(ada)).to_have_count(10, timeout=WAIT_MS)

    def row(pin_id: str) -> Any:
        return ada.page.locator(f'[data-person-id="{pin_id}"]')

    expect(row(olga_id).locator(".person-source")).to_have_text("OwnTracks")
    expect(row(olga_id).locator(".person-battery")).to_have_text("battery 54%")
    expect(row(olga_id).locator(".person-age")).to_have_text(re.compile(r"^(now|\d+ s ago)$"))
    expect(row(oskar_id).locator(".person-source")).to_have_text("OsmAnd")
    expect(row(oskar_id).locator(".person-battery")).to_have_class(re.compile(r"\blow\b"))
    expect(row(oskar_id).locator(".person-age")).to_have_text("3 min ago")
    expect(row(ola_id).locator(".person-source")).to_have_text("Overland")
    expect(row(ola_id).locator(".person-battery")).to_be_hidden()  # Overland said nothing
    expect(row(ola_id).locator(".person-age")).to_have_text("last seen 25 min ago")
    expect(ada.page.locator(".person-item").filter(has=row(ola_id))).to_have_class(
        re.compile(r"\bstale\b"))
    expect(row(ada.state()["id"]).locator(".person-source")).to_be_hidden()  # a browser
    # On the map too: the label says the app and the battery; old is dimmed.
    label = ada.page.locator(f'[data-pin-id="{olga_id}"] .pin-label')
    expect(label.locator(".pin-source")).to_have_text("OwnTracks")
    expect(label.locator(".pin-battery")).to_have_text("54%")
    expect(ada.page.locator(f'[data-pin-id="{ola_id}"] .pin-inner')).to_have_class(
        re.compile(r"\bstale\b"))

    # Ten people: a search box, by name.
    search = ada.page.get_by_role("searchbox", name="Find someone by name")
    expect(search).to_be_visible()
    search.fill("OL")
    expect(people_rows(ada).locator(".person-name")).to_have_text(["Olga", "Ola"])
    search.fill("walker 3")
    expect(people_rows(ada).locator(".person-name")).to_have_text(["Walker 3"])
    search.fill("nobody")
    expect(people_rows(ada)).to_have_count(0)
    expect(ada.page.locator("#people-more")).to_have_text("Nobody by that name")
    search.fill("")
    expect(people_rows(ada)).to_have_count(10)
    screenshot(ada, "desktop-app-pins")

    # What no server of ours sends, the page still takes calmly: an app it
    # does not know is "app", a battery out of range is not shown.
    tap.connections[-1]["route"].send(json.dumps({"type": "update", "gone": [], "pins": [{
        "id": "from-elsewhere", "lat": 52.51, "lng": 13.41, "heading": None, "accuracy": None,
        "name": "Otto", "seq": None, "ts": int(now * 1000), "source": "gpslogger",
        "battery": 101}]}))
    expect(row("from-elsewhere").locator(".person-source")).to_have_text("app", timeout=WAIT_MS)
    expect(row("from-elsewhere").locator(".person-battery")).to_be_hidden()
    close(ada)


# ---------------------------------------------------------------- accessibility


def axe_violations(viewer: Viewer) -> list[dict[str, Any]]:
    """axe-core's serious and critical violations on the page as it is now."""
    if not viewer.page.evaluate("typeof window.axe === 'object'"):
        viewer.page.add_script_tag(content=AXE.read_text())
    result = viewer.page.evaluate("""async () => {
        const r = await axe.run(document, {resultTypes: ['violations']});
        return r.violations.filter((v) => v.impact === 'serious' || v.impact === 'critical')
            .map((v) => ({id: v.id, impact: v.impact, help: v.help,
                          nodes: v.nodes.map((n) => n.target.join(' ')).slice(0, 5)}));
    }""")
    return result


CONTROLS = ("button, input:not([type=hidden]), select, a[role=button], [data-person-id]")


def check_controls(viewer: Viewer, where: str) -> None:
    """Every visible control: an accessible name, a touch target of 44 px, 16 px text in fields."""
    found = viewer.page.evaluate("""(selector) => [...document.querySelectorAll(selector)]
        .filter((el) => el.getClientRects().length > 0 && getComputedStyle(el).visibility !== 'hidden')
        .map((el) => {
            // A checkbox's target is its label; a link's or a field's, itself.
            const target = el.type === 'checkbox' ? el.closest('label') : el;
            const b = target.getBoundingClientRect();
            return {what: el.outerHTML.slice(0, 80), tag: el.tagName, type: el.type || '',
                    width: b.width, height: b.height,
                    font: parseFloat(getComputedStyle(el).fontSize)};
        })""", CONTROLS)
    assert len(found) >= 5, found
    for control in found:
        assert control["width"] >= 44 and control["height"] >= 44, (where, control)
    for el in viewer.page.locator("button, a[role=button]").all():
        if el.is_visible():
            expect(el).to_have_accessible_name(re.compile(r"\w"))
    # Every field, shown or not: 16 px or iOS Safari zooms the page in on focus.
    fonts = viewer.page.evaluate("""() => [...document.querySelectorAll('input, select')]
        .map((el) => [el.id || el.outerHTML.slice(0, 60), parseFloat(getComputedStyle(el).fontSize)])""")
    assert fonts and all(size >= 16 for _, size in fonts), (where, fonts)


def check_keyboard(viewer: Viewer, must_reach: Sequence[str]) -> None:
    """Tab reaches every control named in `must_reach`, each with a visible focus ring."""
    viewer.page.evaluate("document.activeElement && document.activeElement.blur()")
    reached: list[str] = []
    for _ in range(40):
        viewer.page.keyboard.press("Tab")
        focused = viewer.page.evaluate("""() => {
            const el = document.activeElement;
            if (!el || el === document.body) return null;
            const s = getComputedStyle(el);
            return {key: el.id || el.dataset.personId && 'person' || el.getAttribute('aria-label')
                         || el.className || el.tagName,
                    ring: s.outlineStyle !== 'none' && parseFloat(s.outlineWidth) >= 2};
        }""")
        if focused is None:
            continue
        assert focused["ring"], f"no visible focus ring on {focused['key']}"
        reached.append(focused["key"])
    missing = [key for key in must_reach if key not in reached]
    assert not missing, f"Tab never reached {missing} (reached {reached})"


@pytest.mark.parametrize("layout", ["phone", "desktop"])
def test_the_page_is_accessible_with_the_people_list_open_and_closed(
        browser: Browser, base_url: str, map_name: str, layout: str) -> None:
    """
    axe-core finds no serious or critical violation; every control has a
    name, a 44 px target and (fields) 16 px text; the keyboard reaches them
    all, each with a focus ring.
    """
    assert AXE.exists(), "axe-core is not installed: scripts/install --test"
    url = f"{base_url}/m/{map_name}"
    grace = open_viewer(browser, url, geolocation=fix(52.5155, 13.3940), name="Grace")
    grace.own_id()
    ada = open_viewer(browser, url, geolocation=BERLIN, name="Ada", **LAYOUTS[layout])
    ada.own_id()
    expect(ada.page.locator("[data-pin-id]")).to_have_count(2, timeout=WAIT_MS)
    toggle = ada.page.locator("[data-people-toggle]")
    for state in ("open", "closed"):
        want = "true" if state == "open" else "false"
        if toggle.get_attribute("aria-expanded") != want:
            toggle.click()
        expect(toggle).to_have_attribute("aria-expanded", want)
        if state == "open":
            expect(people_rows(ada)).to_have_count(2, timeout=WAIT_MS)
        for scheme in ("light", "dark"):
            ada.page.emulate_media(color_scheme=scheme)
            violations = axe_violations(ada)
            assert violations == [], f"{layout}, list {state}, {scheme}: {violations}"
        ada.page.emulate_media(color_scheme="light")
        check_controls(ada, f"{layout}, list {state}")
    if layout == "phone":
        options = ada.page.get_by_role("button", name="More options")
        options.tap()
        expect(ada.page.locator("#new-map")).to_be_visible()
        assert axe_violations(ada) == []
        check_controls(ada, "phone, options open")
    toggle.click()
    expect(people_rows(ada)).to_have_count(2)
    panel = ["name", "copy-link", "people-toggle", "person", "new-map", "new-map-ttl",
             "approximate", "trails"]
    map_buttons = ["fit-all", "Zoom in"]
    if layout == "phone":
        # The open sheet hides the map's buttons; closed, they are back.
        expect(ada.page.locator("#fit-all")).to_be_hidden()
        check_keyboard(ada, panel)
        toggle.click()
        check_keyboard(ada, ["people-toggle"] + map_buttons)
    else:
        check_keyboard(ada, panel + map_buttons)
    close(ada, grace)


# ---------------------------------------------------------------- connection loss


@dataclass
class Restartable:
    """A twistd of the test's own, which it stops and starts again on the same port."""

    tmp_path: Path
    server: TwistdServer

    @property
    def url(self) -> str:
        return self.server.url

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server = start_twistd(self.tmp_path, "--pirate", "none", port=self.server.port)


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[Restartable]:
    if os.environ.get("LIVEMAP_TEST_URL"):
        pytest.skip("needs a server the test can restart")
    server = Restartable(tmp_path, start_twistd(tmp_path, "--pirate", "none"))
    yield server
    server.stop()


# While the server is down the browser says so in its console: expected here.
OUTAGE = re.compile(r"ERR_CONNECTION_REFUSED|WebSocket connection to .* failed|"
                    r"ERR_CONNECTION_RESET|ERR_EMPTY_RESPONSE|/sockjs/|/api/maps/")


def test_losing_the_server_keeps_everyone_in_view_until_it_is_back(
        browser: Browser, map_name: str, own_server: Restartable) -> None:
    """
    The server stops: the own pin stays (dimmed), everyone else stays as
    they were marked "not live" with the time since, the count stays, the
    status counts down; when the server is back the map is rebuilt from
    the new welcome, on WebSocket again.
    """
    url = f"{own_server.url}/m/{map_name}"
    ada = open_viewer(browser, url, geolocation=BERLIN, name="Ada")
    ada_id = ada.own_id()
    grace = open_viewer(browser, url, geolocation=fix(52.5155, 13.3940), name="Grace")
    grace_id = grace.own_id()
    expect(ada.page.locator("[data-pin-id]")).to_have_count(2, timeout=WAIT_MS)
    expect(ada.page.locator("#count")).to_have_text("2 people", timeout=WAIT_MS)
    # Every status the page shows, in order, to see the countdown count down.
    ada.page.evaluate("""() => {
        window.statusSeen = [];
        const status = document.getElementById('status');
        new MutationObserver(() => window.statusSeen.push(status.textContent))
            .observe(status, {childList: true, characterData: true, subtree: true});
    }""")

    own_server.stop()
    expect(ada.page.locator("#status")).to_contain_text("reconnecting in", timeout=WAIT_MS)
    mine = ada.page.locator(f'[data-pin-id="{ada_id}"].mine')
    expect(mine).to_have_count(1)
    opacity = mine.locator(".pin-body").evaluate("(el) => Number(getComputedStyle(el).opacity)")
    assert opacity < 1, "the own pin is not dimmed"
    expect(ada.page.locator(f'[data-pin-id="{grace_id}"] .pin-age')).to_have_text(
        re.compile(r"^not live for \d+ s$"))
    expect(ada.page.locator("#count")).to_have_text("2 people")
    open_people(ada)
    expect(ada.page.locator(f'[data-person-id="{grace_id}"] .person-live')).to_have_text(
        "not live")
    ada.wait("""() => window.statusSeen.some((text, i) => {
        const m = /^reconnecting in (\\d+) s$/.exec(text);
        return m && window.statusSeen.slice(i + 1).includes(`reconnecting in ${m[1] - 1} s`);
    })""")
    screenshot(ada, "desktop-not-live")

    own_server.start()
    for viewer, old in ((ada, ada_id), (grace, grace_id)):
        viewer.page.wait_for_function(
            "(old) => { const s = window.livemap.state();"
            " return s.connected && s.id !== old && s.pins.includes(s.id); }",
            arg=old, timeout=60_000)
    new_grace = grace.state()["id"]
    ada.wait("(id) => window.livemap.state().pins.includes(id)", new_grace)
    expect(ada.page.locator("[data-pin-id]")).to_have_count(2, timeout=WAIT_MS)
    expect(ada.page.locator(f'[data-pin-id="{ada_id}"]')).to_have_count(0)
    expect(ada.page.locator("#status")).to_have_text("connected \u00b7 WebSocket")
    expect(ada.page.locator("body")).not_to_have_class(re.compile(r"\bnot-live\b"))
    expect(ada.page.locator(".pin-age").filter(has_text="not live")).to_have_count(0)
    for viewer in (ada, grace):
        viewer.problems[:] = [p for p in viewer.problems if not OUTAGE.search(p)]
    close(ada, grace)


# ---------------------------------------------------------------- trails


def test_trails_are_drawn_from_the_updates_the_page_received(
        browser: Browser, base_url: str, map_name: str) -> None:
    """Off by default; on, each pin's path of the last minutes, from received updates only."""
    url = f"{base_url}/m/{map_name}"
    ada = open_viewer(browser, url, geolocation=BERLIN, name="Ada")
    ada.own_id()
    grace = open_viewer(browser, url, geolocation=fix(52.5155, 13.3940), name="Grace")
    grace_id = grace.own_id()
    ada.wait("(id) => window.livemap.pin(id) !== null", grace_id)
    # From here on the page asks the server for nothing: trails are its own.
    asked: list[str] = []
    ada.page.on("request", lambda r: asked.append(r.url) if "/tile." not in r.url else None)

    path = [(52.5160, 13.3950), (52.5170, 13.3930)]  # a zigzag: Leaflet drops no corner
    for lat, lng in path:
        grace.context.set_geolocation(fix(lat, lng))
        ada.wait("([id, lat]) => { const p = window.livemap.pin(id);"
                 " return p && Math.abs(p.lat - lat) < 1e-9; }", [grace_id, lat])
    assert ada.state()["trails"] is False
    expect(ada.page.locator("path.trail")).to_have_count(0)

    ada.page.check("#trails")
    line = ada.page.locator(f'path.trail[data-trail-id="{grace_id}"]')
    expect(line).to_have_count(1)
    grace.context.set_geolocation(fix(52.5180, 13.3980))
    ada.wait("(id) => window.livemap.trail(id).length === 4", grace_id)
    assert ada.page.evaluate("(id) => window.livemap.trail(id)", grace_id) == [
        [52.5155, 13.394], [52.516, 13.395], [52.517, 13.393], [52.518, 13.398]]
    ada.page.click("#fit-all")  # all of it in view: Leaflet draws only what is on screen
    ada.wait("(id) => (document.querySelector(`path.trail[data-trail-id='${id}']`)"
             ".getAttribute('d').match(/L/g) || []).length === 3", grace_id)
    assert ada.page.evaluate("localStorage.getItem('livemap.trails')") == "1"
    assert asked == [], f"the page asked for something: {asked}"

    ada.page.uncheck("#trails")
    expect(ada.page.locator("path.trail")).to_have_count(0)
    close(ada, grace)


# ---------------------------------------------------------------- held sideways


def test_a_phone_held_sideways_keeps_two_thirds_of_the_map_and_the_heading(
        browser: Browser, base_url: str, map_name: str) -> None:
    """Landscape: panel and list in a column no wider than a third; the arrow turns with the screen."""
    url = f"{base_url}/m/{map_name}"
    others = open_city(browser, url)
    me, lat, lng = NEWCOMER
    ada = open_viewer(browser, url, geolocation=fix(lat, lng, 12), name=me, **SIDEWAYS)
    ada_id = ada.own_id()
    ids = [ada_id] + [pin_id for _, pin_id in others]
    ada.wait("(ids) => ids.every((id) => window.livemap.pin(id) !== null)", ids)
    assert_in_free_area(ada, ids)
    open_people(ada)
    expect(people_rows(ada)).to_have_count(4, timeout=WAIT_MS)
    width = SIDEWAYS["viewport"]["width"]
    for selector in ("#panel", "#people"):
        box = ada.page.locator(selector).bounding_box()
        assert box is not None and box["x"] + box["width"] <= width / 3 + 1, (selector, box)
    screenshot(ada, "phone-sideways")

    # The compass says 0 degrees for the phone's top; held sideways (screen
    # turned 90 degrees), the screen's top, and so the viewer, faces east.
    assert ada.page.evaluate("screen.orientation.angle") == 90
    set_compass(ada.page, 0)
    arrow = ada.page.locator(f'[data-pin-id="{ada_id}"] .pin-arrow')
    expect(arrow).to_have_attribute("style", "transform: rotate(90deg);", timeout=WAIT_MS)
    ada.page.set_viewport_size(PHONE["viewport"])  # upright again
    ada.wait("() => screen.orientation.angle === 0")
    set_compass(ada.page, 0)
    expect(arrow).to_have_attribute("style", "transform: rotate(0deg);", timeout=WAIT_MS)
    close(ada, *(viewer for viewer, _ in others))

