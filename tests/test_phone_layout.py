"""
The page's rough edges for a newcomer, in headless Chromium: on a
360-pixel-wide phone the people list's one-line summary is whole (not cut
at the screen's edge), the viewer's own row shows their chosen name or a
neutral word (never "you" twice), and on a large screen the phone-app
button says what it is in words.
"""

from __future__ import annotations

import os

import pytest
from playwright.sync_api import Browser, expect

from test_browser import BERLIN, CHROMIUM, NEARBY, Viewer, base_url, browser, map_name  # noqa: F401
from test_browser import open_viewer

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason="Debian chromium is not installed")

NARROW = {"viewport": {"width": 360, "height": 740}, "mobile": True, "scale": 2}
LONG_NAME = "Maximiliane Alexandrowna von Hohenzollern-Sigmaringen"


def summary_box(viewer: Viewer) -> dict:
    return viewer.page.evaluate("""() => {
        const el = document.getElementById('people-summary');
        const r = el.getBoundingClientRect();
        return {text: el.textContent, left: r.left, right: r.right, width: r.width,
                scrollWidth: el.scrollWidth, clientWidth: el.clientWidth,
                viewport: document.documentElement.clientWidth};
    }""")


def own_row_text(viewer: Viewer, own: str) -> tuple[str, str]:
    row = viewer.page.locator(f'[data-people-list] [data-person-id="{own}"]')
    expect(row).to_be_visible()
    return (row.locator(".person-name").inner_text().strip(),
            " ".join(row.inner_text().split()))


def test_a_narrow_phone_shows_the_whole_summary_and_a_neutral_word_for_the_unnamed_viewer(
        browser: Browser, base_url: str, map_name: str) -> None:  # noqa: F811 (fixtures)
    url = f"{base_url}/m/{map_name}"
    far = open_viewer(browser, url, geolocation=NEARBY, name=LONG_NAME)
    me = open_viewer(browser, url, geolocation=BERLIN, **NARROW)  # no name chosen yet
    try:
        far_id = far.own_id()
        own = me.own_id()
        me.wait("(id) => window.livemap.pin(id) !== null", far_id)
        me.wait("(id) => window.livemap.pin(id) !== null", own)

        # The one line at the bottom: the count and the nearest person, whole.
        expect(me.page.locator("#people-summary")).to_contain_text(LONG_NAME)
        box = summary_box(me)
        assert box["viewport"] == 360
        assert LONG_NAME in box["text"] and "nearest:" in box["text"], box
        assert box["scrollWidth"] <= box["clientWidth"] + 1, box  # nothing hidden by overflow
        assert box["left"] >= 0 and box["right"] <= box["viewport"], box
        me.page.screenshot(path=str(me_path(me)), full_page=False)

        # The list, opened with a tap: the unnamed viewer is a neutral word
        # beside the "you" badge, never "you" twice.
        me.page.locator("[data-people-toggle]").tap()
        expect(me.page.locator("[data-people-list]")).to_be_visible()
        name, text = own_row_text(me, own)
        assert name == "anonymous", text
        assert "you you" not in text.lower(), text

        # Once a name is chosen, the row shows it.
        me.page.locator("[data-people-toggle]").tap()
        me.page.locator("#name").fill("Grace")
        me.page.locator("#name").press("Enter")
        me.page.locator("#name").blur()
        me.wait("(id) => (window.livemap.pin(id) || {}).name === 'Grace'", own)
        me.page.locator("[data-people-toggle]").tap()
        name, text = own_row_text(me, own)
        assert name == "Grace", text
        me.assert_clean()
        far.assert_clean()
    finally:
        for viewer in (me, far):
            viewer.context.close()


def me_path(viewer: Viewer):  # a picture of the narrow layout, for a person to look at
    from conftest import ARTIFACTS
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS / "phone-360-summary.png"


def test_the_phone_app_button_on_a_large_screen_says_it_in_words(
        browser: Browser, base_url: str, map_name: str) -> None:  # noqa: F811 (fixtures)
    viewer = open_viewer(browser, f"{base_url}/m/{map_name}", geolocation=BERLIN,
                         viewport={"width": 1200, "height": 720})
    try:
        viewer.own_id()
        button = viewer.page.locator("#share-app-wide")
        expect(button).to_be_visible()
        assert button.inner_text().strip() == "Phone app"
        box = button.bounding_box()
        panel = viewer.page.locator("#panel").bounding_box()
        assert box is not None and panel is not None
        assert box["x"] + box["width"] <= panel["x"] + panel["width"]  # inside the panel
        assert (button.get_attribute("aria-label") or "").lower().endswith("phone app")
        viewer.assert_clean()
    finally:
        viewer.context.close()
