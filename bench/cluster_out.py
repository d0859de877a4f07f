"""
Does a node pay only for the maps it serves? (issue 15, "Out")

Starts a private redis-server (or three, `--redis-servers 3`) on free
127.0.0.1 ports and three `twistd -n livemap --redis ...` nodes, A, B and
C, each run from a `git archive` of a commit (the current code, and the code
before per-map channels for contrast). One load generator process (raw
sockets on epoll, real RFC 6455 frames: loadgen.py's client frames) then
puts a fixed load on node A (`--a-maps` maps, each with `--a-clients`
clients of which `--a-movers` move at `--rate` Hz) and gives nodes B and C
N maps each (`--bc-clients` clients, `--bc-movers` movers each): every map is
served by a single node. For N in `--series` (fresh processes each step),
after a warm-up it measures over a fixed window, per node:

- process CPU: the scheduler's run time of the twistd process's threads
  (/proc/PID/task/*/schedstat, exact to the nanosecond; utime+stime come in
  10 ms ticks, too coarse for a node using 2 % of a core), in cores; and
  its voluntary context switches per second (about one per reactor wakeup);
- messages received from Redis: the node's own counter
  (`livemap_backplane_messages_received_total` on /metrics; it counts the
  other nodes' messages on the channels the node listens to, not its own);
- bytes received from Redis on the node's subscribing connection(s), from
  the kernel (`ss -ti`, tcp_info bytes_received; Redis 7.0 keeps no
  per-client byte counters), i.e. what Redis actually pushed to it,
  including the echo of the node's own messages on channels it listens to;
- the channels it listens to (`sub=` of Redis's CLIENT LIST) and
  `livemap_backplane_maps_watched`;
and per Redis server: PUBLISH calls, bytes sent, CPU, and its map channels
(PUBSUB CHANNELS). The generator counts the frames and pin states each
node's clients read, and every client must have been welcomed and kept.

    python bench/cluster_out.py --json out.json           # new (HEAD) and old (76965e4), N = 0 10 50 200
    python bench/cluster_out.py --series 0 50 --window 5 --code new
    python bench/cluster_out.py --redis-servers 3 --code new   # the maps' channels spread over three servers
    python bench/cluster_out.py --render out.json         # the tables again

Placement (2 cores): node A on core 0 and the generator on core 1, B, C and
Redis unpinned (free to use either core; together about half a core at
N = 200), all at nice -10 so that other work on the shared machine takes
less from them; `--no-pin` pins nothing. CPU is process time, exact whatever
the placement; before each step it waits (up to `--quiet-wait`) for the
machine to go quiet, and each step reports the CPU other work used during
it. The generator only sends moves and reads what comes; latency is
bench/run.py's business.

Everything it starts it stops, by pid, on errors, Ctrl-C and SIGTERM too;
each step is bounded (start: 30 s, connecting: 60 s; the whole run:
`--max-seconds`). Prints a Markdown table per code (and per server with
several) and, with `--json`, keeps the raw figures.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import platform
import select
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
from typing import Any, Optional

import orjson

from loadgen import (WS_ACCEPT, WS_KEY, core_busy, core_ticks, masked_frame, proc_cpu_seconds,
                     proc_rss_kb, wait_quiet)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
NEW_COMMIT = "HEAD"
OLD_COMMIT = "76965e4"  # the last commit before per-map channels (4aa5f71)
A_CORE, GEN_CORE = 0, 1
NICE = -10
CONNECT_CONCURRENCY = 200
RECV_SIZE = 65536


def run_seconds(pid: int) -> float:
    """CPU time of a process in seconds: the scheduler's exact run time of
    each of its threads (/proc/PID/task/*/schedstat, ns), where utime+stime
    come in 10 ms ticks (too coarse for a node using 1 % of a core).
    Falls back to utime+stime when schedstat is missing."""
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/schedstat", "rb") as f:
                    total += int(f.read().split()[0])
            except (FileNotFoundError, ProcessLookupError):
                pass  # a thread that just ended
    except FileNotFoundError:
        return proc_cpu_seconds(pid)
    return total / 1e9 if total else proc_cpu_seconds(pid)


def context_switches(pid: int) -> int:
    """Voluntary context switches of the main thread: about one per reactor wakeup."""
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"voluntary_ctxt_switches:"):
                return int(line.split()[1])
    return 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- processes ------------------------------------------------------------------


class Processes:
    """Every process this tool starts, stopped by its own pid."""

    def __init__(self) -> None:
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, cmd: list[str], log: Path, *, core: Optional[int] = None,
              env: Optional[dict[str, str]] = None, cwd: Optional[Path] = None) -> subprocess.Popen[bytes]:
        def setup() -> None:
            if core is not None:
                os.sched_setaffinity(0, {core})
            try:
                os.setpriority(os.PRIO_PROCESS, 0, NICE)
            except PermissionError:
                pass
            import resource
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    preexec_fn=setup, env=env, cwd=cwd)
        self.running.append(proc)
        return proc

    def stop_all(self) -> None:
        procs, self.running = self.running, []
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def redis_command(port: int, *args: str | bytes, timeout: float = 5.0) -> Any:
    """One command on a fresh connection, RESP2 (enough for INFO, CLIENT LIST, PUBSUB)."""
    parts = [a.encode() if isinstance(a, str) else a for a in args]
    request = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        reader = sock.makefile("rb")
        return _resp(reader)


def _resp(reader: Any) -> Any:
    line = reader.readline()
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else reader.read(n + 2)[:-2].decode()
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_resp(reader) for _ in range(n)]
    raise RuntimeError(f"unexpected reply {line!r}")


def start_redis(procs: Processes, tmp: Path) -> int:
    port = free_port()
    assert port != 6379, "never the machine's own Redis"
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        sys.exit("redis-server is not installed")
    proc = procs.start([redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                        "--appendonly", "no", "--dir", str(tmp), "--protected-mode", "no"],
                       tmp / f"redis-{port}.log", cwd=tmp)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited; see {tmp}/redis-{port}.log")
        try:
            if redis_command(port, "PING", timeout=0.5) == "PONG":
                return port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not answer")


def livemap_tree(commit: str, tmp: Path) -> tuple[Path, str]:
    """A `git archive` of the commit (as bench/run.py --livemap-commit does)."""
    short = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", f"{commit}^{{commit}}"],
                           capture_output=True, text=True, check=True).stdout.strip()
    tree = tmp / f"livemap-{short}"
    if not tree.exists():
        tree.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", short], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree, short


@dataclass
class Node:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path


def start_node(procs: Processes, name: str, tree: Path, redis_urls: str, tmp: Path,
               core: Optional[int], tick: float) -> Node:
    sibling = Path(sys.executable).with_name("twistd")
    twistd = str(sibling) if sibling.exists() else shutil.which("twistd") or "twistd"
    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(tree), env.get("PYTHONPATH")) if x)
    log = tmp / f"node-{name}-{port}.log"
    proc = procs.start([twistd, "-n", "--pidfile=", "livemap",
                        "--port", f"tcp:{port}:interface=127.0.0.1:backlog=4096",
                        "--pirate", "none", "--tick", str(tick), "--redis", redis_urls],
                       log, core=core, env=env, cwd=tree)
    return Node(name, port, proc, log)


def wait_ready(node: Node, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.proc.poll() is not None:
            raise RuntimeError(f"node {node.name} exited at start:\n{node.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{node.port}/healthz", timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"node {node.name} not healthy within {timeout} s:\n{node.log.read_text()[-3000:]}")


def metrics(node: Node) -> dict[str, float]:
    """The backplane's figures from /metrics (the old code has no maps_watched)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{node.port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("livemap_backplane_"):
            name, _, value = line.rpartition(" ")
            out[name.split("{")[0]] = float(value)
    return out


def redis_sockets(redis_ports: list[int]) -> dict[tuple[str, int], dict[str, Any]]:
    """Every established TCP connection to the Redis ports, seen from the
    client's side: (client address, client port) -> pid and bytes received."""
    filt = " or ".join(f"dport = :{p}" for p in redis_ports)
    out = subprocess.run(["ss", "-tinpH", "state", "established", f"( {filt} )"],
                         capture_output=True, text=True, timeout=10).stdout
    socks: dict[tuple[str, int], dict[str, Any]] = {}
    current: Optional[dict[str, Any]] = None
    for line in out.splitlines():
        if line and not line[0].isspace():
            fields = line.split()
            # Recv-Q Send-Q Local Peer [users:(...)]  (state filtered, so no State column)
            local, peer = fields[2], fields[3]
            host, _, port = local.rpartition(":")
            pid = None
            if "pid=" in line:
                pid = int(line.split("pid=", 1)[1].split(",", 1)[0])
            current = {"pid": pid, "peer_port": int(peer.rpartition(":")[2]), "bytes_received": 0}
            socks[(host, int(port))] = current
        elif current is not None:
            for token in line.split():
                if token.startswith("bytes_received:"):
                    current["bytes_received"] = int(token.split(":", 1)[1])
                elif token.startswith("segs_in:"):
                    current["segs_in"] = int(token.split(":", 1)[1])
    return socks


def node_sockets(ports: list[int]) -> dict[int, dict[str, int]]:
    """Per node port, the TCP segments its clients' connections received
    (their moves and ACKs) and sent, summed over the connections (`ss -ti`)."""
    filt = " or ".join(f"sport = :{p}" for p in ports)
    out = subprocess.run(["ss", "-tiH", "state", "established", f"( {filt} )"],
                         capture_output=True, text=True, timeout=10).stdout
    sums = {p: {"segs_in": 0, "segs_out": 0, "connections": 0} for p in ports}
    current: Optional[dict[str, int]] = None
    for line in out.splitlines():
        if line and not line[0].isspace():
            port = int(line.split()[2].rpartition(":")[2])
            current = sums.get(port)
            if current is not None:
                current["connections"] += 1
        elif current is not None:
            for token in line.split():
                key, _, value = token.partition(":")
                if key in ("segs_in", "segs_out"):
                    current[key] += int(value)
    return sums


def client_list(port: int) -> list[dict[str, str]]:
    rows = []
    for line in redis_command(port, "CLIENT", "LIST").splitlines():
        rows.append(dict(kv.split("=", 1) for kv in line.split() if "=" in kv))
    return rows


def redis_info(port: int) -> dict[str, Any]:
    info = redis_command(port, "INFO", "all")
    out: dict[str, Any] = {}
    for line in info.splitlines():
        if ":" in line and not line.startswith("#"):
            key, _, value = line.partition(":")
            out[key] = value
    publish = 0
    if "cmdstat_publish" in out:
        publish = int(out["cmdstat_publish"].split("calls=", 1)[1].split(",", 1)[0])
    return {"publish_calls": publish, "net_output_bytes": int(out.get("total_net_output_bytes", 0)),
            "net_input_bytes": int(out.get("total_net_input_bytes", 0)),
            "pubsub_channels": int(out.get("pubsub_channels", 0))}


# -- the load generator -----------------------------------------------------------

CONNECTING, HANDSHAKE, OPEN, CLOSED = range(4)


class Conn:
    __slots__ = ("node", "map", "mover", "sock", "fd", "state", "buf", "out", "request",
                 "lat", "lng")

    def __init__(self, node: int, map_name: str, mover: bool, request: bytes, k: int) -> None:
        self.node = node
        self.map = map_name
        self.mover = mover
        self.sock: Optional[socket.socket] = None
        self.fd = -1
        self.state = CONNECTING
        self.buf = b""
        self.out = b""
        self.request = request
        self.lat = 10.0 + (k % 97) * 0.01
        self.lng = 20.0 + (k % 89) * 0.01


class Generator:
    """Many WebSocket clients of several nodes and maps on one epoll; movers
    send a move each 1/rate seconds, spread evenly in time; every frame read
    is parsed (orjson) and counted per node."""

    def __init__(self, ports: list[int], rate: float) -> None:
        self.ports = ports
        self.rate = rate
        self.ep = select.epoll()
        self.conns: list[Conn] = []
        self.by_fd: dict[int, Conn] = {}
        self.movers: list[Conn] = []
        self._phase: dict[int, tuple[float, int]] = {}
        self.to_connect: list[Conn] = []
        self.in_flight = 0
        self.open = 0
        self.failed: list[str] = []
        self.closed_by_server = 0
        self.seq = 0
        self.moves_sent = 0
        self.move_index = 0  # moves due so far (one per mover in turn)
        n = len(ports)
        self.frames = [0] * n
        self.pins = [0] * n
        self.kinds: dict[str, int] = {}

    def add(self, node: int, map_name: str, clients: int, movers: int) -> None:
        port = self.ports[node]
        request = (f"GET /ws/{map_name} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                   "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Key: {WS_KEY.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
        for i in range(clients):
            c = Conn(node, map_name, i < movers, request, len(self.conns))
            self.conns.append(c)
            self.to_connect.append(c)
            if c.mover:
                # Movers take turns in this order: a map's movers spread over
                # the second (phase i / movers), not all in one tick.
                self.movers.append(c)
                self._phase[id(c)] = (i / movers, len(self._phase))
        self.movers.sort(key=lambda c: self._phase[id(c)])

    def _connect(self, c: Conn) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = s.connect_ex(("127.0.0.1", self.ports[c.node]))
        if err not in (0, errno.EINPROGRESS):
            s.close()
            self._fail(c, f"connect: {os.strerror(err)}")
            return
        c.sock, c.fd = s, s.fileno()
        self.by_fd[c.fd] = c
        self.ep.register(c.fd, select.EPOLLOUT)
        self.in_flight += 1

    def _fail(self, c: Conn, why: str) -> None:
        if c.state in (CONNECTING, HANDSHAKE):
            self.in_flight -= 1
        elif c.state == OPEN:
            self.open -= 1
        if len(self.failed) < 10:
            self.failed.append(f"{c.map}: {why}")
        if c.sock is not None:
            try:
                self.ep.unregister(c.fd)
            except (OSError, ValueError):
                pass
            self.by_fd.pop(c.fd, None)
            c.sock.close()
            c.sock = None
        c.state = CLOSED

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
            self._fail(c, f"send: {e}")
            return
        if n < len(data):
            c.out = data[n:]
            self.ep.modify(c.fd, select.EPOLLIN | select.EPOLLOUT)

    def _event(self, c: Conn, ev: int) -> None:
        if c.state == CONNECTING:
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # type: ignore[union-attr]
            if err:
                self._fail(c, f"connect: {os.strerror(err)}")
                return
            c.state = HANDSHAKE
            self.ep.modify(c.fd, select.EPOLLIN)
            self._send(c, c.request)
            return
        if ev & select.EPOLLOUT and c.out:
            try:
                n = c.sock.send(c.out)  # type: ignore[union-attr]
            except BlockingIOError:
                n = 0
            except OSError as e:
                self._fail(c, f"send: {e}")
                return
            c.out = c.out[n:]
            if not c.out:
                self.ep.modify(c.fd, select.EPOLLIN)
        if not ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
            return
        try:
            data = c.sock.recv(RECV_SIZE)  # type: ignore[union-attr]
        except BlockingIOError:
            return
        except OSError as e:
            self._fail(c, f"recv: {e}")
            return
        if not data:
            if c.state == OPEN:
                self.closed_by_server += 1
            self._fail(c, "eof")
            return
        data = c.buf + data if c.buf else data
        c.buf = b""
        if c.state == HANDSHAKE:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                c.buf = data
                return
            head = data[:end]
            if not head.startswith(b"HTTP/1.1 101") or WS_ACCEPT not in head:
                self._fail(c, "handshake: " + head.split(b"\r\n", 1)[0].decode(errors="replace"))
                return
            c.state = OPEN
            self.in_flight -= 1
            self.open += 1
            data = data[end + 4:]
        self._frames(c, data)

    def _frames(self, c: Conn, data: bytes) -> None:
        i, n = 0, len(data)
        while n - i >= 2:
            b0, ln = data[i], data[i + 1] & 0x7F
            start = i + 2
            if ln == 126:
                if n - i < 4:
                    break
                ln, start = int.from_bytes(data[i + 2:i + 4], "big"), i + 4
            elif ln == 127:
                if n - i < 10:
                    break
                ln, start = int.from_bytes(data[i + 2:i + 10], "big"), i + 10
            end = start + ln
            if end > n:
                break
            i = end
            op = b0 & 0x0F
            if op == 0x1:  # livemap sends whole text frames
                msg = orjson.loads(data[start:end])
                kind = msg.get("type", "?")
                self.kinds[kind] = self.kinds.get(kind, 0) + 1
                self.frames[c.node] += 1
                self.pins[c.node] += len(msg.get("pins") or ())
            elif op == 0x9:
                self._send(c, masked_frame(data[start:end], 0xA))
            elif op == 0x8:
                self.closed_by_server += 1
                self._fail(c, "server closed: " + data[start:end].hex())
                return
        if i < n:
            c.buf = data[i:]

    def _move(self, c: Conn) -> None:
        self.seq += 1
        c.lat = min(max(c.lat + ((self.seq * 7919) % 41 - 20) * 1e-5, -80.0), 80.0)
        c.lng = min(max(c.lng + ((self.seq * 104729) % 41 - 20) * 1e-5, -170.0), 170.0)
        self._send(c, masked_frame(orjson.dumps({"type": "move", "lat": round(c.lat, 6),
                                                 "lng": round(c.lng, 6), "seq": self.seq})))
        self.moves_sent += 1

    def connect_all(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = list(reversed(self.to_connect))
        self.to_connect = []
        while pending or self.in_flight:
            while pending and self.in_flight < CONNECT_CONCURRENCY:
                self._connect(pending.pop())
            self.pump(time.monotonic() + 0.05)
            if time.monotonic() > deadline:
                raise RuntimeError(f"connecting took over {timeout} s: {self.open} open, "
                                   f"{self.in_flight} in flight, failures {self.failed}")
        if self.failed:
            raise RuntimeError(f"connections failed: {self.failed}")

    def pump(self, until: float, t_move0: Optional[float] = None) -> None:
        """Serve the sockets until `until`; with t_move0, send the moves due."""
        interval = 1.0 / (len(self.movers) * self.rate) if t_move0 is not None and self.movers else 0.0
        while True:
            now = time.monotonic()
            if now >= until:
                return
            timeout = min(until - now, 0.05)
            if interval:
                assert t_move0 is not None
                due = int((now - t_move0) / interval) + 1
                while self.move_index < due:
                    c = self.movers[self.move_index % len(self.movers)]
                    self.move_index += 1
                    if c.state == OPEN:
                        self._move(c)
                timeout = min(timeout, max(0.0, t_move0 + self.move_index * interval - time.monotonic()))
            for fd, ev in self.ep.poll(timeout, 4096):
                ready = self.by_fd.get(fd)
                if ready is not None:
                    self._event(ready, ev)

    def close(self) -> None:
        for c in self.conns:
            if c.sock is not None:
                c.sock.close()
                c.sock = None
        self.ep.close()


# -- one step ------------------------------------------------------------------------


@dataclass
class Step:
    code: str
    commit: str
    servers: int
    n: int
    nodes: dict[str, Any] = field(default_factory=dict)
    redis: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def snapshot(nodes: list[Node], redis_ports: list[int], redis_pids: list[int], gen: Generator) -> dict[str, Any]:
    """Everything counted, CPU first (so the scrapes below fall in the next window, not this one)."""
    t = time.monotonic()
    cpu = {n.name: run_seconds(n.proc.pid) for n in nodes}
    switches = {n.name: context_switches(n.proc.pid) for n in nodes}
    redis_cpu = [run_seconds(pid) for pid in redis_pids]
    gen_cpu = run_seconds(os.getpid())
    ticks = core_ticks()
    frames, pins, moves = list(gen.frames), list(gen.pins), gen.moves_sent
    socks = redis_sockets(redis_ports)
    client_socks = node_sockets([n.port for n in nodes])
    clients = [client_list(p) for p in redis_ports]
    infos = [redis_info(p) for p in redis_ports]
    mets = {n.name: metrics(n) for n in nodes}
    per_node: dict[str, dict[str, Any]] = {}
    for node in nodes:
        sub_bytes, channels, all_bytes = 0, 0, 0
        for server, rows in enumerate(clients):
            for row in rows:
                host, _, port = row.get("addr", "").rpartition(":")
                sock = socks.get((host, int(port or 0)))
                if sock is None or sock["pid"] != node.proc.pid:
                    continue
                all_bytes += sock["bytes_received"]
                if int(row.get("sub", "0")) or int(row.get("psub", "0")) or "P" in row.get("flags", ""):
                    sub_bytes += sock["bytes_received"]
                    channels += int(row.get("sub", "0")) + int(row.get("psub", "0"))
        per_node[node.name] = {
            "cpu_s": cpu[node.name], "rss_kb": proc_rss_kb(node.proc.pid), "switches": switches[node.name],
            "received": mets[node.name].get("livemap_backplane_messages_received_total", 0.0),
            "published": mets[node.name].get("livemap_backplane_messages_published_total", 0.0),
            "maps_watched": mets[node.name].get("livemap_backplane_maps_watched"),
            "nodes": mets[node.name].get("livemap_backplane_nodes"),
            "expired": mets[node.name].get("livemap_backplane_nodes_expired_total", 0.0),
            "sub_bytes": sub_bytes, "redis_bytes": all_bytes, "channels": channels,
            "client_segs_in": client_socks[node.port]["segs_in"],
            "client_segs_out": client_socks[node.port]["segs_out"],
        }
    return {"t": t, "nodes": per_node, "redis_cpu": redis_cpu, "redis": infos, "gen_cpu": gen_cpu,
            "ticks": ticks, "frames": frames, "pins": pins, "moves": moves}


def map_channels(port: int) -> int:
    return len(redis_command(port, "PUBSUB", "CHANNELS", "livemap:*:map:*") or [])


def run_step(code: str, tree: Path, commit: str, n: int, args: argparse.Namespace, tmp: Path) -> Step:
    procs = Processes()
    gen: Optional[Generator] = None
    step = Step(code, commit, args.redis_servers, n)
    try:
        redis_ports = [start_redis(procs, tmp) for _ in range(args.redis_servers)]
        redis_pids = [p.pid for p in procs.running]
        urls = ",".join(f"redis://127.0.0.1:{p}/0" for p in redis_ports)
        nodes = [start_node(procs, name, tree, urls, tmp, A_CORE if name == "A" and not args.no_pin else None,
                            args.tick)
                 for name in ("A", "B", "C")]
        for node in nodes:
            wait_ready(node)
        gen = Generator([node.port for node in nodes], args.rate)
        for i in range(args.a_maps):
            gen.add(0, f"out-a-{i}", args.a_clients, args.a_movers)
        for j in range(n):  # B's and C's maps interleaved, so both fill up alike
            gen.add(1, f"out-b-{j}", args.bc_clients, args.bc_movers)
            gen.add(2, f"out-c-{j}", args.bc_clients, args.bc_movers)
        t0 = time.monotonic()
        gen.connect_all(60.0)
        step.extra["connect_s"] = round(time.monotonic() - t0, 2)
        step.extra["connections"] = gen.open
        t_move0 = time.monotonic()
        gen.pump(t_move0 + args.warmup, t_move0)
        s0 = snapshot(nodes, redis_ports, redis_pids, gen)
        gen.pump(s0["t"] + args.window, t_move0)
        s1 = snapshot(nodes, redis_ports, redis_pids, gen)
        window = s1["t"] - s0["t"]
        for node in nodes:
            a, b = s0["nodes"][node.name], s1["nodes"][node.name]
            if node.proc.poll() is not None:
                raise RuntimeError(f"node {node.name} died:\n{node.log.read_text()[-3000:]}")
            step.nodes[node.name] = {
                "cpu": round((b["cpu_s"] - a["cpu_s"]) / window, 4),
                "received_per_s": round((b["received"] - a["received"]) / window, 1),
                "published_per_s": round((b["published"] - a["published"]) / window, 1),
                "sub_kb_per_s": round((b["sub_bytes"] - a["sub_bytes"]) / window / 1024, 2),
                "redis_kb_per_s": round((b["redis_bytes"] - a["redis_bytes"]) / window / 1024, 2),
                "channels": b["channels"], "maps_watched": b["maps_watched"], "nodes_seen": b["nodes"],
                "nodes_expired": b["expired"],
                "wakeups_per_s": round((b["switches"] - a["switches"]) / window, 1),
                "client_segs_in_per_s": round((b["client_segs_in"] - a["client_segs_in"]) / window, 1),
                "client_segs_out_per_s": round((b["client_segs_out"] - a["client_segs_out"]) / window, 1),
                "rss_mb": round(b["rss_kb"] / 1024, 1),
            }
        for k, port in enumerate(redis_ports):
            a, b = s0["redis"][k], s1["redis"][k]
            step.redis.append({
                "port": port,
                "publish_per_s": round((b["publish_calls"] - a["publish_calls"]) / window, 1),
                "out_kb_per_s": round((b["net_output_bytes"] - a["net_output_bytes"]) / window / 1024, 1),
                "cpu": round((s1["redis_cpu"][k] - s0["redis_cpu"][k]) / window, 4),
                "channels": b["pubsub_channels"], "map_channels": map_channels(port),
            })
        busy = core_busy(s0["ticks"], s1["ticks"])
        ours = (sum(v["cpu"] for v in step.nodes.values()) + sum(r["cpu"] for r in step.redis)
                + (s1["gen_cpu"] - s0["gen_cpu"]) / window)
        cores = sum(v for k, v in busy.items() if k[4:].isdigit())
        step.extra.update(
            window_s=round(window, 2),
            moves_per_s=round((s1["moves"] - s0["moves"]) / window, 1),
            frames_per_s=[round((y - x) / window, 1) for x, y in zip(s0["frames"], s1["frames"])],
            pins_per_s=[round((y - x) / window, 1) for x, y in zip(s0["pins"], s1["pins"])],
            gen_cpu=round((s1["gen_cpu"] - s0["gen_cpu"]) / window, 3),
            cores_busy=round(cores, 3), others=round(max(0.0, cores - ours), 3),
            closed_by_server=gen.closed_by_server, kinds=dict(gen.kinds),
        )
        if gen.kinds.get("welcome", 0) != len(gen.conns) or gen.closed_by_server or gen.kinds.get("error"):
            raise RuntimeError(f"not every client was welcomed and kept: {gen.kinds}, "
                               f"{gen.closed_by_server} closed by a node, {gen.failed}")
        return step
    finally:
        if gen is not None:
            gen.close()
        procs.stop_all()


# -- the report ------------------------------------------------------------------------


def row(s: Step) -> dict[str, Any]:
    """A step as it is kept in the JSON (and rendered from)."""
    return {"code": s.code, "commit": s.commit, "redis_servers": s.servers, "n_per_node": s.n,
            "maps_not_on_a": 2 * s.n, "nodes": s.nodes, "redis": s.redis, **s.extra}


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| maps on B + C (not on A) | moves/s (cluster) | A: messages received/s | A: KB/s from Redis | A: channels"
        " | A: CPU (cores) | A: wakeups/s | B: messages received/s | B: CPU | C: CPU | Redis: PUBLISH/s | Redis: KB/s out"
        " | Redis CPU | generator CPU | other work (cores) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in rows:
        a, b, c = s["nodes"]["A"], s["nodes"]["B"], s["nodes"]["C"]
        redis = s["redis"]
        lines.append(
            f"| {s['maps_not_on_a']} | {s['moves_per_s']:,.0f} | {a['received_per_s']:,.1f} | {a['sub_kb_per_s']:,.1f}"
            f" | {a['channels']} | {a['cpu']:.3f} | {a['wakeups_per_s']:,.0f} | {b['received_per_s']:,.1f}"
            f" | {b['cpu']:.3f} | {c['cpu']:.3f} | {sum(r['publish_per_s'] for r in redis):,.0f}"
            f" | {sum(r['out_kb_per_s'] for r in redis):,.0f} | {sum(r['cpu'] for r in redis):.3f}"
            f" | {s['gen_cpu']:.2f} | {s['others']:.2f} |"
        )
    return lines


def spread_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| maps on B + C | server | map channels | PUBLISH/s | KB/s out | CPU (cores) |",
             "| ---: | --- | ---: | ---: | ---: | ---: |"]
    for s in rows:
        for k, r in enumerate(s["redis"]):
            lines.append(f"| {s['maps_not_on_a']} | {k + 1} of {len(s['redis'])} | {r['map_channels']}"
                         f" | {r['publish_per_s']:,.0f} | {r['out_kb_per_s']:,.0f} | {r['cpu']:.3f} |")
    return lines


def render(saved: dict[str, Any]) -> str:
    out = [f"Load: {saved['load']}", ""]
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for s in saved["steps"]:
        groups.setdefault((s["code"], s["commit"], s["redis_servers"]), []).append(s)
    for (code, commit, servers), rows in groups.items():
        out += [f"### {code} code ({commit}), {servers} Redis server{'s' if servers > 1 else ''}", "",
                *table(rows), ""]
        if servers > 1:
            out += [*spread_table(rows), ""]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--series", type=int, nargs="+", default=[0, 10, 50, 200],
                   help="maps on each of B and C, one step each (default 0 10 50 200)")
    p.add_argument("--code", action="append", choices=("new", "old"),
                   help="new: --new-commit; old: --old-commit (repeatable; default both)")
    p.add_argument("--new-commit", default=NEW_COMMIT)
    p.add_argument("--old-commit", default=OLD_COMMIT)
    p.add_argument("--redis-servers", type=int, default=1, help="Redis servers (several: new code only)")
    p.add_argument("--a-maps", type=int, default=5)
    p.add_argument("--a-clients", type=int, default=20)
    p.add_argument("--a-movers", type=int, default=5)
    p.add_argument("--bc-clients", type=int, default=4, help="clients per map of B and C")
    p.add_argument("--bc-movers", type=int, default=4, help="movers per map of B and C")
    p.add_argument("--rate", type=float, default=1.0, help="moves per second per mover")
    p.add_argument("--tick", type=float, default=0.1)
    p.add_argument("--warmup", type=float, default=4.0)
    p.add_argument("--window", type=float, default=10.0)
    p.add_argument("--quiet-wait", type=float, default=20.0, help="seconds to wait for a quiet machine before a step")
    p.add_argument("--no-pin", action="store_true", help="pin neither node A nor the generator")
    p.add_argument("--max-seconds", type=float, default=1200.0, help="give up (cleanly) after this long")
    p.add_argument("--json", type=Path, help="write the raw figures here")
    p.add_argument("--render", type=Path, metavar="JSON", help="only print the tables of an earlier --json")
    args = p.parse_args()
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return
    codes = args.code or ["new", "old"]
    if args.redis_servers > 1 and "old" in codes:
        p.error("the old code takes one Redis server: use --code new with --redis-servers")
    signal.signal(signal.SIGTERM, lambda signum, frame: (_ for _ in ()).throw(KeyboardInterrupt()))
    signal.signal(signal.SIGALRM, lambda signum, frame: (_ for _ in ()).throw(TimeoutError("--max-seconds")))
    signal.alarm(int(args.max_seconds))
    if not args.no_pin:
        os.sched_setaffinity(0, {GEN_CORE})
    try:
        os.setpriority(os.PRIO_PROCESS, 0, NICE)
    except PermissionError:
        pass
    tmp = Path(tempfile.mkdtemp(prefix="livemap-out-"))
    results: dict[str, list[Step]] = {}
    started = time.monotonic()
    ok = False
    try:
        for code in codes:
            tree, commit = livemap_tree(args.new_commit if code == "new" else args.old_commit, tmp)
            for n in args.series:
                background = wait_quiet(args.quiet_wait)
                sys.stderr.write(f"{code} ({commit}), {args.redis_servers} Redis, B and C {n} maps each ... ")
                sys.stderr.flush()
                step = run_step(code, tree, commit, n, args, tmp)
                step.extra["background_before"] = background
                results.setdefault(code, []).append(step)
                a = step.nodes["A"]
                sys.stderr.write(f"A: {a['received_per_s']} msg/s, {a['cpu']} cores; moves {step.extra['moves_per_s']}/s;"
                                 f" others {step.extra['others']}\n")
        ok = True
    finally:
        signal.alarm(0)
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:  # keep the logs, not the archived trees
            for tree in tmp.glob("livemap-*"):
                shutil.rmtree(tree, ignore_errors=True)
            sys.stderr.write(f"\nlogs kept in {tmp}\n")
    load = (f"A: {args.a_maps} maps × {args.a_clients} clients ({args.a_movers} moving); B and C: N maps each ×"
            f" {args.bc_clients} clients ({args.bc_movers} moving); every mover at {args.rate:g} Hz; tick {args.tick:g} s;"
            f" {args.redis_servers} Redis server(s); window {args.window:g} s after {args.warmup:g} s of moving")
    saved = {
        "argv": sys.argv[1:], "load": load, "elapsed_s": round(time.monotonic() - started, 1),
        "machine": {"nproc": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
        "steps": [row(s) for steps in results.values() for s in steps],
    }
    print(render(saved))
    if args.json:
        args.json.write_text(json.dumps(saved, indent=1) + "\n")


if __name__ == "__main__":
    main()
