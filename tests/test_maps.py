"""Private maps: unguessable names, expiry, and which names exist."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
import treq
from twisted.internet.task import Clock

from livemap_tx.maps import DirectoryFull, MapDirectory, parse_ttl
from wsclient import connect


def test_private_names_are_unguessable_and_well_formed():
    directory = MapDirectory(Clock())
    names = {directory.create().name for _ in range(200)}
    assert len(names) == 200
    for name in names:
        assert len(name) == 24 and directory.exists(name)


@pytest.mark.parametrize("open_maps, public, name, exists", [
    (True, True, "anything", True), (True, True, "public", True),
    (False, True, "anything", False), (False, True, "public", True),
    (False, False, "public", False), (True, False, "public", False),
    (True, True, "bad.name", False),
])
def test_which_names_exist(open_maps, public, name, exists):
    assert MapDirectory(Clock(), open_maps=open_maps, public=public).exists(name) is exists


def test_private_map_expires_and_reports_it():
    clock = Clock()
    expired = []
    directory = MapDirectory(clock, open_maps=False, on_expire=expired.append)
    entry = directory.create(ttl=900)
    forever = directory.create()
    clock.advance(899)
    assert directory.exists(entry.name) and expired == []
    clock.advance(1)
    assert not directory.exists(entry.name) and expired == [entry.name]
    assert directory.exists(forever.name)
    directory.open_maps = True  # an expired link stays dead even on open maps
    assert not directory.exists(entry.name)
    clock.advance(3 * 24 * 3600)
    assert entry.name not in directory.private  # the tombstone is bounded in time


def test_directory_is_bounded():
    directory = MapDirectory(Clock(), max_private=2)
    directory.create()
    directory.create()
    with pytest.raises(DirectoryFull):
        directory.create()


@pytest.mark.parametrize("raw, ttl", [(None, None), ("never", None), ("900", 900.0),
                                      ("259200", 259200.0)])
def test_parse_ttl(raw, ttl):
    assert parse_ttl(raw) == ttl


@pytest.mark.parametrize("raw", ["899", "259201", "soon", "nan", "-5"])
def test_parse_ttl_rejects(raw):
    with pytest.raises(ValueError):
        parse_ttl(raw)


@pytest_twisted.ensureDeferred
async def test_create_a_private_map_through_the_api(server):
    server.site.directory.open_maps = False
    response = await treq.post(server.url + "/api/maps?ttl=3600")
    assert response.code == 201
    body = json.loads(await response.content())
    name = body["map"]
    assert body["path"] == f"/m/{name}" and body["url"].endswith(body["path"])
    assert body["expires"] > 0
    assert response.headers.getRawHeaders("location") == [body["path"]]
    assert (await treq.get(server.url + body["path"])).code == 200
    client = await connect(server.ws_url(name))
    assert (await client.next())["type"] == "welcome"
    client.close()
    await client.wait_closed()
    # Closed maps: other names are 404 and refused upgrades.
    assert (await treq.get(server.url + "/m/guessed")).code == 404
    with pytest.raises(Exception):
        await connect(server.ws_url("guessed"))
    assert (await treq.get(server.url + "/sockjs/guessed/info")).code == 404


@pytest.mark.parametrize("query", ["?ttl=10", "?ttl=forever", "?ttl=999999999"])
@pytest_twisted.ensureDeferred
async def test_bad_ttl_is_400(server, query):
    response = await treq.post(server.url + "/api/maps" + query)
    assert response.code == 400
    assert json.loads(await response.content())["error"] == "bad_ttl"


@pytest_twisted.ensureDeferred
async def test_expired_map_closes_its_clients_and_refuses_new_ones(server):
    directory = server.site.directory
    directory.on_expire = lambda name: server.hub.close_map(name, 1008, "map expired")
    entry = directory.create(ttl=3600)
    client = await connect(server.ws_url(entry.name))
    await client.next("welcome")
    entry.call.reset(0)  # fast-forward the expiry
    code, reason = await client.wait_closed()
    assert (code, reason) == (1008, "map expired")
    with pytest.raises(Exception):
        await connect(server.ws_url(entry.name))
