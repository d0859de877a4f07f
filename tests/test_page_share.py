"""
"Share from a phone app" (issue 12, the page), in a real headless Chromium
against a real `twistd livemap`: the dialog makes a device for the map with
the name typed in the panel and shows what to enter in each app, with QR
codes and one-tap setup links; a report to the URL it shows puts the phone's
pin on the map with its app and battery; "Stop sharing" deletes the device.

The QR codes are read back from screenshots of the page by an independent
decoder (zxing-cpp, from PyPI: it needs no network), not by the library that
drew them. The test saves docs/screenshots/phone-share.png.
"""

from __future__ import annotations

import base64
import json
import re
import struct
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from test_browser import BERLIN, WAIT_MS, Viewer, open_viewer
from test_browser import base_url, browser, map_name  # noqa: F401 (fixtures)
from conftest import start_twistd
from test_page import AXE, DESKTOP, PHONE, SCREENSHOTS, api, axe_violations, check_controls
from playwright.sync_api import Browser, Locator, expect

zxingcpp = pytest.importorskip("zxingcpp")

OWNTRACKS_LINK = "owntracks:///config?inline="


def png_grey(data: bytes) -> tuple[int, int, bytes]:
    """A screenshot's PNG (8-bit RGB or RGBA, not interlaced) as one grey byte a pixel."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
    assert header is not None
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    channels = 3 if colour == 2 else 4
    stride = width * channels
    raw = zlib.decompress(idat)
    previous = bytearray(stride)
    grey = bytearray()
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b = previous[i]
            c = previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + a) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + b) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        grey.extend(line[1::channels])  # green: the codes are black on white
        previous = line
    return width, height, bytes(grey)


def read_qr(code: Locator) -> str:
    """What a phone's camera reads in the QR code on screen (one CSS pixel a pixel)."""
    # In the middle of the dialog, clear of its sticky head and foot.
    code.evaluate("(el) => el.scrollIntoView({block: 'center'})")
    width, height, grey = png_grey(code.screenshot(scale="css", animations="disabled"))
    found = zxingcpp.read_barcodes(memoryview(grey).cast("B", (height, width)),
                                   formats=zxingcpp.BarcodeFormat.QRCode)
    assert len(found) == 1, f"{len(found)} QR codes read in a {width}x{height} picture"
    return found[0].text


def app_section(dialog: Locator, app: str) -> Locator:
    """An app's section of the dialog, opened as a person would (a tap on its name)."""
    section = dialog.locator(f'details[data-app="{app}"]')
    if section.get_attribute("open") is None:
        section.locator("summary").tap()
    expect(section.locator(".app-body")).to_be_visible()
    return section


def shown(section: Locator) -> dict[str, str]:
    """Each value the section shows, by its key in the server's answer."""
    values = {}
    for value in section.locator("[data-value]").all():
        expect(value).to_be_visible()
        values[value.get_attribute("data-value") or ""] = value.inner_text()
    return values


