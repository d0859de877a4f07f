"""Fan-out load generator for livemap and its naive peers.

One process, one core, many WebSocket connections on raw non-blocking
sockets and ``select.epoll``: no Twisted, no asyncio, no threads, because the
generator has to outrun the server it measures on the other core of a
two-core machine.  The WebSocket client is the minimum RFC 6455 needs (masked
client frames with a fixed mask key, unmasked server frames, ping/pong,
close) and speaks livemap's protocol (docs/protocol.md) with real frames.

What keeps it cheap:

* A server that fans out encodes one update and writes the same bytes to many
  clients, so every distinct payload is parsed once (orjson) and remembered;
  the same bytes arriving on another socket are recognised by a dict lookup
  (hash plus full comparison), which is exactly as strict as parsing again.
* Each delivery appends its receive time to the payload's record; latencies
  are computed with numpy after the run, from the ``seq`` every pin carries
  back (seqs are unique across the generator, so a seq names its send time).
* Every client's view is an int64 row (latest seq per mover, -1 for absent),
  updated per frame; at the end it is compared with what was last sent.

The result is one JSON object on stdout.  ``bench/run.py`` starts the server,
runs this on the other core and writes the table.

usage: python bench/loadgen.py --port PORT --clients N --movers M [...]
"""

from __future__ import annotations

import argparse
import base64
import errno
import gc
import hashlib
import os
import random
import resource
import select
import socket
import sys
import time
from array import array
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

