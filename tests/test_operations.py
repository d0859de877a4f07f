"""Operating the real daemon: options for maps and privacy, log reopening, shutdown of every transport."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import pytest_twisted
import treq
from twisted.python import usage

from conftest import deferLater, start_twistd
from livemap_tx.privacy import coarsen
from livemap_tx.service import Options
from wsclient import connect


@pytest.mark.parametrize("args, named", [
    (["--trust-proxy", "10.0.0.0/33"], "--trust-proxy"),
    (["--allow-origin", "evil.example"], "--allow-origin"),
    (["--max-per-ip", "0"], "--max-per-ip"), (["--max-connections", "lots"], "--max-connections"),
    (["--precision", "-1"], "--precision"), (["--expire", "0"], "--expire"),
    (["--header-timeout", "0"], "--header-timeout"),
    (["--open-maps", "--no-open-maps"], "--open-maps"),
])
def test_bad_operational_values_name_the_option(args, named):
    with pytest.raises(usage.UsageError, match=named):
        Options().parseOptions(args)


def test_operational_defaults():
    options = Options()
    options.parseOptions(["--trust-proxy", "10.0.0.0/8, ::1", "--allow-origin",
                          "https://a.example,https://b.example"])
    assert (options["max-connections"], options["max-per-ip"], options["max-maps"],
            options["max-pins-per-map"]) == (20000, 5000, 10000, 50000)
    assert (options["precision"], options["stale"], options["expire"]) == (0.0, 600.0, 3600.0)
    assert (options["no-open-maps"], options["no-public"]) == (0, 0)


async def get(url):
    response = await treq.get(url)
    return response.code, await response.content()


@pytest_twisted.ensureDeferred
async def test_closed_maps_precision_and_pin_expiry_in_the_daemon(tmp_path):
    server = start_twistd(tmp_path, "--pirate", "none", "--no-open-maps", "--precision", "1000",
                          "--expire", "1")
    try:
        assert (await get(server.url + "/m/guessed"))[0] == 404
        assert (await get(server.url + "/m/public"))[0] == 200
        created = json.loads(await (await treq.post(server.url + "/api/maps")).content())
        assert (await get(server.url + created["path"]))[0] == 200

        client = await connect(server.ws_url(created["map"]))
        await client.next("welcome")
        client.send({"type": "move", "lat": 48.85837, "lng": 2.29448, "accuracy": 3})
        [pin] = (await client.next("update"))["pins"]
        assert (pin["lat"], pin["lng"]) == coarsen(48.85837, 2.29448, 1000)
        assert pin["accuracy"] == 1000
        # --expire 1: without a new fix the pin leaves the map, the client stays.
        gone = await client.until(lambda m: m["type"] == "update" and m["gone"], timeout=10)
        assert gone["gone"] == [pin["id"]]
        code, body = await get(f"{server.url}/api/maps/{created['map']}/pins")
        assert (code, json.loads(body)) == (200, {"pins": []})
        client.close()
        await client.wait_closed()
    finally:
        server.stop()


@pytest_twisted.ensureDeferred
async def test_no_public_map(tmp_path):
    server = start_twistd(tmp_path, "--pirate", "none", "--no-public", "--no-open-maps")
    try:
        assert (await get(server.url + "/m/public"))[0] == 404
        with pytest.raises(Exception):
            await connect(server.ws_url("public"))
    finally:
        server.stop()


@pytest_twisted.ensureDeferred
async def test_sighup_reopens_the_log_file(tmp_path):
    log_path = tmp_path / "livemap.log"
    server = start_twistd(tmp_path, "--pirate", "none", pre=["--logfile", str(log_path)])
    try:
        rotated = tmp_path / "livemap.log.1"
        os.rename(log_path, rotated)
        server.process.send_signal(signal.SIGHUP)
        for _ in range(100):
            if log_path.exists() and "reopened" in log_path.read_text():
                break
            await deferLater(0.05)
        assert "reopened 1 log file" in log_path.read_text()
        await get(server.url + "/static/app.js")
        for _ in range(100):  # later lines go to the new file, not the moved one
            if "GET /static/app.js" in log_path.read_text():
                break
            await deferLater(0.05)
        assert "GET /static/app.js" in log_path.read_text()
        assert "GET /static/app.js" not in rotated.read_text()
    finally:
        server.stop()


@pytest_twisted.ensureDeferred
async def test_sigterm_closes_sockjs_sessions_with_1001_too(tmp_path):
    server = start_twistd(tmp_path, "--pirate", "none")
    try:
        base = f"{server.url}/sockjs/public/000/sess1"
        opened = await treq.post(base + "/xhr")
        assert (await opened.content()).startswith(b"o")
        pending = treq.post(base + "/xhr")  # a long poll waiting for messages
        welcome = await pending
        assert b"welcome" in await welcome.content()
        waiting = treq.post(base + "/xhr")
        await deferLater(0.2)
        started = time.monotonic()
        server.process.terminate()
        closed = await (await waiting).content()
        assert closed.startswith(b'c[1001,'), closed
        assert server.process.wait(10) in (0, -15)
        assert time.monotonic() - started < 5
    finally:
        server.stop()
