"""
What the Redis backplane adds to a move's latency.

Starts a private redis-server (free port, temporary directory, no
persistence) and two `twistd livemap --redis` nodes. Movers on node A send
moves with unique `seq`s; a watcher on node A (the in-memory path: one hub)
and a watcher on node B (the Redis path: A's tick, PUBLISH, B's hub and
tick) record when each `seq` arrives. Prints the median and p99 of both
paths and of the difference, as one Markdown table and one JSON line.

usage: python bench/redis_latency.py [--moves 600] [--movers 4] [--rate 8] [--tick 0.1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, endpoints, task

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"{url}: process exited\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"{url} did not answer\n{log.read_text()}")


class Client(WebSocketClientProtocol):
    def onOpen(self) -> None:  # noqa: N802 (Autobahn's names)
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802,N803
        self.factory.on_message(json.loads(payload))


class Factory(WebSocketClientFactory):
    protocol = Client

    def __init__(self, url: str, on_message: Any) -> None:
        super().__init__(url)
        self.opened: defer.Deferred = defer.Deferred()
        self.on_message = on_message


async def connect(reactor: Any, port: int, on_message: Any = lambda message: None) -> Client:
    factory = Factory(f"ws://127.0.0.1:{port}/ws/public", on_message)
    factory.setProtocolOptions(autoPingInterval=None)
    await endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    return await factory.opened


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def measure(reactor: Any, port_a: int, port_b: int, args: argparse.Namespace) -> dict:
    sent: dict[int, float] = {}
    arrived: dict[str, dict[int, float]] = {"memory": {}, "redis": {}}

    def watcher(path: str) -> Any:
        def on_message(message: dict) -> None:
            now = reactor.seconds()
            for pin in message.get("pins", ()):
                seq = pin.get("seq")
                if seq is not None and seq not in arrived[path]:
                    arrived[path][seq] = now
        return on_message

    await connect(reactor, port_a, watcher("memory"))
    await connect(reactor, port_b, watcher("redis"))
    movers = [await connect(reactor, port_a) for _ in range(args.movers)]
    await task.deferLater(reactor, 1.0, lambda: None)
    seq = 0
    interval = 1.0 / args.rate
    # The movers take turns, so moves are spread over time and each mover
    # stays under the server's rate limit.
    while seq < args.moves:
        for mover in movers:
            seq += 1
            sent[seq] = reactor.seconds()
            mover.sendMessage(json.dumps({"type": "move", "lat": 1.0, "lng": (seq % 300) / 10,
                                          "seq": seq}).encode())
            await task.deferLater(reactor, interval / len(movers), lambda: None)
    await task.deferLater(reactor, 2.0, lambda: None)
    result: dict[str, Any] = {"moves": seq, "movers": args.movers, "rate_per_mover": args.rate,
                              "tick": args.tick}
    latency = {path: [(arrived[path][s] - sent[s]) * 1000 for s in sent if s in arrived[path]]
               for path in arrived}
    added = [(arrived["redis"][s] - arrived["memory"][s]) * 1000
             for s in sent if s in arrived["redis"] and s in arrived["memory"]]
    for path, values in [*latency.items(), ("added", added)]:
        result[path] = {"samples": len(values), "median_ms": round(statistics.median(values), 2),
                        "p99_ms": round(percentile(values, 0.99), 2)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--moves", type=int, default=600)
    parser.add_argument("--movers", type=int, default=4)
    parser.add_argument("--rate", type=float, default=8.0, help="moves a second per mover")
    parser.add_argument("--tick", type=float, default=0.1)
    args = parser.parse_args()
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        sys.exit("redis-server is not installed")
    twistd = shutil.which("twistd") or "twistd"
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        redis_port = free_port()
        processes = [subprocess.Popen(
            [redis_server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL)]
        ports = [free_port(), free_port()]
        try:
            for port in ports:
                log = directory / f"node-{port}.log"
                with open(log, "wb") as out:
                    processes.append(subprocess.Popen(
                        [sys.executable, twistd, "-n", "--pidfile=", "livemap",
                         "--port", f"tcp:{port}:interface=127.0.0.1", "--pirate", "none",
                         "--tick", str(args.tick),
                         "--redis", f"redis://127.0.0.1:{redis_port}/0"],
                        stdout=out, stderr=subprocess.STDOUT, cwd=tmp,
                        env={**os.environ, "PYTHONPATH": str(ROOT)}))
                wait_http(f"http://127.0.0.1:{port}/healthz", processes[-1], log)
            from twisted.internet import reactor
            outcome: dict[str, Optional[dict]] = {"result": None}

            async def run() -> None:
                try:
                    outcome["result"] = await measure(reactor, ports[0], ports[1], args)
                finally:
                    reactor.stop()
            reactor.callWhenRunning(lambda: defer.Deferred.fromCoroutine(run()))
            reactor.run()
        finally:
            for process in reversed(processes):
                process.send_signal(signal.SIGTERM)
                process.wait(10)
    result = outcome["result"]
    if result is None:
        sys.exit("no result")
    print("| path | samples | median (ms) | p99 (ms) |")
    print("| --- | --- | --- | --- |")
    for path, label in (("memory", "same node (in memory)"), ("redis", "other node (Redis)"),
                        ("added", "added by Redis")):
        row = result[path]
        print(f"| {label} | {row['samples']} | {row['median_ms']} | {row['p99_ms']} |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
