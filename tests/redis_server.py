"""
A private redis-server for tests: started on a free 127.0.0.1 port in a
temporary directory, without persistence, and stopped (or restarted on the
same port) by the test. The machine's own Redis (6379) is never touched.

Import the fixture where it is used: `from redis_server import redis_server`.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest

from conftest import free_port

REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(
    REDIS_SERVER is None,
    reason="redis-server is not installed (apt-get install redis-server; CI installs it)")


class RedisServer:
    """One redis-server process that a test may stop and start again."""

    def __init__(self, directory: Path, port: Optional[int] = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        assert self.port != 6379, "never the machine's own Redis"
        self.process: Optional[subprocess.Popen] = None
        self.log_path = directory / f"redis-{self.port}.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *extra: str) -> None:
        assert REDIS_SERVER is not None
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", str(self.directory),
                 "--protected-mode", "no", *extra],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.directory)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited:\n{self.log_path.read_text()}")
            if self.ping():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer:\n{self.log_path.read_text()}")

    def ping(self) -> bool:
        """A raw PING on a socket: the test needs no client library for this."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                # NOAUTH: alive, and asking for the password it was given.
                return sock.recv(16).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def command(self, *args: str) -> str:
        """One command through redis-cli (for checks such as DBSIZE)."""
        result = subprocess.run(["redis-cli", "-p", str(self.port), *args],
                                capture_output=True, text=True, timeout=10, check=True)
        return result.stdout.strip()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server on a free port; skipped if redis-server is missing."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; "
                    "CI installs it)")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def several_redis_servers(base: Path, count: int) -> Iterator[list[RedisServer]]:
    """`count` private redis-servers in base/redis0, redis1...: a fixture's body (yield from)."""
    servers = []
    try:
        for index in range(count):
            directory = base / f"redis{index}"
            directory.mkdir()
            server = RedisServer(directory)
            server.start()
            servers.append(server)
        yield servers
    finally:
        for server in servers:
            server.stop()
