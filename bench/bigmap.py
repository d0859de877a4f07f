"""
The big-map scenario (issue 20): one map, N people moving at 1 Hz and N
viewers with clustered views (`/ws/{map}?bbox=W,S,E,N&zoom=Z`) spread over
street (~500 m, zoom 16), neighbourhood (~3 km, zoom 14) and city (~20 km,
zoom 11) views, plus some zoomed out over the whole map (zoom 6).

One generator core cannot decode every frame of 2N connections: every
connection's bytes are counted (WebSocket frames as received), and a
sample of viewers of each class is decoded in full: their picture is
rebuilt from the messages alone (pins, clusters, total), the latency of
each pin state they receive is measured from the moment its move was sent,
and at the end, once quiet, each sampled picture is compared with the
truth (the generator's own positions, cut into the same Web Mercator
cells). People watch their own street (zoom 17) while they move, as the
page does. The server runs on core 0, this generator on core 1 (or, with
--generator node, bench/bigmap.js: Node.js and ws, no code shared with this).

    .venv/bin/python bench/bigmap.py --people 10000 --viewers 10000 --json /tmp/big.json

Prints one JSON result (and writes it to --json).
"""

from __future__ import annotations

import argparse
import errno
import gc
import math
import os
import random
import resource
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import orjson

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from loadgen import (  # noqa: E402
    IP_BIND_ADDRESS_NO_PORT, WS_ACCEPT, WS_KEY, core_busy, core_ticks, masked_frame,
    proc_cpu_seconds, self_cpu_seconds, wait_quiet)

SERVER_CORE, GENERATOR_CORE = 0, 1
CONNECTING, HANDSHAKE, OPEN = range(3)
RECV_SIZE = 262144
CITY = (48.85, 2.35)
# The city: half its people spread over 20 km, half in 20 busy places.
CITY_HALF = (0.09, 0.135)
HOTSPOTS = 20
HOTSPOT_SIGMA = 0.003
# Viewer classes: share, zoom, half-size of the box in degrees (lat, lng).
CLASSES = [
    ("street", 0.40, 16, (0.00225, 0.0034)),
    ("neighbourhood", 0.40, 14, (0.0135, 0.0205)),
    ("city", 0.15, 11, (0.09, 0.135)),
    ("zoomed-out", 0.05, 6, (2.0, 3.0)),
]
# What a person's page shows while it moves: its own street (~150 m) at
# zoom 17, or ("pocket") only the few metres around where it started, as a
# page in a pocket that no one looks at would still show.
MOVER_VIEWS = {"street": (17, (0.0007, 0.001)), "pocket": (17, (0.00001, 0.00001))}
MOVER_VIEW = MOVER_VIEWS["street"]
CLUSTER_SIZE = 4  # K, as the server's default
_MAX_LAT = 85.0511287798066


