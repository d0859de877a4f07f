"""
The page itself at the edge of the rate limit: a real `twistd livemap
--rate 2` and the real page in Chromium, its position and heading changing
much faster than the rate for a minute. The page sends at its own pace
(about `rate` a second); between it and the server, the test delays each
of its messages by a random time of up to JITTER seconds (keeping their
order), as a congested mobile network does. The server must never close it
(docs/protocol.md, "Move rate").
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import TwistdServer, start_twistd
from test_browser import BERLIN, open_viewer
from test_browser import browser, map_name  # noqa: F401 (fixtures)
from playwright.sync_api import Browser

RUN_SECONDS = 60.0
JITTER = 0.6


class JitteryLink:
    """
    Stands between the page's WebSocket and the server (Playwright's
    route_web_socket): each message from the page is held for a random
    0 to JITTER s, in order, and released by `pump` (the test calls it).
    """

    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)
        self.held: list[tuple[float, Any]] = []
        self.servers: list[Any] = []
        self.forwarded = 0

    def install(self, page: Any) -> None:
        page.route_web_socket(re.compile(r"/ws/"), self._handle)

    def _handle(self, route: Any) -> None:
        server = route.connect_to_server()
        self.servers.append(server)

        def from_page(message: Any) -> None:
            due = time.monotonic() + self.random.uniform(0, JITTER)
            if self.held:
                due = max(due, self.held[-1][0])
            self.held.append((due, message))
        route.on_message(from_page)

    def pump(self) -> None:
        now = time.monotonic()
        while self.held and self.held[0][0] <= now:
            _, message = self.held.pop(0)
            self.servers[-1].send(message)
            self.forwarded += 1


@pytest.fixture
def slow_rate_server(tmp_path: Path) -> Iterator[TwistdServer]:
    server = start_twistd(tmp_path, "--pirate", "none", "--rate", "2")
    yield server
    server.stop()


@pytest.mark.waits  # mostly waiting: scripts/test runs it beside the rest
def test_the_page_at_rate_2_is_never_closed_in_a_minute(
        browser: Browser, slow_rate_server: TwistdServer, map_name: str) -> None:
    sockets: list[dict[str, Any]] = []

    def watch(page: Any) -> None:
        def opened(ws: Any) -> None:
            record: dict[str, Any] = {"url": ws.url, "sent": 0, "closed": False, "errors": []}
            sockets.append(record)

            def sent(payload: Any) -> None:
                if isinstance(payload, str) and '"move"' in payload:
                    record["sent"] += 1

            def received(payload: Any) -> None:
                if isinstance(payload, str) and '"error"' in payload:
                    record["errors"].append(json.loads(payload))
            ws.on("framesent", sent)
            ws.on("framereceived", received)
            ws.on("close", lambda _: record.update(closed=True))
        page.on("websocket", opened)

    link = JitteryLink(seed=23)

    def prepare(page: Any) -> None:
        watch(page)
        link.install(page)
    viewer = open_viewer(browser, f"{slow_rate_server.url}/m/{map_name}", geolocation=BERLIN,
                         name="Edge", before_load=prepare)
    viewer.page.wait_for_function("() => window.livemap")
    while not link.servers:
        viewer.page.wait_for_timeout(20)
    # The compass turns 37 degrees every 50 ms, by the page's own timer (it
    # goes on while the test sleeps): the page always has a move to send.
    viewer.page.evaluate("""() => { let heading = 0; setInterval(() => {
        heading = (heading + 37) % 360;
        window.dispatchEvent(new DeviceOrientationEvent('deviceorientationabsolute',
            {alpha: (360 - heading) % 360, beta: 0, gamma: 0, absolute: true}));
    }, 50); }""")
    started = time.monotonic()
    step = 0
    while time.monotonic() - started < RUN_SECONDS:
        step += 1
        if step % 5 == 0:
            viewer.context.set_geolocation({"latitude": BERLIN["latitude"] + 0.0001 * step,
                                            "longitude": BERLIN["longitude"], "accuracy": 12})
        viewer.page.wait_for_timeout(20)
        link.pump()
    moves = sum(record["sent"] for record in sockets)
    assert [record["closed"] for record in sockets] == [False], sockets
    assert len(link.servers) == 1
    # It did send at the edge: about two a second for the whole minute.
    assert moves >= RUN_SECONDS * 1.5, moves
    assert "rate limit exceeded" not in slow_rate_server.log()
    viewer.assert_clean()
    viewer.context.close()
