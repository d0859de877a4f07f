"""
A single default node (no --redis) keeps its promises across restarts:
real `twistd -n livemap` processes on the default sqlite store, stopped
with SIGTERM or killed with SIGKILL, then started again on the same data
directory. And a store it cannot use stops it at once, with one line,
leaving the file as it was.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
import pytest_twisted
import treq

from conftest import TwistdServer, deferLater, free_port, start_twistd, twistd_command

TOKENS = 4
# A node that stopped answering fails the test rather than hanging it.
REQUEST_TIMEOUT = 30


async def make_device(node: TwistdServer, map_name: str, name: str) -> dict:
    response = await treq.post(f"{node.url}/api/maps/{map_name}/devices",
                               data=orjson.dumps({"name": name}), timeout=REQUEST_TIMEOUT)
    body = orjson.loads(await response.content())
    assert response.code == 201, body
    return body


async def owntracks(node: TwistdServer, token: str, lat: float, tst: float) -> int:
    response = await treq.post(f"{node.url}/apps/owntracks/{token}", data=orjson.dumps(
        {"_type": "location", "lat": lat, "lon": 13.4, "tst": int(tst), "tid": "AD"}),
        timeout=REQUEST_TIMEOUT)
    await response.content()
    return response.code


async def osmand(node: TwistdServer, token: str, lat: float, ts: float) -> int:
    response = await treq.get(f"{node.url}/apps/osmand",
                              params={"id": token, "lat": str(lat), "lon": "2.35",
                                      "timestamp": str(int(ts))}, timeout=REQUEST_TIMEOUT)
    await response.content()
    return response.code


async def pins(node: TwistdServer, map_name: str) -> dict[str, dict]:
    response = await treq.get(f"{node.url}/api/maps/{map_name}/pins", timeout=REQUEST_TIMEOUT)
    assert response.code == 200, response.code
    return {pin["id"]: pin for pin in orjson.loads(await response.content())["pins"]}


async def map_status(node: TwistdServer, map_name: str) -> int:
    response = await treq.get(f"{node.url}/m/{map_name}")
    await response.content()
    return response.code


def stop(node: TwistdServer, how: str) -> None:
    if how == "kill -9":
        node.process.send_signal(signal.SIGKILL)
        node.process.wait()
    else:
        node.stop()  # SIGTERM: a clean stop


@pytest.mark.parametrize("how", ["restart", "kill -9"])
@pytest_twisted.ensureDeferred
async def test_every_device_reports_after_a_restart_and_its_pin_is_back_where_it_was(
        tmp_path, how):
    data = tmp_path / "data"
    node = start_twistd(tmp_path, "--pirate", "none", "--data-dir", str(data))
    devices = []
    now = time.time()
    for n in range(TOKENS):
        map_name = "family" if n % 2 else "friends"
        device = await make_device(node, map_name, f"Phone {n}")
        devices.append((map_name, device))
        # Two fixes each: the pin must come back at the last one.
        assert await owntracks(node, device["token"], 10.0 + n, now - 20) == 200
        assert await owntracks(node, device["token"], 20.0 + n, now - 10) == 200
    # One device that never reported: still a device after the restart.
    silent = await make_device(node, "family", "Silent")
    before = {name: await pins(node, name) for name in ("family", "friends")}
    stop(node, how)
    assert (data / "livemap.sqlite3").exists()

    node = start_twistd(tmp_path, "--pirate", "none", "--data-dir", str(data))
    try:
        for n, (map_name, device) in enumerate(devices):
            held = await pins(node, map_name)
            assert device["id"] in held, (how, n, held)
            pin = held[device["id"]]
            assert (pin["lat"], pin["name"]) == (20.0 + n, f"Phone {n}")
            assert pin == before[map_name][device["id"]]
        for n, (map_name, device) in enumerate(devices):
            assert await owntracks(node, device["token"], 30.0 + n, time.time()) == 200
            assert await osmand(node, device["token"], 40.0 + n, time.time() + 1) == 200
        assert await osmand(node, silent["token"], 5.0, time.time()) == 200
        for n, (map_name, device) in enumerate(devices):
            assert (await pins(node, map_name))[device["id"]]["lat"] == 40.0 + n
        # A deletion outlives a restart too.
        response = await treq.delete(f"{node.url}/api/devices/{devices[0][1]['token']}")
        assert response.code == 204
    finally:
        stop(node, how)
    node = start_twistd(tmp_path, "--pirate", "none", "--data-dir", str(data))
    try:
        assert await owntracks(node, devices[0][1]["token"], 1.0, time.time()) == 404
        assert devices[0][1]["id"] not in await pins(node, devices[0][0])
        assert await owntracks(node, devices[1][1]["token"], 1.0, time.time()) == 200
    finally:
        node.stop()


@pytest.mark.waits  # mostly waiting: scripts/test runs it beside the rest
@pytest.mark.parametrize("how", ["restart", "kill -9"])
@pytest_twisted.ensureDeferred
async def test_a_private_map_stays_private_until_its_expiry_and_is_gone_after(tmp_path, how):
    data = tmp_path / "data"
    args = ("--pirate", "none", "--data-dir", str(data), "--min-ttl", "1")
    node = start_twistd(tmp_path, *args)
    response = await treq.post(f"{node.url}/api/maps", params={"ttl": "12"})
    created = orjson.loads(await response.content())
    assert response.code == 201, created
    name, expires = created["map"], created["expires"] / 1000
    forever = orjson.loads(await (await treq.post(f"{node.url}/api/maps")).content())["map"]
    device = await make_device(node, name, "On the private map")
    stop(node, how)

    # Only private maps exist on this node: a forgotten one would be a 404.
    node = start_twistd(tmp_path, *args, "--no-open-maps")
    try:
        assert time.time() < expires - 1, "the restart took too long for this test"
        assert await map_status(node, name) == 200
        assert await map_status(node, forever) == 200
        assert await owntracks(node, device["token"], 1.0, time.time()) == 200
    finally:
        stop(node, how)

    # With open maps (the default), a forgotten private map would be an open
    # one: it is served until its expiry, refused from then on.
    node = start_twistd(tmp_path, *args)
    try:
        assert time.time() < expires - 0.5, "the restarts took too long for this test"
        assert await map_status(node, name) == 200
        while time.time() < expires + 0.2:
            await deferLater(0.1)
        assert await map_status(node, name) == 404
        assert await owntracks(node, device["token"], 1.0, time.time()) == 404
        assert await map_status(node, forever) == 200
    finally:
        stop(node, how)
    # And still gone after another restart: its name stays refused.
    node = start_twistd(tmp_path, *args)
    try:
        assert await map_status(node, name) == 404
        assert await owntracks(node, device["token"], 1.0, time.time()) == 404
        assert await map_status(node, forever) == 200
    finally:
        node.stop()


def run_node(tmp_path: Path, data: Path) -> subprocess.CompletedProcess:
    port = free_port()
    return subprocess.run(
        twistd_command("--port", f"tcp:{port}:interface=127.0.0.1", "--pirate", "none",
                       "--data-dir", str(data)),
        capture_output=True, text=True, timeout=60, cwd=tmp_path)


def refused_with_one_line(result: subprocess.CompletedProcess, *words: str) -> str:
    assert result.returncode != 0, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    line = lines[0]
    assert line.startswith("livemap: "), line
    for word in words:
        assert word in line, line
    return line


def test_a_corrupt_store_stops_the_node_with_one_line_and_is_left_as_it_was(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    garbage = os.urandom(8192)
    (data / "livemap.sqlite3").write_bytes(garbage)
    refused_with_one_line(run_node(tmp_path, data), "livemap.sqlite3", "damaged")
    assert (data / "livemap.sqlite3").read_bytes() == garbage
    assert sorted(path.name for path in data.iterdir()) == ["livemap.sqlite3"]


def test_a_store_of_a_newer_livemap_stops_the_node_and_is_left_as_it_was(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    path = data / "livemap.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE devices (token_hash TEXT PRIMARY KEY, future BLOB)")
        db.execute("PRAGMA user_version = 99")
    db.close()
    written = path.read_bytes()
    refused_with_one_line(run_node(tmp_path, data), "newer livemap", "99")
    assert path.read_bytes() == written
    assert sorted(p.name for p in data.iterdir()) == ["livemap.sqlite3"]


def test_a_data_directory_that_cannot_be_written_stops_the_node_with_one_line(tmp_path):
    # Where a directory cannot be made: under a regular file (whose bytes
    # stay), and where even root may not write.
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"not a directory")
    refused_with_one_line(run_node(tmp_path, blocker / "data"), "data directory")
    assert blocker.read_bytes() == b"not a directory"
    refused_with_one_line(run_node(tmp_path, blocker), "data directory")
    assert blocker.read_bytes() == b"not a directory"
    if os.geteuid() == 0:
        refused_with_one_line(run_node(tmp_path, Path("/sys/livemap-test-data")),
                              "data directory")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        refused_with_one_line(run_node(tmp_path, locked), "locked")
        assert list(locked.iterdir()) == []


@dataclass
class Daemon:
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def daemon(tmp_path: Path, data: Path, port: int) -> int:
    """`twistd livemap` in the background (it forks after reading the store): its pid."""
    pidfile = tmp_path / "twistd.pid"
    python_and_twistd = twistd_command()[:2]
    subprocess.run([*python_and_twistd,
                    "--pidfile", str(pidfile), "--logfile", str(tmp_path / "daemon.log"),
                    "livemap", "--port", f"tcp:{port}:interface=127.0.0.1", "--pirate", "none",
                    "--data-dir", str(data)], check=True, timeout=60, cwd=tmp_path)
    deadline = time.monotonic() + 20
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()
        time.sleep(0.05)
    return int(pidfile.read_text())


def stop_daemon(pid: int) -> None:
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError("the daemon did not stop on SIGTERM")
        time.sleep(0.05)


@pytest_twisted.ensureDeferred
async def test_a_daemonized_node_keeps_its_devices_too(tmp_path):
    """twistd without -n forks after the store was read: the store works in the child."""
    data = tmp_path / "data"
    port = free_port()
    pid = daemon(tmp_path, data, port)
    node = Daemon(f"http://127.0.0.1:{port}", tmp_path / "daemon.log")
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if (await treq.get(f"{node.url}/healthz")).code == 200:
                    break
            except Exception:
                assert time.monotonic() < deadline, node.log()
            await deferLater(0.1)
        device = await make_device(node, "family", "Ada")
        assert await owntracks(node, device["token"], 1.5, time.time()) == 200
    finally:
        stop_daemon(pid)
    pid = daemon(tmp_path, data, port)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                held = await pins(node, "family")
                break
            except Exception:
                assert time.monotonic() < deadline, node.log()
                await deferLater(0.1)
        assert held[device["id"]]["lat"] == 1.5
        assert await owntracks(node, device["token"], 2.5, time.time() + 1) == 200
        assert (await pins(node, "family"))[device["id"]]["lat"] == 2.5
    finally:
        stop_daemon(pid)
    assert "Traceback" not in node.log(), node.log()


@pytest_twisted.ensureDeferred
async def test_a_backup_taken_while_the_node_runs_restores_its_devices(tmp_path):
    """docs/deployment.md's online backup: taken while serving, started from elsewhere."""
    data = tmp_path / "data"
    node = start_twistd(tmp_path, "--pirate", "none", "--data-dir", str(data))
    try:
        device = await make_device(node, "family", "Ada")
        assert await owntracks(node, device["token"], 3.5, time.time()) == 200
        copy = tmp_path / "copy"
        copy.mkdir()
        source = sqlite3.connect(data / "livemap.sqlite3")
        target = sqlite3.connect(copy / "livemap.sqlite3")
        with target:
            source.backup(target)
        source.close()
        target.close()
        # The node carries on after the backup.
        assert await owntracks(node, device["token"], 4.5, time.time() + 1) == 200
    finally:
        node.stop()
    node = start_twistd(tmp_path, "--pirate", "none", "--data-dir", str(copy))
    try:
        assert (await pins(node, "family"))[device["id"]]["lat"] == 3.5
        assert await owntracks(node, device["token"], 5.5, time.time() + 2) == 200
    finally:
        node.stop()
