"""
The page itself at the edge of the rate limit: a real `twistd livemap
--rate 2` and the real page in Chromium, its position and heading changing
much faster than the rate for a minute. The page sends at its own pace
(about `rate` a second, with the network's and the browser's jitter); the
server must never close it (docs/protocol.md, "Move rate").
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import TwistdServer, start_twistd
from test_browser import BERLIN, open_viewer, set_compass
from test_browser import browser, map_name  # noqa: F401 (fixtures)
from playwright.sync_api import Browser

RUN_SECONDS = 60.0


@pytest.fixture
def slow_rate_server(tmp_path: Path) -> Iterator[TwistdServer]:
    server = start_twistd(tmp_path, "--pirate", "none", "--rate", "2")
    yield server
    server.stop()


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

    viewer = open_viewer(browser, f"{slow_rate_server.url}/m/{map_name}", geolocation=BERLIN,
                         name="Edge", before_load=watch)
    viewer.own_id()
    started = time.monotonic()
    step = 0
    while time.monotonic() - started < RUN_SECONDS:
        step += 1
        viewer.context.set_geolocation({"latitude": BERLIN["latitude"] + 0.0001 * step,
                                        "longitude": BERLIN["longitude"], "accuracy": 12})
        set_compass(viewer.page, (step * 37) % 360)
        viewer.page.wait_for_timeout(100)  # ten changes a second: five times the rate
    moves = sum(record["sent"] for record in sockets)
    assert [record["closed"] for record in sockets] == [False], sockets
    # It did send at the edge: about two a second for the whole minute.
    assert moves >= RUN_SECONDS * 1.5, moves
    assert "rate limit exceeded" not in slow_rate_server.log()
    viewer.assert_clean()
    viewer.context.close()