def tile_of(lat: float, lng: float, level: int) -> tuple[int, int]:
    n = 2 ** level
    x = min(max(int((lng + 180.0) / 360.0 * n), 0), n - 1)
    lat = max(-_MAX_LAT, min(_MAX_LAT, lat))
    y = int((1.0 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2.0 * n)
    return x, min(max(y, 0), n - 1)


class Conn:
    __slots__ = ("i", "sock", "fd", "state", "buf", "out", "cls", "bbox", "zoom", "sampled",
                 "bytes", "window_bytes", "pin_id", "pins", "clusters", "total", "mover", "frag",
                 "recv")

    def __init__(self, i: int) -> None:
        self.i = i
        self.sock: Optional[socket.socket] = None
        self.fd = -1
        self.state = CONNECTING
        self.buf = b""
        self.out = b""
        self.cls = ""
        self.bbox: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
        self.zoom = 0
        self.sampled = False
        self.bytes = 0
        self.window_bytes = 0
        self.pin_id = ""
        self.pins: dict[str, dict] = {}
        self.clusters: dict[str, dict] = {}
        self.total = -1
        self.mover = -1
        self.frag = b""


class BigMap:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.ep = select.epoll(sizehint=args.people + args.viewers + 16)
        self.conns = [Conn(i) for i in range(args.people + args.viewers)]
        self.by_fd: dict[int, Conn] = {}
        self.ready = 0
        self.failures: list[str] = []
        self.pending = 0
        self.next_connect = 0
        hotspots = [(CITY[0] + self.rng.uniform(-0.07, 0.07), CITY[1] + self.rng.uniform(-0.1, 0.1))
                    for _ in range(HOTSPOTS)]
        self.pos: list[list[float]] = []
        for k in range(args.people):
            if k % 2:
                h = hotspots[k % HOTSPOTS]
                lat, lng = self.rng.gauss(h[0], HOTSPOT_SIGMA), self.rng.gauss(h[1], HOTSPOT_SIGMA * 1.5)
            else:
                lat = CITY[0] + self.rng.uniform(-CITY_HALF[0], CITY_HALF[0])
                lng = CITY[1] + self.rng.uniform(-CITY_HALF[1], CITY_HALF[1])
            self.pos.append([lat, lng])
        self.seq = 0
        self.send_time: dict[int, float] = {}
        self.latencies: list[float] = []
        self.decoded = 0
        self.cache: dict[bytes, dict] = {}
        self.errors: dict[str, int] = {}
        self.closed_by_server = 0
        # Messages (and their bytes) the sampled connections got in the window, by class and type.
        self.kinds: dict[tuple[str, str], int] = {}
        self.kind_bytes: dict[tuple[str, str], int] = {}
        for k in range(args.people):
            c = self.conns[k]
            c.mover, c.cls = k, "person"
            zoom, (dlat, dlng) = MOVER_VIEWS[args.people_view]
            lat, lng = self.pos[k]
            c.bbox, c.zoom = (lng - dlng, lat - dlat, lng + dlng, lat + dlat), zoom
        shares = [share for _, share, _, _ in CLASSES]
        per_class: dict[str, int] = {}
        for j in range(args.viewers):
            c = self.conns[args.people + j]
            name, _, zoom, (dlat, dlng) = self.rng.choices(CLASSES, shares)[0]
            # Pages look where people are.
            lat, lng = self.pos[self.rng.randrange(args.people)] if args.people else CITY
            if name == "zoomed-out":
                lat, lng = CITY
            c.cls, c.zoom = name, zoom
            c.bbox = (round(lng - dlng, 6), round(lat - dlat, 6), round(lng + dlng, 6),
                      round(lat + dlat, 6))
            seen = per_class.get(name, 0)
            c.sampled = seen < args.sample
            per_class[name] = seen + 1
        for c in self.conns[:min(args.sample, args.people)]:
            c.sampled = True
        self.debug_conn = next((c.i for c in self.conns if c.cls == "zoomed-out"), -1)
        self.t_debug = time.monotonic()

    # connections

    def _request(self, c: Conn) -> bytes:
        w, s, e, n = c.bbox
        return (f"GET /ws/{self.args.map}?bbox={w},{s},{e},{n}&zoom={c.zoom} HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{self.args.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {WS_KEY.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()

    def _connect(self, c: Conn) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        a = c.i // 100
        s.bind((f"127.0.{a // 250}.{a % 250 + 2}", 0))
        err = s.connect_ex(("127.0.0.1", self.args.port))
        if err not in (0, errno.EINPROGRESS):
            s.close()
            self.failures.append(f"connect {os.strerror(err)}")
            return
        c.sock, c.fd, c.state = s, s.fileno(), CONNECTING
        c.recv = s.recv
        self.by_fd[c.fd] = c
        self.ep.register(c.fd, select.EPOLLOUT)
        self.pending += 1

    def _fail(self, c: Conn, why: str) -> None:
        if len(self.failures) < 20:
            self.failures.append(why)
        if c.state != OPEN:
            self.pending -= 1
        if c.sock is not None:
            try:
                self.ep.unregister(c.fd)
            except (OSError, ValueError):
                pass
            self.by_fd.pop(c.fd, None)
            c.sock.close()
            c.sock = None

    def _send(self, c: Conn, data: bytes) -> None:
        if c.sock is None:
            return
        if c.out:
            c.out += data
            return
        try:
            n = c.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError as e:
            self._fail(c, f"send {e}")
            return
        if n < len(data):
            c.out = data[n:]
            self.ep.modify(c.fd, select.EPOLLIN | select.EPOLLOUT)

    def _event(self, c: Conn, ev: int, now: float) -> None:
        if c.state == CONNECTING:
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # type: ignore[union-attr]
            if err:
                self._fail(c, f"connect {os.strerror(err)}")
                return
            c.state = HANDSHAKE
            self.ep.modify(c.fd, select.EPOLLIN)
            self._send(c, self._request(c))
            return
        if ev & select.EPOLLOUT and c.out:
            try:
                n = c.sock.send(c.out)  # type: ignore[union-attr]
            except BlockingIOError:
                n = 0
            c.out = c.out[n:]
            if not c.out:
                self.ep.modify(c.fd, select.EPOLLIN)
        if not ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
            return
        try:
            data = c.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as e:
            self._fail(c, f"recv {e}")
            return
        if not data:
            if c.state == OPEN:
                self.closed_by_server += 1
            self._fail(c, "eof")
            return
        c.bytes += len(data)
        if self.measuring:
            c.window_bytes += len(data)
        if c.state == HANDSHAKE:
            data = c.buf + data
            end = data.find(b"\r\n\r\n")
            if end < 0:
                c.buf = data
                return
            if not data.startswith(b"HTTP/1.1 101") or WS_ACCEPT not in data[:end]:
                self._fail(c, "handshake " + data[:40].decode(errors="replace"))
                return
            c.state = OPEN
            c.buf = b""
            self.pending -= 1
            self.ready += 1
            data = data[end + 4:]
        if c.sampled or not c.pin_id or c.frag:
            self._frames(c, c.buf + data, now)
        # Others: bytes are counted; frames are not read (pings are off).

    def _frames(self, c: Conn, data: bytes, now: float) -> None:
        i, n = 0, len(data)
        while n - i >= 2:
            b0, ln = data[i], data[i + 1] & 0x7F
            if ln < 126:
                start = i + 2
            elif ln == 126:
                if n - i < 4:
                    break
                ln, start = int.from_bytes(data[i + 2:i + 4], "big"), i + 4
            else:
                if n - i < 10:
                    break
                ln, start = int.from_bytes(data[i + 2:i + 10], "big"), i + 10
            end = start + ln
            if end > n:
                break
            i = end
            op = b0 & 0x0F
            if op == 0x1:
                self._message(c, data[start:end], now)
            elif op == 0x9:
                self._send(c, masked_frame(data[start:end], 0xA))
            elif op == 0x8:
                self.closed_by_server += 1
                self._fail(c, "closed " + data[start:end].hex())
                return
            if c.sock is None:
                return
            if not c.sampled and c.pin_id:
                # Past its welcome, an unsampled connection is only counted.
                c.buf, c.frag = b"", b""
                return
        c.buf = data[i:]
        c.frag = c.buf if not c.sampled and not c.pin_id else b""

    def _message(self, c: Conn, payload: bytes, now: float) -> None:
        msg = self.cache.get(payload)
        if msg is None:
            msg = orjson.loads(payload)
            if len(self.cache) > 20000:
                self.cache.clear()
            self.cache[payload] = msg
        kind = msg["type"]
        self.decoded += 1
        if os.environ.get("BIGMAP_DEBUG") and c.cls == "zoomed-out" and c.i == self.debug_conn:
            print(round(now - self.t_debug, 2), kind, len(msg.get("pins", ())), len(msg.get("gone", ())),
                  [(k["id"], k["count"]) for k in msg.get("clusters", ())][:4], file=sys.stderr)
        if self.measuring:
            key = (c.cls, kind)
            self.kinds[key] = self.kinds.get(key, 0) + 1
            self.kind_bytes[key] = self.kind_bytes.get(key, 0) + len(payload)
        if kind == "welcome":
            c.pin_id = msg["id"]
            if not c.sampled:
                return
            c.pins = {p["id"]: p for p in msg["pins"]}
            c.clusters = {k["id"]: k for k in msg.get("clusters", ())}
            c.total = msg.get("total", -1)
        elif kind == "snapshot":
            c.pins = {p["id"]: p for p in msg["pins"]}
            c.clusters = {k["id"]: k for k in msg.get("clusters", ())}
            c.total = msg.get("total", -1)
        elif kind == "update":
            for gone in msg["gone"]:
                c.pins.pop(gone, None)
                c.clusters.pop(gone, None)
            for pin in msg["pins"]:
                # A move reaching a viewer that shows its pin: pins that
                # enter the view (or leave a cluster) are not counted.
                if pin["id"] in c.pins and self.measuring:
                    sent = self.send_time.get(pin.get("seq") or -1)
                    if sent is not None:
                        self.latencies.append(now - sent)
                c.pins[pin["id"]] = pin
            for cluster in msg.get("clusters", ()):
                c.clusters[cluster["id"]] = cluster
            c.total = msg.get("total", c.total)
        elif kind == "error":
            self.errors[msg.get("code")] = self.errors.get(msg.get("code"), 0) + 1

    def pump(self, until: float, moving: bool = False, t0: float = 0.0) -> None:
        args = self.args
        interval = 1.0 / (args.people * args.rate) if moving and args.people else 0.0
        poll, by_fd, event = self.ep.poll, self.by_fd, self._event
        while True:
            now = time.monotonic()
            if now >= until:
                return
            if moving:
                due = int((now - t0) / interval) + 1
                budget = args.people
                while self.moves < due and budget:
                    self._move(self.moves % args.people)
                    self.moves += 1
                    budget -= 1
                timeout = min(max(t0 + self.moves * interval - time.monotonic(), 0.0),
                              until - now, 0.05)
            else:
                timeout = min(until - now, 0.05)
            while self.pending < args.concurrency and self.next_connect < len(self.conns):
                self._connect(self.conns[self.next_connect])
                self.next_connect += 1
            events = poll(timeout, 8192)
            # The time the frames are read, not the time the wait began:
            # the wait may last up to 50 ms, which would read as less latency.
            now = time.monotonic()
            for fd, ev in events:
                c = by_fd.get(fd)
                if c is not None:
                    event(c, ev, now)

    def _move(self, k: int) -> None:
        c = self.conns[k]
        if c.state != OPEN or c.sock is None:
            return
        p = self.pos[k]
        p[0] += self.rng.uniform(-0.0002, 0.0002)
        p[1] += self.rng.uniform(-0.0003, 0.0003)
        self.seq += 1
        lat, lng = round(p[0], 6), round(p[1], 6)
        p[0], p[1] = lat, lng
        self.send_time[self.seq] = time.monotonic()
        self._send(c, masked_frame(orjson.dumps(
            {"type": "move", "lat": lat, "lng": lng, "accuracy": 5.0, "seq": self.seq})))

    # the truth

    def expected(self, c: Conn, cells_of: dict[int, dict]) -> tuple[set[str], dict[str, int]]:
        """Pin ids and cluster counts the view must show (the server's widened cells)."""
        level = min(c.zoom + 1, 23)
        cells = cells_of.get(level)
        if cells is None:
            cells = cells_of[level] = {}
            for k, (lat, lng) in enumerate(self.pos):
                cells.setdefault(tile_of(lat, lng, level), []).append(self.conns[k].pin_id)
        west, south, east, north = c.bbox
        x_lo, y_lo = tile_of(north, west, level)
        x_hi, y_hi = tile_of(south, east, level)
        pins: set[str] = set()
        clusters: dict[str, int] = {}
        for x in range(x_lo, x_hi + 1):
            for y in range(y_lo, y_hi + 1):
                ids = cells.get((x, y), ())
                if c.zoom < 18 and len(ids) > CLUSTER_SIZE:
                    clusters[f"c:{level}/{x}/{y}"] = len(ids)
                else:
                    pins.update(ids)
        return pins, clusters

    def wrong(self) -> list[int]:
        bad = []
        mover_of = {c.pin_id: c.mover for c in self.conns[:self.args.people]}
        cells_of: dict[int, dict] = {}
        for c in self.conns:
            if not c.sampled or c.sock is None:
                continue
            pins, clusters = self.expected(c, cells_of)
            got_clusters = {k: v["count"] for k, v in c.clusters.items()}
            positions_ok = all(
                (p["lat"], p["lng"]) == tuple(self.pos[mover_of[p["id"]]])
                for p in c.pins.values() if p["id"] in mover_of)
            if (set(c.pins) != pins or got_clusters != clusters or not positions_ok
                    or c.total != self.args.people):
                bad.append(c.i)
        return bad

    def run(self) -> dict[str, Any]:
        args = self.args
        pid = args.server_pid
        self.measuring = False
        self.moves = 0
        t_start = time.monotonic()
        deadline = t_start + 120 + len(self.conns) / 100
        while self.ready + len(self.failures) < len(self.conns) and time.monotonic() < deadline:
            self.pump(time.monotonic() + 0.05)
        result: dict[str, Any] = {
            "generator": "python", "people": args.people, "viewers": args.viewers,
            "people_view": args.people_view,
            "connected": self.ready,
            "connect_s": round(time.monotonic() - t_start, 1)}
        self.pump(time.monotonic() + 1.0)
        gc.collect()
        gc.freeze()
        t0 = time.monotonic()
        self.pump(t0 + args.warmup, True, t0)
        self.measuring = True
        cpu0, gen0, w0, k0 = proc_cpu_seconds(pid), self_cpu_seconds(), time.monotonic(), core_ticks()
        self.pump(t0 + args.duration, True, t0)
        cpu1, gen1, w1, k1 = proc_cpu_seconds(pid), self_cpu_seconds(), time.monotonic(), core_ticks()
        self.measuring = False
        window = w1 - w0
        # Quiet: pins go at the next tick, cells at the next cluster pass.
        t_stop = time.monotonic()
        converged_after = None
        while time.monotonic() - t_stop < args.settle:
            self.pump(time.monotonic() + 0.25)
            if not self.wrong():
                converged_after = round(time.monotonic() - t_stop, 2)
                break
        wrong = self.wrong()
        per_class: dict[str, dict[str, Any]] = {}
        for name in ["person", *[c[0] for c in CLASSES]]:
            rates = sorted(c.window_bytes / window for c in self.conns if c.cls == name)
            if rates:
                per_class[name] = {
                    "count": len(rates), "median_B_s": round(statistics.median(rates)),
                    "max_B_s": round(rates[-1]), "sampled": sum(1 for c in self.conns
                                                                if c.cls == name and c.sampled)}
        lat = sorted(self.latencies)

        def q(p: float) -> Optional[float]:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 1) if lat else None
        result.update(
            window_s=round(window, 2), moves_per_s=round(args.people * args.rate, 1),
            server_cpu_frac=round((cpu1 - cpu0) / window, 3),
            gen_cpu_frac=round((gen1 - gen0) / window, 3), core_busy=core_busy(k0, k1),
            latency_samples=len(lat), p50_ms=q(0.5), p99_ms=q(0.99), max_ms=q(1.0),
            bytes_per_s=per_class, sampled=sum(c.sampled for c in self.conns),
            wrong_sampled=len(wrong), converged_after_s=converged_after,
            closed_by_server=self.closed_by_server, errors=self.errors,
            failures=self.failures[:10], moves_sent=self.moves, decoded=self.decoded,
            sampled_messages={f"{cls} {kind}": [n, self.kind_bytes[(cls, kind)]]
                              for (cls, kind), n in sorted(self.kinds.items())})
        return result

    def close(self) -> None:
        linger = (1).to_bytes(4, "little") + (0).to_bytes(4, "little")
        for c in self.conns:
            if c.sock is not None:
                try:
                    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                except OSError:
                    pass
                c.sock.close()
        self.ep.close()


def start_server(port: int, log: Path) -> subprocess.Popen:
    twistd = Path(sys.executable).with_name("twistd")

    def pinned() -> None:
        os.sched_setaffinity(0, {SERVER_CORE})
        # As run.py: the highest CFS weight, so that on a shared machine
        # the server and the generator get their cores when they want them.
        os.setpriority(os.PRIO_PROCESS, 0, -20)
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(twistd), "-n", "--pidfile=", *os.environ.get("BIGMAP_TWISTD_ARGS", "").split(),
             "livemap",
             "--port", f"tcp:{port}:interface=127.0.0.1:backlog=4096",
             "--pirate", "none", "--tick", "0.1", "--ping", "600",
             *os.environ.get("BIGMAP_SERVER_ARGS", "").split()],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=pinned,
            # A store of its own (livemap's data directory; older commits
            # ignore it): the user's is left alone, two runs at once do not meet.
            env=dict(os.environ, STATE_DIRECTORY=tempfile.mkdtemp(prefix="bigmap-data-")))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                time.sleep(0.5)
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the server did not start; see {log}")