MASK_KEY = b"\x37\xfa\x21\x3d"
_MASK_REPEAT = MASK_KEY * 1025  # covers every client message (<= 4096 bytes)
WS_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
WS_ACCEPT = base64.b64encode(
    hashlib.sha1(WS_KEY + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
)
RECV_SIZE = 65536
PACE_MIN_EVENTS = 64  # ready sockets in one poll that count as heavy traffic
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
LATENCY_BIN_S = 0.0001  # histogram resolution: 0.1 ms
LATENCY_MAX_S = 120.0

# client connection states
CONNECTING, HANDSHAKE, OPEN, READY, STALLED, CLOSED = range(6)

# frame kinds in the payload memo
K_UPDATE, K_SNAPSHOT, K_ERROR, K_OTHER = range(4)


def masked_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A client frame (RFC 6455 5.3: clients must mask; a fixed key is allowed)."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    mask = _MASK_REPEAT[:n] if n <= len(_MASK_REPEAT) else (MASK_KEY * (n // 4 + 1))[:n]
    # XOR of two little-endian integers is the byte-wise XOR RFC 6455 asks for
    masked = (int.from_bytes(payload, "little") ^ int.from_bytes(mask, "little")).to_bytes(n, "little")
    return header + MASK_KEY + masked


@dataclass
class Config:
    """What one run does; filled from the command line."""

    host: str
    port: int
    map: str
    clients: int
    movers: int
    rate: float
    duration: float
    warmup: float
    settle: float
    stalled: int
    views: bool
    idle_hold: float
    concurrency: int
    server_pid: int
    cpu: int | None
    seed: int
    read_pace: float
    per_address: int


class Entry:
    """One distinct payload, parsed once, and the times it was delivered."""

    __slots__ = ("kind", "n", "single", "i0", "s0", "idx", "seqs", "gone", "times", "clients", "foreign", "code")

    def __init__(self) -> None:
        self.kind = K_OTHER
        self.n = 0
        self.single = False
        self.i0 = 0
        self.s0 = 0
        self.idx: np.ndarray | None = None
        self.seqs: np.ndarray | None = None
        self.gone: np.ndarray | None = None
        self.times = array("d")
        self.clients = array("i")  # who got it, kept only when views differ per client
        self.foreign = 0
        self.code = ""


class Client:
    """One WebSocket connection's socket, buffers and role."""

    __slots__ = (
        "i", "sock", "fd", "recv", "state", "buf", "out", "pin_id", "mover",
        "stalled", "frag", "frag_op", "bbox", "row", "rownp",
    )

    def __init__(self, i: int) -> None:
        self.i = i
        self.sock: socket.socket | None = None
        self.fd = -1
        self.state = CONNECTING
        self.buf = b""
        self.out = b""
        self.pin_id = ""
        self.mover = -1
        self.stalled = False
        self.frag = b""
        self.frag_op = 0
        self.bbox: list[float] | None = None
        self.row = array("q")
        self.rownp: np.ndarray = np.empty(0, dtype=np.int64)


def proc_cpu_seconds(pid: int) -> float:
    """utime+stime of a whole process (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1])
    return 0


CoreTicks = dict[int, tuple[int, int, int, int, float]]


def core_ticks() -> CoreTicks:
    """Per core (busy, softirq, total, idle) clock ticks from /proc/stat and
    the monotonic time they were read at.

    On this kernel (tick-based CPU accounting, no IRQ time accounting, no
    tick when idle) user, system and softirq are *sampled* by the 250 Hz
    timer tick, which misses most of a load made of short bursts (a 0.5 ms
    burst every 10 ms reads as 0.2 % busy instead of 5 %), whereas idle (and
    iowait) is measured exactly at every idle entry and exit.  So a core's
    busy time is taken as wall time minus idle; the sampled fields only give
    shares (softirq).  Busy counts every process on the core, and the kernel
    work (softirq, timers, wakeups) done there outside any process."""
    out = {}
    t = time.monotonic()
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"cpu") and line[3:4].isdigit():
                name, *vals = line.split()
                v = [int(x) for x in vals]
                total = sum(v[:8])
                out[int(name[3:])] = (total - v[3] - v[4], v[6], total, v[3] + v[4], t)
    return out


def core_busy(a: CoreTicks, b: CoreTicks) -> dict[str, float]:
    """Per core over the interval: busy share of wall time (exact, from idle
    time), softirq share (sampled), and the sampled busy share for reference."""
    res = {}
    tck = os.sysconf("SC_CLK_TCK")
    for k in sorted(a):
        if k in b:
            total = max(b[k][2] - a[k][2], 1)
            wall = max(b[k][4] - a[k][4], 1e-9)
            res[f"core{k}"] = round(min(1.0, max(0.0, 1.0 - (b[k][3] - a[k][3]) / tck / wall)), 3)
            res[f"core{k}_softirq"] = round((b[k][1] - a[k][1]) / total, 3)
            res[f"core{k}_sampled"] = round((b[k][0] - a[k][0]) / total, 3)
    return res


def wait_quiet(limit_s: float, threshold: float = 0.15) -> float:
    """Wait until both cores together are less than `threshold` of a core busy
    for a second, at most `limit_s`; returns the load seen last."""
    deadline = time.monotonic() + limit_s
    while True:
        a = core_ticks()
        time.sleep(1.0)
        load = sum(v for k, v in core_busy(a, core_ticks()).items() if k[4:].isdigit())
        if load < threshold or time.monotonic() > deadline:
            return round(load, 3)


def self_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


_TCP_EXT = ("DelayedACKs", "TCPPureAcks", "TCPHPAcks", "TCPHPHits", "TCPBacklogCoalesce", "TCPAutoCorking")


def kernel_counters(pid: int) -> dict[str, float]:
    """Cumulative counters that say what the kernel did for the run: per core
    rescheduling and function-call IPIs (a wakeup of a task on the other
    core), local timer interrupts, NET_RX and TIMER softirqs; the server's
    user and system time apart and its context switches; our own context
    switches; TCP segments and ACKs (machine-wide).  The generators report
    their rates over the measured window, for diagnosis only."""
    out: dict[str, float] = {}
    ncpu = os.cpu_count() or 1
    with open("/proc/interrupts", "rb") as f:
        for line in f:
            parts = line.split()
            if parts and parts[0] in (b"RES:", b"CAL:", b"LOC:"):
                for c in range(ncpu):
                    out[f"irq_{parts[0][:-1].decode().lower()}_core{c}"] = int(parts[1 + c])
    with open("/proc/softirqs", "rb") as f:
        for line in f:
            parts = line.split()
            if parts and parts[0] in (b"NET_RX:", b"TIMER:"):
                for c in range(ncpu):
                    out[f"softirq_{parts[0][:-1].decode().lower()}_core{c}"] = int(parts[1 + c])
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    out["server_user_s"] = int(fields[11]) / tck
    out["server_system_s"] = int(fields[12]) / tck
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"voluntary_ctxt_switches:"):
                out["server_voluntary_switches"] = int(line.split()[1])
            elif line.startswith(b"nonvoluntary_ctxt_switches:"):
                out["server_involuntary_switches"] = int(line.split()[1])
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out["gen_voluntary_switches"] = ru.ru_nvcsw
    out["gen_involuntary_switches"] = ru.ru_nivcsw
    for path, want in (("/proc/net/snmp", (b"Tcp:", ("InSegs", "OutSegs"))),
                       ("/proc/net/netstat", (b"TcpExt:", _TCP_EXT))):
        with open(path, "rb") as f:
            rows = [line.split() for line in f if line.startswith(want[0])]
        if len(rows) >= 2:
            names = [n.decode() for n in rows[0][1:]]
            for name, value in zip(names, rows[1][1:]):
                if name in want[1]:
                    out[f"tcp_{name}"] = int(value)
    return out


def kernel_rates(a: dict[str, float], b: dict[str, float], seconds: float) -> dict[str, float]:
    return {k: round((b[k] - a[k]) / seconds, 3 if k.endswith("_s") else 1) for k in a if k in b}


class LoadGen:
    """Connects, moves, listens, checks; see the module docstring."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.ep = select.epoll(sizehint=cfg.clients + 16)
        self.clients = [Client(i) for i in range(cfg.clients)]
        self.by_fd: dict[int, Client] = {}
        self.id2idx: dict[str, int] = {}
        self.memo: dict[bytes, Entry] = {}
        m = max(cfg.movers, 1)
        for c in self.clients:
            # latest seq per mover as this client sees it; -1: no pin.  The
            # array serves fast scalar access, the numpy view vector access.
            c.row = array("q", [-1]) * m
            c.rownp = np.frombuffer(c.row, dtype=np.int64)
        self.foreign = np.zeros(cfg.clients, dtype=np.int64)
        self.truth = np.full(m, -1, dtype=np.int64)
        cap = int(cfg.movers * cfg.rate * (cfg.duration + 5)) + 16
        self.send_times = np.zeros(cap, dtype=np.float64)
        self.seq_mover = np.full(cap, -1, dtype=np.int64)
        self.next_seq = 1
        self.disorder = 0
        self.errors: dict[str, int] = {}
        self.closed_by_server = 0
        self.connect_failures = 0
        self.protocol_failures: list[str] = []
        self.ready = 0
        self.moves_sent = 0
        self.max_batch_s = 0.0
        self.max_batch_cpu_s = 0.0
        self.max_batch_events = 0
        self.pending_connects = 0
        self.next_to_connect = 0
        self.rss_samples: list[int] = []
        self.last_rss_sample = 0.0
        # roles: movers are the first M clients; stalled readers the last ones
        for k in range(cfg.movers):
            self.clients[k].mover = k
        for k in range(cfg.stalled):
            self.clients[cfg.clients - 1 - k].stalled = True
        self.homes = self._homes()
        self.pos = [list(h) for h in self.homes]
        if cfg.views:
            self._assign_views()
        self.request = (
            f"GET /ws/{cfg.map} HTTP/1.1\r\nHost: {cfg.host}:{cfg.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {WS_KEY.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()

    # -- world layout -------------------------------------------------------

    def _homes(self) -> list[tuple[float, float]]:
        """Where each mover lives: a city-sized blob, or a world-wide grid for views."""
        cfg = self.cfg
        if not cfg.views:
            return [
                (48.85 + self.rng.uniform(-0.05, 0.05), 2.35 + self.rng.uniform(-0.05, 0.05))
                for _ in range(cfg.movers)
            ]
        # a grid over the world: cells of 5 deg lat x 9 deg lng (24 x 40), one
        # pin at each cell centre; past 960 movers the grid starts again
        homes = []
        for k in range(cfg.movers):
            r, c = divmod(k % 960, 40)
            homes.append((-60 + r * 5 + 2.5, -180 + c * 9 + 4.5))
        return homes

    def _assign_views(self) -> None:
        """Each client watches a 10 x 18 deg box: about four grid pins, some boxes
        crossing the antimeridian.  Box edges fall between grid points, and
        movers wander far less than half a cell, so membership never changes."""
        for c in self.clients:
            south = -60.0 + self.rng.randrange(23) * 5
            west = -180.0 + self.rng.randrange(40) * 9
            east = west + 18
            if east > 180:
                east -= 360
            c.bbox = [west, south, east, south + 10]

    # -- connections --------------------------------------------------------

    def _start_connect(self, c: Client) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        if c.stalled:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.cfg.per_address:
            # Real clients come from many addresses, and a server may cap
            # connections per address: spread ours over 127.0.0.0/8 (all of
            # it is this machine's loopback).  The port is picked at connect.
            s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            a = c.i // self.cfg.per_address
            s.bind((f"127.0.{a // 250}.{a % 250 + 2}", 0))
        err = s.connect_ex((self.cfg.host, self.cfg.port))
        if err not in (0, errno.EINPROGRESS):
            s.close()
            self.connect_failures += 1
            c.state = CLOSED
            return
        c.sock = s
        c.recv = s.recv
        c.fd = s.fileno()
        c.state = CONNECTING
        self.by_fd[c.fd] = c
        self.ep.register(c.fd, select.EPOLLOUT)
        self.pending_connects += 1

    def _fill_connects(self) -> None:
        while self.pending_connects < self.cfg.concurrency and self.next_to_connect < len(self.clients):
            c = self.clients[self.next_to_connect]
            self.next_to_connect += 1
            self._start_connect(c)

    def _became_ready(self, c: Client) -> None:
        c.state = STALLED if c.stalled else READY
        self.ready += 1
        self.pending_connects -= 1
        if c.stalled:
            # from now on it never reads: the server sees a full receive window
            self.ep.unregister(c.fd)

    def _fail(self, c: Client, why: str) -> None:
        if c.state in (CONNECTING, HANDSHAKE, OPEN):
            self.pending_connects -= 1
            self.connect_failures += 1
        if len(self.protocol_failures) < 10:
            self.protocol_failures.append(why)
        self._drop(c)

    def _drop(self, c: Client) -> None:
        if c.sock is not None:
            try:
                self.ep.unregister(c.fd)
            except (OSError, ValueError):
                pass
            self.by_fd.pop(c.fd, None)
            c.sock.close()
            c.sock = None
        c.state = CLOSED

    def _send(self, c: Client, data: bytes) -> None:
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
            self._fail(c, f"send: {e}")
            return
        if n < len(data):
            c.out = data[n:]
            if not c.stalled:
                self.ep.modify(c.fd, select.EPOLLIN | select.EPOLLOUT)

    def _flush(self, c: Client) -> None:
        try:
            n = c.sock.send(c.out)  # type: ignore[union-attr]
        except BlockingIOError:
            return
        except OSError as e:
            self._fail(c, f"send: {e}")
            return
        c.out = c.out[n:]
        if not c.out:
            self.ep.modify(c.fd, select.EPOLLIN)

    # -- receiving ----------------------------------------------------------

    def _on_event(self, c: Client, ev: int) -> None:
        st = c.state
        if st == CONNECTING:
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # type: ignore[union-attr]
            if err:
                self._fail(c, f"connect: {os.strerror(err)}")
                return
            c.state = HANDSHAKE
            self.ep.modify(c.fd, select.EPOLLIN)
            self._send(c, self.request)
            return
        if ev & select.EPOLLOUT and c.out:
            self._flush(c)
            if c.sock is None:
                return
        if not ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
            return
        try:
            data = c.sock.recv(RECV_SIZE)  # type: ignore[union-attr]
        except BlockingIOError:
            return
        except OSError as e:
            self._fail(c, f"recv: {e}")
            return
        now = time.monotonic()
        if not data:
            if c.state in (READY, STALLED):
                self.closed_by_server += 1
            self._fail(c, "eof")
            return
        if c.buf:
            data = c.buf + data
            c.buf = b""
        if st == HANDSHAKE:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                c.buf = data
                return
            head = data[:end]
            if not head.startswith(b"HTTP/1.1 101") or WS_ACCEPT not in head:
                self._fail(c, "handshake: " + head.split(b"\r\n", 1)[0].decode(errors="replace"))
                return
            c.state = OPEN
            data = data[end + 4 :]
            if not data:
                return
        self._frames(c, data, now)

    def _read_ready(self, c: Client) -> None:
        """The hot path: a READY client with data.  Whole unfragmented text
        frames holding a known update are applied inline; anything else goes
        to the general code."""
        try:
            data = c.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as e:
            self._fail(c, f"recv: {e}")
            return
        now = time.monotonic()
        if not data:
            self.closed_by_server += 1
            self._fail(c, "eof")
            return
        if c.buf:
            data = c.buf + data
            c.buf = b""
        memo_get = self.memo.get
        track = self.cfg.views
        row = c.row
        disorder = 0
        i = 0
        n = len(data)
        while n - i >= 2:
            b0 = data[i]
            ln = data[i + 1]  # server frames are never masked
            if ln < 126:
                start = i + 2
            elif ln == 126:
                if n - i < 4:
                    break
                ln = (data[i + 2] << 8) | data[i + 3]
                start = i + 4
            else:
                break  # 64-bit length: let the general code decide
            end = start + ln
            if end > n or b0 != 0x81:
                break
            payload = data[start:end]
            i = end
            e = memo_get(payload)
            if e is not None and e.single:
                if row[e.i0] > e.s0:
                    disorder += 1
                row[e.i0] = e.s0
                e.times.append(now)
                if track:
                    e.clients.append(c.i)
            else:
                self._message(c, payload, now)
                if c.sock is None:
                    return
        if disorder:
            self.disorder += disorder
        if i < n:
            self._frames(c, data[i:], now)

    def _frames(self, c: Client, data: bytes, now: float) -> None:
        i = 0
        n = len(data)
        while n - i >= 2:
            b0 = data[i]
            ln = data[i + 1] & 0x7F
            if ln < 126:
                start = i + 2
            elif ln == 126:
                if n - i < 4:
                    break
                ln = (data[i + 2] << 8) | data[i + 3]
                start = i + 4
            else:
                if n - i < 10:
                    break
                ln = int.from_bytes(data[i + 2 : i + 10], "big")
                start = i + 10
            end = start + ln
            if end > n:
                break
            i = end
            op = b0 & 0x0F
            if op == 0x1 and b0 & 0x80:
                self._message(c, data[start:end], now)
            elif op in (0x1, 0x2, 0x0):
                # fragmented message: gather, deliver at FIN
                if op:
                    c.frag_op = op
                    c.frag = data[start:end]
                else:
                    c.frag += data[start:end]
                if b0 & 0x80:
                    payload, c.frag = c.frag, b""
                    if c.frag_op == 0x1:
                        self._message(c, payload, now)
            elif op == 0x9:
                self._send(c, masked_frame(data[start:end], 0xA))
            elif op == 0x8:
                if c.state == READY:
                    self.closed_by_server += 1
                self._send(c, masked_frame(data[start : start + 2], 0x8))
                self._fail(c, "server closed: " + data[start:end].hex())
                return
            if c.sock is None:
                return
        if i < n:
            c.buf = data[i:]

    def _message(self, c: Client, payload: bytes, now: float) -> None:
        e = self.memo.get(payload)
        if e is None:
            if not c.pin_id:
                self._welcome(c, payload)
                return
            e = self._parse(payload)
            if e is None:
                return
            self.memo[payload] = e
        k = e.kind
        ci = c.i
        if k == K_UPDATE:
            if e.single:
                row = c.row
                if row[e.i0] > e.s0:
                    self.disorder += 1
                row[e.i0] = e.s0
            else:
                row = c.rownp
                if e.n:
                    idx = e.idx
                    if (row[idx] > e.seqs).any():
                        self.disorder += 1
                    row[idx] = e.seqs
                if e.gone is not None:
                    row[e.gone] = -1
            if e.foreign:
                self.foreign[ci] += e.foreign
            e.times.append(now)
            if self.cfg.views:
                e.clients.append(ci)
        elif k == K_SNAPSHOT:
            row = c.rownp
            row[:] = -1
            if e.n:
                row[e.idx] = e.seqs
            self.foreign[ci] = e.foreign
            if c.state == OPEN and (self.cfg.views and c.bbox is not None):
                self._became_ready(c)
        elif k == K_ERROR:
            self.errors[e.code] = self.errors.get(e.code, 0) + 1

    def _welcome(self, c: Client, payload: bytes) -> None:
        try:
            msg = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self._fail(c, "welcome: bad json")
            return
        if msg.get("type") != "welcome":
            self._fail(c, "first message was " + str(msg.get("type")))
            return
        c.pin_id = msg["id"]
        if c.mover >= 0:
            self.id2idx[c.pin_id] = c.mover
        row = c.rownp
        row[:] = -1
        for p in msg.get("pins", ()):
            k = self.id2idx.get(p["id"], -1)
            if k < 0:
                self.foreign[c.i] += 1
            else:
                row[k] = p["seq"] if p.get("seq") is not None else -2
        if self.cfg.views and c.bbox is not None:
            self._send(c, masked_frame(orjson.dumps({"type": "view", "bbox": c.bbox})))
            if c.stalled:
                self._became_ready(c)
            # ready once the snapshot for the box arrives
            return
        self._became_ready(c)

    def _parse(self, payload: bytes) -> Entry | None:
        try:
            msg = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self.errors["(generator) bad json from server"] = self.errors.get("(generator) bad json from server", 0) + 1
            return None
        e = Entry()
        kind = msg.get("type")
        if kind in ("update", "snapshot"):
            e.kind = K_UPDATE if kind == "update" else K_SNAPSHOT
            idx = []
            seqs = []
            id2idx = self.id2idx
            for p in msg["pins"]:
                k = id2idx.get(p["id"], -1)
                if k < 0:
                    e.foreign += 1
                    continue
                s = p.get("seq")
                idx.append(k)
                seqs.append(-2 if s is None else s)
            e.n = len(idx)
            if e.n == 1 and kind == "update":
                e.single = not msg.get("gone") and not e.foreign
                e.i0, e.s0 = idx[0], seqs[0]
            e.idx = np.array(idx, dtype=np.intp)
            e.seqs = np.array(seqs, dtype=np.int64)
            gone = [id2idx[g] for g in msg.get("gone") or () if g in id2idx]
            if gone:
                e.gone = np.array(gone, dtype=np.intp)
        elif kind == "error":
            e.kind = K_ERROR
            e.code = str(msg.get("code"))
        return e

    # -- the loop -----------------------------------------------------------

    def pump(self, until: float, moving: bool = False, t_move0: float = 0.0) -> None:
        """Serve sockets until ``until``; when moving, send every due move."""
        poll = self.ep.poll
        by_fd = self.by_fd
        on_event = self._on_event
        read_ready = self._read_ready
        EPOLLIN = select.EPOLLIN
        cfg = self.cfg
        pace = cfg.read_pace
        interval = 1.0 / (cfg.movers * cfg.rate) if moving and cfg.movers else 0.0
        while True:
            now = time.monotonic()
            if now >= until:
                return
            if moving:
                due = int((now - t_move0) / interval) + 1
                sent_budget = cfg.movers
                while self.moves_sent < due and sent_budget:
                    self._move(self.moves_sent % cfg.movers)
                    self.moves_sent += 1
                    sent_budget -= 1
                wait = t_move0 + self.moves_sent * interval - time.monotonic()
                timeout = min(max(wait, 0.0), until - now, 0.05)
            else:
                timeout = min(until - now, 0.05)
            if now - self.last_rss_sample > 0.25:
                self.last_rss_sample = now
                self._sample_rss()
            if self.pending_connects < cfg.concurrency and self.next_to_connect < len(self.clients):
                self._fill_connects()
            events = poll(timeout, 8192)
            t_batch = time.monotonic()
            c_batch = time.process_time()
            for fd, ev in events:
                c = by_fd.get(fd)
                if c is None:
                    continue
                if ev == EPOLLIN and c.state == READY:
                    read_ready(c)
                else:
                    on_event(c, ev)
            # how long the generator was deaf: a long batch delays reads
            busy = time.monotonic() - t_batch
            if busy > self.max_batch_s:
                self.max_batch_s = busy
                self.max_batch_cpu_s = time.process_time() - c_batch
                self.max_batch_events = len(events)
            if pace and len(events) >= PACE_MIN_EVENTS:
                # Heavy traffic: let frames pile up a little so each recv
                # takes several (one syscall per frame is what saturates us).
                rest = pace - (time.monotonic() - now)
                if moving:
                    rest = min(rest, t_move0 + self.moves_sent * interval - time.monotonic())
                if rest > 0:
                    time.sleep(rest)

    def _move(self, k: int) -> None:
        c = self.clients[k]
        if c.state != READY:
            return
        seq = self.next_seq
        self.next_seq += 1
        pos = self.pos[k]
        home = self.homes[k]
        rng = self.rng
        pos[0] = min(max(pos[0] + rng.uniform(-0.0002, 0.0002), home[0] - 0.01), home[0] + 0.01)
        pos[1] = min(max(pos[1] + rng.uniform(-0.0002, 0.0002), home[1] - 0.01), home[1] + 0.01)
        frame = masked_frame(
            orjson.dumps(
                {
                    "type": "move",
                    "lat": round(pos[0], 6),
                    "lng": round(pos[1], 6),
                    "heading": rng.randrange(360),
                    "accuracy": 5.0,
                    "seq": seq,
                }
            )
        )
        self.truth[k] = seq
        if seq >= len(self.send_times):
            self.send_times = np.concatenate([self.send_times, np.zeros(len(self.send_times))])
            self.seq_mover = np.concatenate([self.seq_mover, np.full(len(self.seq_mover), -1)])
        self.seq_mover[seq] = k
        self.send_times[seq] = time.monotonic()
        self._send(c, frame)

    def _sample_rss(self) -> None:
        try:
            self.rss_samples.append(proc_rss_kb(self.cfg.server_pid))
        except OSError:
            pass

    # -- checks -------------------------------------------------------------

    def _in_view(self) -> np.ndarray:
        """clients x movers: is that mover's pin inside that client's box."""
        lat = np.array([h[0] for h in self.homes])[None, :]
        lng = np.array([h[1] for h in self.homes])[None, :]
        b = np.array([c.bbox for c in self.clients])
        west, south, east, north = (b[:, k : k + 1] for k in range(4))
        in_lat = (lat >= south) & (lat <= north)
        plain = (west <= east) & (lng >= west) & (lng <= east)
        crossing = (west > east) & ((lng >= west) | (lng <= east))
        return in_lat & (plain | crossing)

    def wrong_clients(self) -> int:
        """Clients (excluding stalled ones) whose pins differ from the truth."""
        live = np.array([c.state == READY for c in self.clients])
        if self.cfg.views:
            expected = np.where(self.in_view, self.truth[None, :], -1)
            bad = (np.stack([c.rownp for c in self.clients]) != expected).any(axis=1)
        else:
            bad = (np.stack([c.rownp for c in self.clients]) != self.truth[None, :]).any(axis=1) if self.cfg.movers else np.zeros(len(self.clients), bool)
        bad |= self.foreign > 0
        return int(np.count_nonzero(bad & live)) + int(np.count_nonzero(~live & ~np.array([c.stalled for c in self.clients])))

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        pid = cfg.server_pid
        result: dict[str, Any] = {"clients": cfg.clients, "movers": cfg.movers, "rate": cfg.rate, "stalled": cfg.stalled, "views": cfg.views}
        rss0 = proc_rss_kb(pid)
        result["rss_before_kb"] = rss0
        t0 = time.monotonic()
        self._fill_connects()
        deadline = t0 + 60 + cfg.clients / 200
        while self.ready + self.connect_failures < cfg.clients and time.monotonic() < deadline:
            self.pump(time.monotonic() + 0.05)
        result["connect_s"] = round(time.monotonic() - t0, 3)
        result["connected"] = self.ready
        result["connect_failures"] = self.connect_failures
        if cfg.views:
            self.in_view = self._in_view()
            result["pins_per_view_mean"] = round(float(self.in_view.sum(axis=1).mean()), 2)
        self.pump(time.monotonic() + (cfg.idle_hold if not cfg.movers else 0.5))
        # Everything made so far lives to the end: keep the cyclic GC from
        # walking it again and again (a full pass would pause the generator).
        gc.collect()
        gc.freeze()
        rss1 = proc_rss_kb(pid)
        result["rss_connected_kb"] = rss1
        result["rss_per_conn_kb"] = round((rss1 - rss0) / max(self.ready, 1), 2)
        self.moves_sent = 0
        self.max_batch_s = 0.0
        self.max_batch_cpu_s = 0.0
        self.max_batch_events = 0
        if cfg.movers:
            t_move0 = time.monotonic()
            w0 = t_move0 + cfg.warmup
            w1 = t_move0 + cfg.duration
            self.pump(w0, True, t_move0)
            result["rss_window_start_kb"] = proc_rss_kb(pid)
            kc0 = kernel_counters(pid)
            cpu_s0, cpu_g0, tw0, k0 = proc_cpu_seconds(pid), self_cpu_seconds(), time.monotonic(), core_ticks()
            self.pump(w1, True, t_move0)
            cpu_s1, cpu_g1, tw1, k1 = proc_cpu_seconds(pid), self_cpu_seconds(), time.monotonic(), core_ticks()
            kc1 = kernel_counters(pid)
            rss2 = proc_rss_kb(pid)
            scheduled = int((tw1 - t_move0) * cfg.movers * cfg.rate)
            # settle: poll convergence every 100 ms up to `settle` seconds
            t_stop = time.monotonic()
            converge_at = None
            while time.monotonic() - t_stop < cfg.settle:
                self.pump(time.monotonic() + 0.1)
                if self.wrong_clients() == 0:
                    converge_at = time.monotonic() - t_stop
                    break
            wrong = self.wrong_clients()
            window = tw1 - tw0
            delivered, hist = self._latencies(tw0, tw1)
            result.update(
                moves_sent=self.moves_sent,
                moves_scheduled=scheduled,
                window_s=round(window, 3),
                delivered=delivered,
                delivered_per_s=round(delivered / window, 1),
                **self._percentiles(hist),
                expected_samples=self._expected_samples(tw0, tw1),
                server_cpu_s=round(cpu_s1 - cpu_s0, 3),
                server_cpu_frac=round((cpu_s1 - cpu_s0) / window, 3),
                server_cpu_us_per_pin=round((cpu_s1 - cpu_s0) / delivered * 1e6, 3) if delivered else None,
                gen_cpu_frac=round((cpu_g1 - cpu_g0) / window, 3),
                core_busy=core_busy(k0, k1),
                rss_end_kb=rss2,
                rss_per_conn_end_kb=round((rss2 - rss0) / max(self.ready, 1), 2),
                converged=wrong == 0,
                wrong_clients=wrong,
                converge_s=None if converge_at is None else round(converge_at, 3),
                disorder=self.disorder,
                distinct_payloads=len(self.memo),
                kernel_per_s=kernel_rates(kc0, kc1, window),
            )
        else:
            cpu_s0, cpu_g0, tw0, k0 = proc_cpu_seconds(pid), self_cpu_seconds(), time.monotonic(), core_ticks()
            self.pump(time.monotonic() + 1.0)
            window = time.monotonic() - tw0
            result.update(
                core_busy=core_busy(k0, core_ticks()),
                server_cpu_frac=round((proc_cpu_seconds(pid) - cpu_s0) / window, 3),
                gen_cpu_frac=round((self_cpu_seconds() - cpu_g0) / window, 3),
                converged=self.wrong_clients() == 0,
                wrong_clients=self.wrong_clients(),
            )
        result["gen_max_batch_ms"] = round(self.max_batch_s * 1000, 1)
        result["gen_max_batch_cpu_ms"] = round(self.max_batch_cpu_s * 1000, 1)
        result["gen_max_batch_events"] = self.max_batch_events
        result["rss_peak_kb"] = max(self.rss_samples + [proc_rss_kb(pid)])
        result["errors"] = self.errors
        result["closed_by_server"] = self.closed_by_server
        result["failures"] = self.protocol_failures
        return result

    def _latencies(self, tw0: float, tw1: float) -> tuple[int, np.ndarray]:
        """Delivered pin states received inside the window, and a histogram of
        send-to-receive latency for every pin state sent inside it."""
        nbins = int(LATENCY_MAX_S / LATENCY_BIN_S) + 1
        hist = np.zeros(nbins, dtype=np.int64)
        delivered = 0
        st = self.send_times
        for e in self.memo.values():
            if e.kind != K_UPDATE or not e.n or not e.times:
                continue
            recv = np.frombuffer(e.times, dtype=np.float64)
            idx, seqs = e.idx, e.seqs
            ok = (seqs > 0) & (seqs < len(st))  # type: ignore[operator]
            idx, seqs = idx[ok], seqs[ok]  # type: ignore[index]
            in_window = (recv >= tw0) & (recv < tw1)
            if self.cfg.views:
                # only pins inside the receiver's box count: a server that
                # ignores views delivers the rest to no purpose
                wanted = self.in_view[np.frombuffer(e.clients, dtype=np.int32)][:, idx]
                delivered += int(wanted[in_window].sum())
            else:
                wanted = None
                delivered += int(np.count_nonzero(in_window)) * e.n
            sent = st[seqs]
            sent_ok = (sent >= tw0) & (sent < tw1)
            if not sent_ok.any():
                continue
            lat = recv[:, None] - sent[None, sent_ok]
            if wanted is not None:
                lat = lat[wanted[:, sent_ok]]
            bins = np.clip((lat.ravel() / LATENCY_BIN_S).astype(np.int64), 0, nbins - 1)
            hist += np.bincount(bins, minlength=nbins)
        return delivered, hist

    def _expected_samples(self, tw0: float, tw1: float) -> int:
        """Pin states sent in the window times the clients that should see each:
        the latency samples there would be if nothing were coalesced or lost."""
        live = np.array([c.state == READY for c in self.clients])
        if self.cfg.views:
            receivers = (self.in_view & live[:, None]).sum(axis=0)
        else:
            receivers = np.full(max(self.cfg.movers, 1), int(live.sum()))
        n = self.next_seq
        sent = self.send_times[1:n]
        movers = self.seq_mover[1:n]
        mask = (sent >= tw0) & (sent < tw1) & (movers >= 0)
        return int(receivers[movers[mask]].sum())

    @staticmethod
    def _percentiles(hist: np.ndarray) -> dict[str, Any]:
        total = int(hist.sum())
        if not total:
            return {"latency_samples": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
        cum = np.cumsum(hist)

        def q(p: float) -> float:
            return round(float(np.searchsorted(cum, p * total)) * LATENCY_BIN_S * 1000, 1)

        return {
            "latency_samples": total,
            "p50_ms": q(0.50),
            "p99_ms": q(0.99),
            "max_ms": round(float(np.nonzero(hist)[0][-1]) * LATENCY_BIN_S * 1000, 1),
        }

    def close(self) -> None:
        """Reset every connection (SO_LINGER 0): no TIME_WAIT pile-up between runs."""
        linger = (1).to_bytes(4, "little") + (0).to_bytes(4, "little")
        for c in self.clients:
            if c.sock is not None:
                try:
                    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                except OSError:
                    pass
                c.sock.close()
                c.sock = None
        self.ep.close()


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(description="livemap fan-out load generator (see module docstring)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--map", default="bench")
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--movers", type=int, default=0)
    p.add_argument("--rate", type=float, default=1.0, help="moves per second per mover")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of moving, warm-up included")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of moving before the measured window")
    p.add_argument("--settle", type=float, default=1.5, help="max seconds to wait for convergence after the last move")
    p.add_argument("--stalled", type=int, default=0, help="clients that stop reading after welcome")
    p.add_argument("--views", action="store_true", help="each client views a small box of a world-wide map")
    p.add_argument("--idle-hold", type=float, default=2.0, help="seconds to hold idle connections before measuring RSS")
    p.add_argument("--concurrency", type=int, default=200, help="connection handshakes in flight")
    p.add_argument("--server-pid", type=int, required=True)
    p.add_argument("--cpu", type=int, default=None, help="pin this process to that core")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--per-address", type=int, default=100,
        help="connections per source address in 127.0.0.0/8 (0: let the kernel pick 127.0.0.1)",
    )
    p.add_argument(
        "--read-pace-ms", type=float, default=0.0,
        help="under heavy traffic (64+ sockets ready at once) poll at most this often, so frames batch per "
        "recv; adds at most that much to the latency measured in such runs. Off by default: real clients "
        "(and loadgen.js) read as soon as a socket is readable, and so does this generator unless told",
    )
    a = p.parse_args(argv)
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        p.error("traffic goes to loopback only")
    return Config(
        host=a.host, port=a.port, map=a.map, clients=a.clients, movers=min(a.movers, a.clients),
        rate=a.rate, duration=a.duration, warmup=a.warmup, settle=a.settle, stalled=a.stalled,
        views=a.views, idle_hold=a.idle_hold, concurrency=a.concurrency, server_pid=a.server_pid,
        cpu=a.cpu, seed=a.seed, read_pace=a.read_pace_ms / 1000,
        per_address=a.per_address,
    )


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    if cfg.cpu is not None:
        os.sched_setaffinity(0, {cfg.cpu})
    need = cfg.clients + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(need, soft), hard), hard))
    gen = LoadGen(cfg)
    try:
        result = gen.run()
    finally:
        gen.close()
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