def pins(base_url: str, map_name: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{base_url}/api/maps/{map_name}/pins", timeout=10) as response:
        return json.loads(response.read())["pins"]


def report_status(url: str, body: dict[str, Any]) -> int:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def open_share(viewer: Viewer) -> Locator:
    """The dialog, opened from "More options" on a phone."""
    page = viewer.page
    options = page.get_by_role("button", name="More options")
    if options.get_attribute("aria-expanded") != "true":
        options.tap()
    page.get_by_role("button", name="Share from a phone app").tap()
    dialog = page.get_by_role("dialog", name="Share from a phone app")
    expect(dialog).to_be_visible()
    return dialog


def test_share_from_a_phone_app_sets_up_each_app_and_deletes_the_device(
        browser: Browser, base_url: str, map_name: str) -> None:
    """
    On a phone: the dialog makes a device named as the viewer, shows each
    app's values (consistent with one another and with the server), QR codes
    that read back as the links, a one-tap OwnTracks configuration in HTTP
    mode; a report to the URL shown makes a pin with the app and battery;
    the device survives a reload of the page, and deleting it takes its pin
    off the map and its token out of service. Accessible, nothing from other
    hosts, no console errors.
    """
    assert AXE.exists(), "axe-core is not installed: scripts/install --test"
    ada = open_viewer(browser, f"{base_url}/m/{map_name}", geolocation=BERLIN,
                      permissions=["clipboard-read", "clipboard-write"],
                      viewport=PHONE["viewport"], mobile=True, scale=PHONE["scale"])
    ada.own_id()
    page = ada.page
    asked: list[str] = []
    page.on("request", lambda r: asked.append(urlsplit(r.url).path))
    console: list[str] = []
    page.on("console", lambda message: console.append(message.text))
    page.locator("#name").fill("Ada Lovelace")
    page.locator("#name").press("Enter")
    assert pins(base_url, map_name) and not [p for p in pins(base_url, map_name) if "source" in p]

    dialog = open_share(ada)
    expect(dialog.get_by_role("button", name="Close")).to_be_focused()
    expect(dialog.locator("#share-pin-name")).to_have_text(
        "Its pin is called \u201cAda Lovelace\u201d.", timeout=WAIT_MS)
    expect(dialog.get_by_role("button", name="Stop sharing: delete this device")).to_be_visible()

    # OwnTracks, open from the start: a one-tap configuration (HTTP mode, the
    # device's URL), the URL and mode by hand, and the link as a QR code.
    owntracks = app_section(dialog, "owntracks")
    ot = shown(owntracks)
    link = owntracks.locator("[data-link]")
    expect(link).to_have_text("Set up OwnTracks")
    href = link.get_attribute("href") or ""
    assert href.startswith(OWNTRACKS_LINK), href
    inline = unquote(href[len(OWNTRACKS_LINK):])
    assert len(inline) % 4 == 0 and re.fullmatch(r"[A-Za-z0-9+/]+=*", inline), inline
    config = json.loads(base64.b64decode(inline, validate=True))
    assert config["_type"] == "configuration" and config["mode"] == 3, config
    assert config["url"] == ot["url"] and config["tid"] == "AL", config
    assert ot["mode"] == "HTTP" and ot["device_id"] == "livemap" and ot["tid"] == "AL"
    token = ot["url"].rsplit("/", 1)[1]
    assert ot["url"] == f"{base_url}/apps/owntracks/{token}" and len(token) == 32, ot
    qr = owntracks.get_by_role("img", name="QR code of the OwnTracks setup link")
    expect(qr).to_be_visible(timeout=WAIT_MS)
    page.wait_for_timeout(300)  # the dialog's first paint settles: a picture, not an assertion
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "phone-share.png"))
    assert read_qr(qr) == href

    # axe-core with the dialog open, light and dark; every control a 44 px target.
    for scheme in ("light", "dark"):
        page.emulate_media(color_scheme=scheme)
        assert axe_violations(ada) == [], scheme
    page.emulate_media(color_scheme="light")
    check_controls(ada, "share dialog")
    for target in (link, *dialog.locator("summary").all()):
        box = target.bounding_box()
        assert box is not None and box["width"] >= 44 and box["height"] >= 44, box

    # Traccar Client: the server URL and the token as device id, both in its QR
    # code (Traccar Client 9.6.2's scanner, lib/qr_code_screen.dart: the URL's origin
    # and path, and `id`; its org.traccar.client: link, lib/configuration_service.dart:
    # `url` and `id`).
    traccar = app_section(dialog, "traccar")
    expect(owntracks.locator(".app-body")).to_be_hidden()  # one app at a time
    tc = shown(traccar)
    assert tc == {"server_url": f"{base_url}/apps/osmand", "device_id": token}, tc
    scanned = urlsplit(read_qr(traccar.get_by_role(
        "img", name="QR code of the Traccar Client setup address")))
    assert f"{scanned.scheme}://{scanned.netloc}{scanned.path}" == tc["server_url"], scanned
    assert parse_qs(scanned.query) == {"id": [token]}, scanned
    traccar_link = urlsplit(traccar.locator("[data-link]").get_attribute("href") or "")
    assert traccar_link.scheme == "org.traccar.client", traccar_link
    assert parse_qs(traccar_link.query) == {"url": [tc["server_url"]], "id": [token]}
    copy = traccar.locator('[data-value="device_id"] + button')
    expect(copy).to_have_accessible_name("Copy the Traccar Client device identifier")
    copy.tap()
    expect(copy).to_have_text("Copied")
    expect(copy).to_have_accessible_name("Copied: the Traccar Client device identifier")
    assert page.evaluate("navigator.clipboard.readText()") == token

    # OsmAnd and GPSLogger: their URL templates, with the same token.
    osmand = shown(app_section(dialog, "osmand"))
    assert osmand["url"].startswith(f"{base_url}/apps/osmand?id={token}&lat={{0}}&lon={{1}}&"), osmand
    gpslogger = shown(app_section(dialog, "gpslogger"))
    assert gpslogger["url"].startswith(
        f"{base_url}/apps/osmand?id={token}&lat=%LAT&lon=%LON&"), gpslogger
    assert gpslogger["method"] == "GET"

    # Overland: its setup link (and QR code), the endpoint and the token.
    overland = app_section(dialog, "overland")
    ov = shown(overland)
    assert ov == {"endpoint": f"{base_url}/apps/overland", "token": token}, ov
    setup = overland.locator("[data-link]").get_attribute("href") or ""
    assert setup.startswith("overland://setup?"), setup
    query = parse_qs(urlsplit(setup).query)
    assert query["url"] == [ov["endpoint"]] and query["token"] == [token], query
    assert read_qr(overland.get_by_role("img", name="QR code of the Overland setup link")) == setup
    expect(dialog.locator(".qr svg")).to_have_count(3)  # OwnTracks, Traccar, Overland
    assert "/vendor/uqr/index.mjs" in asked  # drawn by the library livemap serves

    # The phone reports to the URL shown: its pin, with app and battery, on the page.
    friends = api(ot["url"], {"_type": "location", "lat": 52.5212, "lon": 13.4101,
                              "tst": int(time.time()), "acc": 12, "batt": 76, "tid": "AL"})
    assert isinstance(friends, list), friends
    device = [p for p in pins(base_url, map_name) if p.get("source") == "owntracks"]
    assert len(device) == 1 and device[0]["name"] == "Ada Lovelace" and \
        device[0]["battery"] == 76, device
    device_id = device[0]["id"]
    assert query["device_id"] == [device_id], query
    label = page.locator(f'[data-pin-id="{device_id}"] .pin-label')
    expect(label.locator(".pin-source")).to_have_text("OwnTracks", timeout=WAIT_MS)
    expect(label.locator(".pin-battery")).to_have_text("76%")

    # Escape closes the dialog and gives the focus back; the device is kept:
    # after a reload the dialog shows the same one (no second device).
    opener = page.get_by_role("button", name="Share from a phone app")
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    expect(opener).to_be_focused()
    page.reload(wait_until="domcontentloaded")
    ada.own_id()
    dialog = open_share(ada)
    expect(app_section(dialog, "traccar").locator('[data-value="device_id"]')).to_have_text(token)
    assert len([p for p in pins(base_url, map_name) if "source" in p]) == 1

    # "Stop sharing": the device is deleted, its pin leaves the map, its token is refused.
    dialog.get_by_role("button", name="Stop sharing: delete this device").tap()
    status = dialog.get_by_role("status")
    expect(status).to_have_text(re.compile(r"^Deleted\."), timeout=WAIT_MS)
    expect(status).to_be_focused()
    expect(page.locator(f'[data-pin-id="{device_id}"]')).to_have_count(0, timeout=WAIT_MS)
    assert device_id not in [p["id"] for p in pins(base_url, map_name)]
    assert report_status(ot["url"], {"_type": "location", "lat": 52.52, "lon": 13.41,
                                     "tst": int(time.time())}) == 404
    assert page.evaluate("localStorage.getItem('livemap.devices')") is None
    expect(dialog.locator(".qr svg")).to_have_count(0)
    expect(dialog.get_by_role("button", name="Set up a new device")).to_be_visible()
    dialog.get_by_role("button", name="Done").tap()
    expect(dialog).to_be_hidden()

    assert [text for text in console if token in text] == []  # the token is a secret
    ada.assert_clean()
    ada.context.close()