def render(paths: list[Path]) -> str:
    """A Markdown table of results (one row per run), as docs/benchmarks.md shows them."""
    classes = ["person", *[c[0] for c in CLASSES]]
    lines = [
        "| people + viewers | generator, its CPU (cores) | server CPU (cores) "
        "| other work during (cores) | p50 / p99 ms | "
        + " | ".join(f"{c} B/s median / max" for c in classes)
        + " | sampled wrong / converged after |",
        "| --- | --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in classes) + " | --- |",
    ]
    for path in paths:
        r = orjson.loads(path.read_text())
        rates = r["bytes_per_s"]
        busy = r["core_busy"]
        others = busy.get("core0", 0) + busy.get("core1", 0) - r["server_cpu_frac"] - r["gen_cpu_frac"]
        lines.append(
            f"| {r['people']:,} + {r['viewers']:,} ({r.get('people_view', 'street')}) "
            f"| {r.get('generator', 'python')} {r['gen_cpu_frac']:.2f} "
            f"| {r['server_cpu_frac']:.2f} | {others:.2f} "
            f"| {r['p50_ms']} / {r['p99_ms']} | "
            + " | ".join(f"{rates[c]['median_B_s']:,} / {rates[c]['max_B_s']:,}" if c in rates
                         else "–" for c in classes)
            + f" | {r['wrong_sampled']} of {r['sampled']} / {r['converged_after_s']} s |")
    return "\n".join(lines)


