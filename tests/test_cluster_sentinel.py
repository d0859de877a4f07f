"""
Sentinel failover (issue 21, item 7): one master, one replica and three
`redis-server --sentinel` processes started by the test on free ports, two
real `twistd` nodes given `--redis sentinel://.../livemap`. The master is
killed with -9 while devices are being created and pins move: the nodes
follow the promoted replica, their viewers converge, and every device whose
creation was acknowledged (201) is still there and reports.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import orjson
import pytest
import pytest_twisted
import treq

from conftest import TwistdServer, deferLater, free_port, start_twistd
from liveclients import open_view
from redis_server import REDIS_SERVER, RedisServer, needs_redis

MASTER = "livemap"


class SentinelServer:
    """One `redis-server --sentinel` on a free port, watching the master."""

    def __init__(self, directory: Path, master_port: int) -> None:
        self.directory = directory
        self.port = free_port()
        self.config = directory / f"sentinel-{self.port}.conf"
        # Sentinel rewrites its config file: one each, in the test's directory.
        self.config.write_text(
            f"port {self.port}\nbind 127.0.0.1\nprotected-mode no\n"
            f"dir {directory}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {master_port} 2\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\n"
            f"sentinel failover-timeout {MASTER} 5000\n"
            f"sentinel parallel-syncs {MASTER} 1\n")
        self.log_path = directory / f"sentinel-{self.port}.log"
        assert REDIS_SERVER is not None
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([REDIS_SERVER, str(self.config), "--sentinel"],
                                            stdout=log, stderr=subprocess.STDOUT,
                                            cwd=directory)

    def command(self, *args: str) -> str:
        result = subprocess.run(["redis-cli", "-p", str(self.port), *args],
                                capture_output=True, text=True, timeout=10)
        return result.stdout.strip()

    def master_port(self) -> str:
        reply = self.command("SENTINEL", "get-master-addr-by-name", MASTER).split()
        return reply[1] if len(reply) == 2 else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer, list[SentinelServer]]]:
    master_dir, replica_dir = tmp_path / "master", tmp_path / "replica"
    master_dir.mkdir()
    replica_dir.mkdir()
    master = RedisServer(master_dir)
    master.start("--repl-diskless-sync-delay", "0")
    replica = RedisServer(replica_dir)
    replica.start("--replicaof", "127.0.0.1", str(master.port))
    watchers = [SentinelServer(tmp_path, master.port) for _ in range(3)]
    try:
        # Every sentinel knows the replica and the two other sentinels.
        deadline = time.monotonic() + 30
        while True:
            ready = 0
            for sentinel in watchers:
                fields = sentinel.command("SENTINEL", "master", MASTER).split("\n")
                info = dict(zip(fields[::2], fields[1::2]))
                if info.get("num-slaves") == "1" and info.get("num-other-sentinels") == "2":
                    ready += 1
            online = "state=online" in master.command("INFO", "replication")
            if ready == len(watchers) and online:
                break
            assert time.monotonic() < deadline, "the sentinels never found each other"
            time.sleep(0.2)
        yield master, replica, watchers
    finally:
        for sentinel in watchers:
            sentinel.stop()
        replica.stop()
        master.stop()


async def create_device(node: TwistdServer, map_name: str, name: str) -> Any:
    try:
        response = await treq.post(f"{node.url}/api/maps/{map_name}/devices",
                                   data=orjson.dumps({"name": name}))
        body = orjson.loads(await response.content())
    except Exception:
        return None
    return body if response.code == 201 else None


async def report(node: TwistdServer, token: str, lat: float) -> int:
    response = await treq.post(f"{node.url}/apps/owntracks/{token}", data=orjson.dumps(
        {"_type": "location", "lat": lat, "lon": 13.4, "tst": int(time.time()), "tid": "AD"}))
    await response.content()
    return response.code


async def health(node: TwistdServer) -> str:
    try:
        return await (await treq.get(f"{node.url}/healthz")).text()
    except Exception as error:
        return repr(error)


@needs_redis
@pytest_twisted.ensureDeferred
async def test_nodes_follow_the_promoted_replica_and_lose_no_acknowledged_device(
        tmp_path, sentinels):
    master, replica, watchers = sentinels
    url = "sentinel://" + ",".join(f"127.0.0.1:{s.port}" for s in watchers) + f"/{MASTER}"
    nodes = [start_twistd(tmp_path, "--pirate", "none", "--redis", url, "--node-ttl", "2")
             for _ in range(2)]
    try:
        views = [await open_view(node.ws_url("failover")) for node in nodes]
        acknowledged: list[dict] = []
        # Under load: devices created on both nodes (each allows 10 at once),
        # pins moving, while the master dies.
        for number in range(6):
            made = await create_device(nodes[number % 2], "failover", f"before-{number}")
            assert made is not None, "the cluster works before the failover"
            acknowledged.append(made)
        # A creation is acknowledged only once the replica has it: with the
        # replica frozen, the master's WAIT times out and the answer is 503.
        replica.process.send_signal(signal.SIGSTOP)
        try:
            assert await create_device(nodes[0], "failover", "unreplicated") is None
        finally:
            replica.process.send_signal(signal.SIGCONT)
        step = 0

        async def load(count: int) -> None:
            nonlocal step
            for _ in range(count):
                step += 1
                for number, view in enumerate(views):
                    view.move(float(number), float(step))
                made = await create_device(nodes[step % 2], "failover", f"during-{step}")
                if made is not None:
                    acknowledged.append(made)
                await deferLater(0.1)

        await load(3)
        master.process.kill()  # kill -9
        master.process.wait()
        master.process = None
        killed = time.monotonic()
        promoted = None
        while promoted is None:
            await load(1)
            if watchers[0].master_port() == str(replica.port):
                promoted = time.monotonic()
            assert time.monotonic() - killed < 30, "no sentinel promoted the replica"
        # Within 10 s of the promotion, both nodes are on the new master.
        for node in nodes:
            while "ok" != await health(node):
                assert time.monotonic() - promoted < 10, await health(node)
                await load(1)
        assert "the sentinels name 127.0.0.1:%d" % replica.port in nodes[0].log()
        # Viewers converge.
        for number, view in enumerate(views):
            view.move(10.0 + number, 10.0)
        truth = {view.id: (10.0 + number, 10.0, None) for number, view in enumerate(views)}
        for view in views:
            await view.until(lambda pins: {k: v for k, v in pins.items() if k in truth} == truth)
        # Every acknowledged device is there: it reports on both nodes.
        assert len(acknowledged) >= 8
        for number, device in enumerate(acknowledged):
            assert await report(nodes[number % 2], device["token"], 1.0 + number) == 200, device
        for view in views:
            await view.until(lambda pins: all(device["id"] in pins for device in acknowledged))
        for view in views:
            view.client.close()
            await view.client.wait_closed()
    finally:
        for node in nodes:
            node.stop()