def test_a_refusal_is_shown_in_the_dialog_and_can_be_tried_again(
        browser: Browser, base_url: str, map_name: str) -> None:
    """On a laptop: the server's reason for refusing a device is shown; "Try again" then works."""
    ada = open_viewer(browser, f"{base_url}/m/{map_name}", geolocation=BERLIN, name="Ada",
                      viewport={"width": 1200, "height": 720})
    ada.own_id()
    page = ada.page
    refused = {"error": "this map is full"}
    page.route("**/api/maps/*/devices", lambda route: route.fulfill(
        status=503, content_type="application/json", body=json.dumps(refused)))
    opener = page.get_by_role("button", name="Share from a phone app")
    opener.click()
    dialog = page.get_by_role("dialog", name="Share from a phone app")
    expect(dialog.get_by_role("status")).to_have_text(
        "Could not set up a device: this map is full.", timeout=WAIT_MS)
    expect(dialog.locator("details[data-app]")).to_have_count(5)
    expect(dialog.locator("#share-apps")).to_be_hidden()
    expect(dialog.get_by_role("button", name="Stop sharing: delete this device")).to_be_hidden()
    # The browser reports the refused request in its console: expected here.
    assert ada.problems and all("503" in problem for problem in ada.problems), ada.problems
    ada.problems.clear()

    page.unroute("**/api/maps/*/devices")
    dialog.get_by_role("button", name="Try again").click()
    expect(dialog.locator('[data-app="owntracks"] [data-value="mode"]')).to_have_text("HTTP",
                                                                                       timeout=WAIT_MS)
    expect(dialog.get_by_role("status")).to_have_text("")
    dialog.get_by_role("button", name="Done").click()
    expect(dialog).to_be_hidden()
    expect(opener).to_be_focused()
    opener.click()
    dialog.get_by_role("button", name="Stop sharing: delete this device").click()
    expect(dialog.get_by_role("status")).to_have_text(re.compile(r"^Deleted\."), timeout=WAIT_MS)
    ada.assert_clean()
    ada.context.close()