def run_node(args: argparse.Namespace) -> dict[str, Any]:
    """bigmap.js on this (the generator) core, with our arguments; its JSON result."""
    names = ("people", "viewers", "rate", "people_view", "duration", "warmup", "settle", "sample",
             "concurrency", "seed", "map", "port", "server_pid")
    if not (HERE / "peers" / "node_modules" / "ws").is_dir():  # ws is pinned there, as for run.py
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=HERE / "peers", check=True)
    cmd = ["node", str(HERE / "bigmap.js")]
    for name in names:
        cmd += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    limit = args.duration + args.settle + 200 + (args.people + args.viewers) / 100
    out = subprocess.run(cmd, stdout=subprocess.PIPE, check=True, timeout=limit)
    return orjson.loads(out.stdout)


def main(argv: Optional[list[str]] = None) -> None:
    if argv is None and sys.argv[1:2] == ["--render"]:
        print(render([Path(a) for a in sys.argv[2:]]))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--people", type=int, default=1000)
    p.add_argument("--viewers", type=int, default=1000)
    p.add_argument("--rate", type=float, default=1.0)
    p.add_argument("--people-view", choices=sorted(MOVER_VIEWS), default="street",
                   help="what each moving person's page shows (default: its street, zoom 17)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of moving, warm-up included")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--settle", type=float, default=4.0)
    p.add_argument("--sample", type=int, default=50, help="viewers decoded in full, per class")
    p.add_argument("--concurrency", type=int, default=200)
    p.add_argument("--seed", type=int, default=20)
    p.add_argument("--map", default="bigmap")
    p.add_argument("--port", type=int, help="a server already running (else one is started)")
    p.add_argument("--server-pid", type=int)
    p.add_argument("--json", type=Path)
    p.add_argument("--generator", choices=("python", "node"), default="python",
                   help="this file's generator, or bigmap.js (Node.js, ws; no code shared)")
    args = p.parse_args(argv)
    os.sched_setaffinity(0, {GENERATOR_CORE})
    os.setpriority(os.PRIO_PROCESS, 0, -20)
    need = args.people + args.viewers + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    background = wait_quiet(20.0)
    server = None
    if args.port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            args.port = s.getsockname()[1]
        server = start_server(args.port, Path(f"/tmp/bigmap-server-{args.port}.log"))
        args.server_pid = server.pid
    bench = BigMap(args) if args.generator == "python" else None
    try:
        result = bench.run() if bench else run_node(args)
        result["background_before"] = background
        result["server_survived"] = server is None or server.poll() is None
    finally:
        if bench:
            bench.close()
        if server is not None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
    text = orjson.dumps(result, option=orjson.OPT_INDENT_2).decode()
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
