"""
The sqlite store of a single node (sqlite_store.py): what it writes comes
back when it is opened again, a file it may not use is refused and left
untouched, and memory (DiskDevices) says what the disk says.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from livemap_tx.phones.devices import Devices, Fix, UnknownDevice, token_hash
from livemap_tx.hub import Hub
from livemap_tx.maps import TOMBSTONE, DirectoryUnavailable, MapDirectory
from livemap_tx.sqlite_store import (
    FILE_NAME,
    SCHEMA_VERSION,
    DiskDevices,
    SqliteStore,
    StoreError,
    default_data_dir,
    restore,
)

NOW = 1_800_000_000.0
FRESH, STALE, SILENT, DEAD = (token_hash(letter * 32) for letter in "FOSD")


def run(coroutine: Any) -> Any:
    """The result of a coroutine on memory alone (it finishes at once)."""
    result: list[Any] = []
    defer.Deferred.fromCoroutine(coroutine).addBoth(result.append)
    [outcome] = result
    if isinstance(outcome, Failure):
        outcome.raiseException()
    return outcome


@pytest.fixture
def opened(tmp_path: Path) -> Any:
    stores: list[SqliteStore] = []

    def open_store(where: Path = tmp_path / "data") -> SqliteStore:
        store = SqliteStore.open(where, reactor)
        stores.append(store)
        store.start()
        return store
    yield open_store
    for store in stores:
        if store.pool.started:
            if store.db is not None:
                store.wait(store.db.close)
                store.db = None
            store.pool.stop()
        store._unlock()


def record(map_name: str, pin_id: str, expires_ms: Any = None) -> dict:
    return {"m": map_name, "i": pin_id, "n": "Ada", "x": expires_ms}


def entry(version: int, pin_id: str, lat: float, ts_ms: int) -> bytes:
    pin = {"id": pin_id, "lat": lat, "lng": 13.4, "heading": None, "accuracy": None,
           "name": "Ada", "seq": None, "ts": ts_ms, "source": "owntracks", "battery": 80}
    return b"[%d,%s]" % (version, orjson.dumps(pin))


def test_a_new_store_is_a_wal_file_of_this_schema_in_a_private_directory(tmp_path, opened):
    store = opened(tmp_path / "deep" / "data")
    assert store.path == (tmp_path / "deep" / "data" / FILE_NAME).absolute()
    assert os.stat(store.path.parent).st_mode & 0o777 == 0o700
    assert store.wait(lambda: store.db.execute("PRAGMA journal_mode").fetchone()[0]) == "wal"
    assert store.wait(lambda: store.db.execute("PRAGMA user_version").fetchone()[0]) \
        == SCHEMA_VERSION


def test_every_statement_runs_on_the_stores_own_thread(opened):
    store = opened()
    seen = store.wait(threading.current_thread)
    assert seen is not threading.current_thread()
    assert "livemap-store" in seen.name


@pytest_twisted.ensureDeferred
async def test_what_is_written_comes_back_when_opened_again(tmp_path, opened):
    store = opened()
    forever, later = "a" * 24, "b" * 24
    await store.add_map(forever, None)
    await store.add_map(later, int(NOW * 1000) + 60_000)
    await store.add_device("h1", record("family", "p1"), NOW * 1000 + 1e6)
    await store.add_device("h2", record(later, "p2", int(NOW * 1000) + 60_000),
                           NOW * 1000 + 60_000)
    await store.save_fix("h1", 5, entry(5, "p1", 1.0, 1000), NOW * 1000 + 2e6)
    # An older fix written late never replaces a newer one.
    await store.save_fix("h1", 4, entry(4, "p1", 0.5, 900), NOW * 1000 + 2e6)
    await store.save_fix("unknown", 4, entry(4, "p9", 0.5, 900), NOW * 1000 + 2e6)
    await store.close()

    again = opened()
    contents = again.wait(again.read, NOW * 1000)
    assert sorted(contents.maps) == [(forever, None), (later, int(NOW * 1000) + 60_000)]
    by_hash = {device.token_hash: device for device in contents.devices}
    assert sorted(by_hash) == ["h1", "h2"]
    assert by_hash["h1"].record == record("family", "p1")
    assert (by_hash["h1"].version, by_hash["h1"].entry) == (5, entry(5, "p1", 1.0, 1000))
    assert by_hash["h1"].forget_at_ms == NOW * 1000 + 2e6
    assert by_hash["h2"].version is None and by_hash["h2"].entry is None

    await again.remove_device("h1")
    await again.forget_map(later)  # its devices go, its tombstone stays
    contents = again.wait(again.read, NOW * 1000)
    assert contents.devices == []
    assert len(contents.maps) == 2


@pytest_twisted.ensureDeferred
async def test_what_is_over_is_forgotten_on_reading_and_pruning(opened):
    store = opened()
    now_ms = NOW * 1000
    await store.add_map("expired-long-ago-xxxxxxxx", int(now_ms - TOMBSTONE * 1000 - 1))
    await store.add_map("expired-a-moment-ago-xxxx", int(now_ms - 1000))
    await store.add_device("gone", record("family", "p1"), now_ms - 1)
    await store.add_device("kept", record("family", "p2"), now_ms + 1000)
    contents = store.wait(store.read, now_ms)
    assert [name for name, _ in contents.maps] == ["expired-a-moment-ago-xxxx"]
    assert [device.token_hash for device in contents.devices] == ["kept"]
    await store.prune(now_ms + 2000)
    assert store.wait(store.read, now_ms).devices == []


@pytest_twisted.ensureDeferred
async def test_writes_asked_together_share_a_commit_and_fail_alone(opened):
    store = opened()
    jobs = []
    run = store.run

    def counted(work: Any, *args: Any) -> defer.Deferred:
        jobs.append(work)
        return run(work, *args)
    store.run = counted  # type: ignore[method-assign]
    writes = [store.add_device(f"h{n}", record("family", f"p{n}"), NOW * 1000 + 1e6)
              for n in range(100)]
    bad = store._submit(False, [("INSERT INTO no_such_table VALUES (1)", ())])
    writes += [store.save_fix(f"h{n}", 1, entry(1, f"p{n}", 1.0, 5), NOW * 1000 + 1e6)
               for n in range(100)]
    await defer.gatherResults(writes)
    with pytest.raises(sqlite3.OperationalError):
        await bad
    # The first write went alone; everything asked meanwhile, in one more.
    assert len(jobs) == 2
    contents = store.wait(store.read, NOW * 1000)
    assert len(contents.devices) == 100 and {d.version for d in contents.devices} == {1}
    # Closing waits for what was asked before.
    last = store.remove_device("h0")
    await store.close()
    assert last.called
    assert not store.pool.started


def file_bytes(path: Path) -> dict[str, bytes]:
    return {child.name: child.read_bytes() for child in sorted(path.iterdir())}


def refused(where: Path, *words: str) -> str:
    with pytest.raises(StoreError) as caught:
        SqliteStore.open(where, reactor)
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


def test_a_file_that_is_not_a_database_is_refused_and_untouched(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / FILE_NAME).write_bytes(b"SQLite format 2\0" + os.urandom(4096))
    before = file_bytes(data)
    refused(data, "damaged", FILE_NAME)
    assert file_bytes(data) == before


def test_a_damaged_database_is_refused_and_untouched(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    path = data / FILE_NAME
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE private_maps (name TEXT PRIMARY KEY, expires_ms INTEGER)")
    db.execute("CREATE TABLE devices (token_hash TEXT PRIMARY KEY, map TEXT NOT NULL,"
               " record BLOB NOT NULL, forget_at_ms INTEGER NOT NULL, version INTEGER,"
               " entry BLOB)")
    db.executemany("INSERT INTO devices VALUES (?, 'm', ?, 1, NULL, NULL)",
                   [(f"h{n}", b"x" * 300) for n in range(200)])
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    db.commit()
    db.close()
    raw = bytearray(path.read_bytes())
    page = 4096
    raw[3 * page:3 * page + 200] = os.urandom(200)  # scribble over a b-tree page
    path.write_bytes(bytes(raw))
    before = file_bytes(data)
    refused(data, "damaged")
    assert file_bytes(data) == before


def test_a_store_of_a_newer_schema_is_refused_and_untouched(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    db = sqlite3.connect(data / FILE_NAME)
    db.execute("CREATE TABLE devices (anything)")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    before = file_bytes(data)
    refused(data, "newer livemap", str(SCHEMA_VERSION + 1))
    assert file_bytes(data) == before


def test_another_programs_database_is_refused_and_untouched(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    db = sqlite3.connect(data / FILE_NAME)
    db.execute("CREATE TABLE notes (text)")
    db.commit()
    db.close()
    before = file_bytes(data)
    refused(data, "not a livemap store")
    assert file_bytes(data) == before


def test_a_data_directory_that_is_a_file_or_cannot_be_made_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"mine")
    refused(blocker, "not a directory")
    refused(blocker / "data", "cannot create the data directory")
    assert blocker.read_bytes() == b"mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to a read-only directory")
def test_a_read_only_data_directory_is_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir(mode=0o500)
    refused(data, "data")
    assert list(data.iterdir()) == []


def test_a_data_directory_in_use_by_another_process_is_refused(tmp_path, opened):
    data = tmp_path / "data"
    opened(data)
    code = ("import sys; from twisted.internet import reactor; "
            "from livemap_tx.sqlite_store import SqliteStore, StoreError\n"
            "try:\n    SqliteStore.open(sys.argv[1], reactor)\n"
            "except StoreError as error:\n    print(error); sys.exit(3)")
    result = subprocess.run([sys.executable, "-c", code, str(data)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 3, result.stderr
    assert "in use by another livemap process" in result.stdout


def test_the_default_data_directory_follows_systemd_then_xdg_then_home():
    assert default_data_dir({"STATE_DIRECTORY": "/var/lib/livemap:/other"}) \
        == Path("/var/lib/livemap")
    assert default_data_dir({"XDG_STATE_HOME": "/home/ada/state"}) \
        == Path("/home/ada/state/livemap")
    # Relative XDG paths are to be ignored (the XDG spec).
    assert default_data_dir({"XDG_STATE_HOME": "relative"}) \
        == Path.home() / ".local" / "state" / "livemap"
    assert default_data_dir({}) == Path.home() / ".local" / "state" / "livemap"


# DiskDevices: memory decides, the disk has it before the answer


@pytest_twisted.ensureDeferred
async def test_disk_devices_answer_once_the_disk_has_it(opened):
    store = opened()
    disk = DiskDevices(store)
    pending = disk.add_device("h1", record("family", "p1"), NOW * 1000 + 1e6, cap=10,
                              now_ms=NOW * 1000)
    assert not pending.called  # not before the disk has it
    assert await pending == "added"
    assert [d.token_hash for d in store.wait(store.read, NOW * 1000).devices] == ["h1"]
    assert await disk.save_fix("h1", "family", 7, entry(7, "p1", 1.0, 5), NOW * 1000,
                               NOW * 1000 + 2e6) == "saved"
    assert await disk.save_fix("h1", "family", 6, entry(6, "p1", 0.0, 4), NOW * 1000,
                               NOW * 1000 + 2e6) == "older"
    assert store.wait(store.read, NOW * 1000).devices[0].version == 7
    assert await disk.add_device("h2", record("family", "p2"), NOW * 1000 + 1e6, cap=1,
                                 now_ms=NOW * 1000) == "full"
    assert await disk.remove_device("h1", "family", "p1") is True
    assert store.wait(store.read, NOW * 1000).devices == []


@pytest_twisted.ensureDeferred
async def test_a_write_that_fails_is_undone_in_memory_and_fails_the_request(opened):
    store = opened()
    disk = DiskDevices(store)
    assert await disk.add_device("h1", record("family", "p1"), NOW * 1000 + 1e6, cap=10,
                                 now_ms=NOW * 1000) == "added"
    assert await disk.save_fix("h1", "family", 7, b"[7,{}]", NOW * 1000,
                               NOW * 1000 + 1e6) == "saved"
    # The disk goes away (closed): nothing more is promised.
    store.wait(store.db.close)
    store.db = None
    with pytest.raises(StoreError):
        await disk.add_device("h2", record("family", "p2"), NOW * 1000 + 1e6, cap=10,
                              now_ms=NOW * 1000)
    assert "h2" not in disk.records
    with pytest.raises(StoreError):
        await disk.save_fix("h1", "family", 8, b"[8,{}]", NOW * 1000, NOW * 1000 + 2e6)
    assert disk.versions["h1"] == 7 and disk.records["h1"][1] == NOW * 1000 + 1e6
    with pytest.raises(StoreError):
        await disk.remove_device("h1", "family", "p1")
    assert "h1" in disk.records and disk.versions["h1"] == 7


@pytest_twisted.ensureDeferred
async def test_a_private_map_is_given_only_once_it_is_on_disk(opened):
    store = opened()
    clock = Clock()
    clock.advance(NOW)
    directory = MapDirectory(clock, min_ttl=1, persist=store.add_map)
    entry_ = await directory.create_private(30)
    assert store.wait(store.read, NOW * 1000).maps == [(entry_.name, round((NOW + 30) * 1000))]

    def failing(name: str, expires_ms: Any) -> defer.Deferred:
        return defer.fail(OSError("disk full"))
    directory.persist = failing
    with pytest.raises(DirectoryUnavailable):
        await directory.create_private(30)
    assert [name for name, _ in directory.entries()] == [entry_.name]
    assert not clock.getDelayedCalls()[1:]  # the failed map's expiry is cancelled too


# Start-up: back in memory and on the map


@pytest_twisted.ensureDeferred
async def test_restore_brings_back_maps_devices_and_pins_within_expire(opened):
    store = opened()
    clock = Clock()
    clock.advance(NOW)
    now_ms = int(NOW * 1000)
    ids = (f"new{n}" for n in itertools.count())
    hub = Hub(clock, tick_interval=0.1, new_id=lambda: next(ids))
    directory = MapDirectory(clock, min_ttl=1)
    disk = DiskDevices(store)
    devices = Devices(hub, directory, clock, expire=600.0, store=disk)
    live_map, dead_map = "L" * 24, "D" * 24

    writes = [
        store.add_map(live_map, now_ms + 60_000),
        store.add_map(dead_map, now_ms - 1000),  # expired while the node was down
        store.add_device(FRESH, record("family", "p-fresh"), now_ms + 1e6),
        store.save_fix(FRESH, 11, entry(11, "p-fresh", 1.5, now_ms - 10_000), now_ms + 1e6),
        store.add_device(STALE, record("family", "p-stale"), now_ms + 1e6),
        store.save_fix(STALE, 12, entry(12, "p-stale", 2.5, now_ms - 700_000), now_ms + 1e6),
        store.add_device(SILENT, record(live_map, "p-silent", now_ms + 60_000),
                         now_ms + 60_000),
        store.add_device(DEAD, record(dead_map, "p-dead", now_ms - 1000), now_ms + 1e6),
    ]
    await defer.gatherResults(writes, consumeErrors=True)

    restore(store.wait(store.read, now_ms), directory, devices, disk, NOW)
    assert directory.exists(live_map) and directory.expiry(live_map) == NOW + 60
    assert directory.is_expired(dead_map)  # a tombstone: never an open map
    assert sorted(disk.records) == sorted([FRESH, STALE, SILENT])
    assert disk.versions == {FRESH: 11, STALE: 12}
    shown = {pin["id"]: pin for pin in hub.pins("family")}
    assert sorted(shown) == ["p-fresh"]  # the stale fix is older than --expire
    assert shown["p-fresh"]["lat"] == 1.5 and shown["p-fresh"]["battery"] == 80
    # Each token finds its device again, and reports move its pin.
    device = run(devices.find("F" * 32))
    assert (device.id, device.map) == ("p-fresh", "family")
    assert run(devices.find("S" * 32)).expires == NOW + 60
    clock.advance(1)
    assert await devices.report(device, Fix(1.6, 13.4, int(clock.seconds() * 1000),
                                            "owntracks")) == "moved"
    assert hub.pins("family")[0]["lat"] == 1.6
    with pytest.raises(UnknownDevice):
        run(devices.find("D" * 32))  # its map expired