def clicked_section(dialog: Locator, app: str) -> Locator:
    """An app's section opened with a click (a desktop has no touch)."""
    section = dialog.locator(f'details[data-app="{app}"]')
    if section.get_attribute("open") is None:
        section.locator("summary").click()
    expect(section.locator(".app-body")).to_be_visible()
    return section


def test_the_dialog_says_what_each_app_needs_on_phone_and_desktop_over_http_and_https(
        browser: Browser, tmp_path: Path) -> None:
    """
    Issue 22 items 3, 4, 6, 7: OwnTracks asks for "Allow external
    configuration" first and lists its values in its Connection screen's
    order, and warns iPhone users when the address is http (iOS blocks it);
    Traccar Client's code and link carry the id; OsmAnd is Android only and
    needs trip recording. On a phone and on a desktop, over http and over
    https (a trusted proxy's X-Forwarded-Proto, as in production).
    """
    server = start_twistd(tmp_path, "--pirate", "none", "--trust-proxy", "127.0.0.1")
    try:
        for layout, options in (("phone", PHONE), ("desktop", DESKTOP)):
            for scheme in ("http", "https"):
                headers = {"X-Forwarded-Proto": scheme}
                viewer = open_viewer(
                    browser, f"{server.url}/m/t-{layout}-{scheme}", geolocation=BERLIN,
                    name="Ada Lovelace", viewport=options["viewport"],
                    mobile=options.get("mobile", False), scale=options.get("scale"),
                    before_load=lambda page: page.set_extra_http_headers(headers))
                viewer.own_id()
                page = viewer.page
                if layout == "phone":
                    dialog = open_share(viewer)
                else:
                    page.get_by_role("button", name="Share from a phone app").click()
                    dialog = page.get_by_role("dialog", name="Share from a phone app")
                where = f"{layout} {scheme}"
                owntracks = dialog.locator('details[data-app="owntracks"]')
                expect(owntracks.locator('[data-value="url"]')).to_have_text(
                    re.compile(f"^{scheme}://"), timeout=WAIT_MS)
                expect(owntracks.locator(".app-hint")).to_have_text(
                    re.compile("once it allows external configuration"))
                how = owntracks.locator(".app-how").inner_text()
                assert how.index("Allow external configuration") < how.index(
                    "Set up OwnTracks"), (where, how)
                labels = owntracks.locator(".values dt").all_inner_texts()
                assert labels == ["Mode", "URL", "Device ID", "Tracker ID"], (where, labels)
                note = owntracks.get_by_text("On iPhone, OwnTracks needs an https address")
                if scheme == "http":
                    expect(note).to_be_visible()
                else:
                    expect(note).to_be_hidden()

                traccar = clicked_section(dialog, "traccar")
                token = traccar.locator('[data-value="device_id"]').inner_text()
                scanned = urlsplit(read_qr(traccar.get_by_role(
                    "img", name="QR code of the Traccar Client setup address")))
                assert (scanned.scheme, parse_qs(scanned.query)) == (scheme, {"id": [token]}), \
                    where
                link = traccar.get_by_role("link", name="Set up Traccar Client")
                expect(link).to_be_visible()
                assert (link.get_attribute("href") or "").startswith("org.traccar.client:"), where

                osmand = clicked_section(dialog, "osmand")
                expect(osmand.locator(".app-hint")).to_have_text(re.compile("Android only"))
                osmand_how = osmand.locator(".app-how").inner_text()
                assert "OsmAnd for iPhone has no online tracking" in osmand_how, where
                assert "start trip recording too" in osmand_how, where
                assert axe_violations(viewer) == [], where
                viewer.assert_clean()
                viewer.context.close()
    finally:
        server.stop()
