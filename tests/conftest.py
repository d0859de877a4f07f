"""
Shared fixtures: an in-process server on a real 127.0.0.1 socket, and a
real `twistd -n livemap` subprocess for tests that must see the plugin load
or that block (the browser tests drive Playwright synchronously).
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from livemap_tx.service import GracefulClose, Options, make_server
from livemap_tx.http_site import make_site

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"

# A node without --redis keeps a store in its data directory: no test may
# use the machine's default one. start_twistd gives each node its own; any
# other `twistd livemap` a test starts gets this session's.
os.environ.pop("STATE_DIRECTORY", None)
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="livemap-tests-state-")
atexit.register(shutil.rmtree, os.environ["XDG_STATE_HOME"], True)


@dataclass
class LiveServer:
    """A server listening on 127.0.0.1 in this process."""

    port: int
    hub: object
    factory: object
    listener: object = field(repr=False)
    site: object = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, map_name: str = "public") -> str:
        return f"ws://127.0.0.1:{self.port}/ws/{map_name}"


def server_options(*args: str) -> Options:
    options = Options()
    options.parseOptions(["--port", "tcp:0:interface=127.0.0.1", "--pirate", "none", *args])
    return options


async def start_server(*args: str) -> LiveServer:
    hub, factory, site = make_server(reactor, server_options(*args))
    listener = reactor.listenTCP(0, make_site(site.resource(), reactor,
                                              admission=factory.admission),
                                 interface="127.0.0.1")
    return LiveServer(listener.getHost().port, hub, factory, listener, site)


async def stop_server(server: LiveServer) -> None:
    await GracefulClose(server.factory, reactor, grace=2.0).stopService()
    await server.listener.stopListening()
    # Let closing connections finish so the reactor is left clean.
    for _ in range(50):
        if not server.factory.protocols:
            break
        await deferLater(0.02)


def deferLater(seconds: float) -> defer.Deferred:  # noqa: N802 (mirrors task.deferLater)
    from twisted.internet import task
    return task.deferLater(reactor, seconds)


async def eventually(predicate: Callable[[], Any], what: str = "condition",
                     timeout: float = 10.0) -> Any:
    """Poll until `predicate()` is true: a bounded wait, not a timed assertion."""
    deadline = reactor.seconds() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if reactor.seconds() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await deferLater(0.02)


@pytest_twisted.async_yield_fixture
async def server():
    """An in-process livemap on 127.0.0.1, a random port, default options."""
    live = await start_server()
    yield live
    await stop_server(live)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class TwistdServer:
    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, map_name: str = "public") -> str:
        return f"ws://127.0.0.1:{self.port}/ws/{map_name}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> Optional[int]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def twistd_command(*args: str, pre: Sequence[str] = ()) -> list[str]:
    """`twistd -n [pre...] livemap [args...]`: `pre` are twistd's own options."""
    twistd = shutil.which("twistd") or "twistd"
    return [sys.executable, twistd, "-n", "--pidfile=", *pre, "livemap", *args]


def start_twistd(tmp_path: Path, *args: str, port: Optional[int] = None,
                 pre: Sequence[str] = ()) -> TwistdServer:
    """
    Start `twistd -n livemap` and wait until /healthz answers; its store
    (without --redis) in `tmp_path` unless `--data-dir` is given.
    """
    port = port or free_port()
    if "--data-dir" not in args:
        args = (*args, "--data-dir", str(tmp_path / f"data-{port}"))
    log_path = tmp_path / f"twistd-{port}.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            twistd_command("--port", f"tcp:{port}:interface=127.0.0.1", *args, pre=pre),
            stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp_path,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    server = TwistdServer(process, port, log_path)
    try:
        wait_healthy(f"{server.url}/healthz", process, "twistd", server.log, timeout=20)
    except TimeoutError:
        server.stop()
        raise
    return server


def wait_healthy(url: str, process: subprocess.Popen, what: str, log: Callable[[], str],
                 timeout: float, interval: float = 0.1) -> None:
    """Block until `url` answers 200 (before a test starts); fail if `process` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited {process.returncode}:\n{log()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(interval)
    raise TimeoutError(f"{what} did not answer {url}:\n{log()}")


@pytest.fixture
def twistd_server(tmp_path: Path) -> Iterator[TwistdServer]:
    """A real `twistd -n livemap` subprocess on a free 127.0.0.1 port, pirate off."""
    server = start_twistd(tmp_path, "--pirate", "none")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
