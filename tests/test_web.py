"""HTTP routes on the real port: page, assets, API, health, metrics."""

from __future__ import annotations

import json
import re

import pytest
import pytest_twisted
import treq

from livemap_tx.privacy import map_label
from wsclient import connect


async def get(server, path: str, **kwargs):
    response = await treq.get(server.url + path, allow_redirects=False, **kwargs)
    body = await response.content()
    return response, body


@pytest_twisted.ensureDeferred
async def test_root_redirects_to_the_public_map(server):
    response, _ = await get(server, "/")
    assert response.code == 302
    assert response.headers.getRawHeaders("location") == ["/m/public"]


@pytest_twisted.ensureDeferred
async def test_map_page_carries_its_config(server):
    response, body = await get(server, "/m/team-7")
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/html")
    match = re.search(rb'<script id="livemap-config" type="application/json">(.*?)</script>', body)
    config = json.loads(match.group(1))
    assert config["map"] == "team-7" and config["wsPath"] == "/ws/team-7"
    assert config["sockjsPath"] == "/sockjs/team-7" and config["rate"] == 10
    assert "{z}" in config["tiles"] and "OpenStreetMap" in config["attribution"]
    assert b"</a>" not in match.group(1)  # escaped for a script element


@pytest.mark.parametrize("path", ["/m/bad.name", "/m/" + "x" * 65, "/api/maps/a.b/pins",
                                  "/nowhere", "/static/nope.js", "/vendor/jquery/jquery.js",
                                  "/static/"])
@pytest_twisted.ensureDeferred
async def test_unknown_paths_are_404(server, path):
    response, _ = await get(server, path)
    assert response.code == 404


@pytest.mark.parametrize("path, kind", [
    ("/static/app.js", "javascript"), ("/static/style.css", "text/css"),
    ("/vendor/leaflet/leaflet.js", "javascript"), ("/vendor/leaflet/leaflet.css", "text/css"),
    ("/vendor/sockjs-client/sockjs.min.js", "javascript"), ("/favicon.ico", "image/svg+xml")])
@pytest_twisted.ensureDeferred
async def test_assets_are_served_locally(server, path, kind):
    response, body = await get(server, path)
    assert response.code == 200 and body
    assert kind in response.headers.getRawHeaders("content-type")[0]


@pytest_twisted.ensureDeferred
async def test_every_local_asset_the_page_names_exists(server):
    _, body = await get(server, "/m/public")
    paths = re.findall(rb'(?:src|href)="(/[^"]+)"', body)
    assert paths
    for path in paths:
        response, _ = await get(server, path.decode())
        assert response.code == 200, path


@pytest_twisted.ensureDeferred
async def test_healthz(server):
    response, body = await get(server, "/healthz")
    assert (response.code, body) == (200, b"ok")


@pytest_twisted.ensureDeferred
async def test_pins_api_and_metrics_follow_the_map(server):
    client = await connect(server.ws_url("api"))
    me = (await client.next("welcome"))["id"]
    client.send({"type": "move", "lat": 1.5, "lng": -2.5, "seq": 3})
    await client.next("update")
    client.send_raw(b"nope")
    await client.next("error")

    response, body = await get(server, "/api/maps/api/pins")
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    [pin] = json.loads(body)["pins"]
    assert (pin["id"], pin["lat"], pin["lng"], pin["seq"]) == (me, 1.5, -2.5, 3)
    assert json.loads((await get(server, "/api/maps/empty/pins"))[1]) == {"pins": []}

    response, body = await get(server, "/metrics")
    text = body.decode()
    assert response.code == 200
    for line in ["livemap_connections 1.0", "livemap_pins 1.0",
                 f'livemap_map_pins{{map="{map_label("api")}"}} 1.0',
                 "livemap_moves_accepted_total 1.0",
                 'livemap_messages_rejected_total{code="bad_json"} 1.0']:
        assert line in text
    frames = float(re.search(r"^livemap_frames_sent_total (\S+)", text, re.M).group(1))
    sent = float(re.search(r"^livemap_bytes_sent_total (\S+)", text, re.M).group(1))
    assert frames >= 3 and sent > 100
    client.close()
    await client.wait_closed()


@pytest_twisted.ensureDeferred
async def test_metrics_follow_prometheus_naming(server):
    """What promtool's lint checks: counters end in _total, nothing else does, all have help."""
    from prometheus_client.parser import text_string_to_metric_families

    client = await connect(server.ws_url("lint"))
    await client.next("welcome")
    client.send({"type": "move", "lat": 1, "lng": 2})
    await client.next("update")
    _, body = await get(server, "/metrics")
    families = list(text_string_to_metric_families(body.decode()))
    assert families
    for family in families:
        assert family.documentation, family.name
        assert re.fullmatch(r"[a-z_][a-z0-9_]*", family.name), family.name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
        else:
            assert not family.name.endswith("_total"), f"{family.type} {family.name}"
            assert not any(s.name.endswith("_total") for s in family.samples), family.name
    client.close()
    await client.wait_closed()
