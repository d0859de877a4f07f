"""
A crowd for the big-map page tests: N people, each a real WebSocket
connection to the server under test, walking about a city and moving once a
second, until a deadline. Run as a process of its own beside the browser:

    python tests/crowd.py --port PORT --map MAP --people 2000 --seconds 120

It prints "ready" once everyone is on the map, then moves them until the
deadline or until its stdin closes (the test ended), and exits.

Each person's own view is a box in the empty South Pacific, so the server
sends the crowd nothing but pings (answered): the server's work and the
bytes measured are those of the page watching. Raw sockets and one
`selectors` loop, because a thread or a reactor per person would not keep
up with 2,000 of them on one core. Names are "Walker 0001" to "Walker N".
"""

from __future__ import annotations

import argparse
import base64
import math
import os
import random
import resource
import selectors
import socket
import struct
import sys
import time

import orjson

MASK = b"\x11\x22\x33\x44"
NOWHERE = [-150.0, -50.0, -149.9, -49.9]  # nobody walks here
CONNECT_TIMEOUT = 10.0
METRES_PER_DEGREE = 111_320


def frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A masked client frame (RFC 6455)."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    masked = bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))
    return head + MASK + masked


class Person:
    __slots__ = ("sock", "name", "lat", "lng", "heading", "seq", "inbox", "outbox", "next_move")

    def __init__(self, sock: socket.socket, name: str, lat: float, lng: float) -> None:
        self.sock = sock
        self.name = name
        self.lat = lat
        self.lng = lng
        self.heading = random.uniform(0, 360)
        self.seq = 0
        self.inbox = b""
        self.outbox = b""
        self.next_move = 0.0

    def send(self, message: dict) -> None:
        self.outbox += frame(orjson.dumps(message))

    def walk(self) -> None:
        """About 1.4 m/s in a direction that wanders."""
        self.heading = (self.heading + random.uniform(-25, 25)) % 360
        step = 1.4 / METRES_PER_DEGREE
        rad = math.radians(self.heading)
        self.lat += step * math.cos(rad)
        self.lng += step * math.sin(rad) / math.cos(math.radians(self.lat))
        self.send({"type": "move", "lat": round(self.lat, 7), "lng": round(self.lng, 7),
                   "heading": round(self.heading, 1), "accuracy": 10, "seq": self.seq})
        self.seq += 1

    def read(self) -> bool:
        """Reads what came; answers pings. False once the server closed."""
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False
        self.inbox += data
        while len(self.inbox) >= 2:
            b0, b1 = self.inbox[0], self.inbox[1]
            n = b1 & 0x7F
            at = 2
            if n == 126:
                if len(self.inbox) < 4:
                    break
                n = struct.unpack("!H", self.inbox[2:4])[0]
                at = 4
            elif n == 127:
                if len(self.inbox) < 10:
                    break
                n = struct.unpack("!Q", self.inbox[2:10])[0]
                at = 10
            if len(self.inbox) < at + n:
                break
            payload = self.inbox[at:at + n]
            self.inbox = self.inbox[at + n:]
            opcode = b0 & 0x0F
            if opcode == 0x9:
                self.outbox += frame(payload, 0xA)
            elif opcode == 0x8:
                return False
        return True

    def flush(self) -> bool:
        """Sends what it can. False once the server closed."""
        if not self.outbox:
            return True
        try:
            sent = self.sock.send(self.outbox)
        except BlockingIOError:
            return True
        except OSError:
            return False
        self.outbox = self.outbox[sent:]
        return True


def open_socket(port: int, path: str) -> tuple[socket.socket, bytes]:
    """A WebSocket after its handshake, and what came after the handshake's answer."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=CONNECT_TIMEOUT)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        answer += chunk
    head, _, rest = answer.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(head.split(b"\r\n")[0].decode(errors="replace"))
    sock.setblocking(False)
    return sock, rest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--map", required=True)
    parser.add_argument("--people", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--lat", type=float, default=52.52)
    parser.add_argument("--lng", type=float, default=13.405)
    parser.add_argument("--spread", type=float, default=6000.0,
                        help="metres: the crowd stands in a square this wide")
    parser.add_argument("--seed", type=int, default=20)
    args = parser.parse_args()
    if not 1 <= args.people <= 20_000 or not 0 < args.seconds <= 900:
        parser.error("--people in [1, 20000], --seconds in (0, 900]")
    random.seed(args.seed)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.people + 100)), hard))
    deadline = time.monotonic() + args.seconds
    selector = selectors.DefaultSelector()
    crowd: list[Person] = []
    half = args.spread / 2 / METRES_PER_DEGREE
    for i in range(args.people):
        box = ",".join(str(x) for x in NOWHERE)
        sock, rest = open_socket(args.port, f"/ws/{args.map}?bbox={box}")
        lat = args.lat + random.uniform(-half, half)
        lng = args.lng + random.uniform(-half, half) / math.cos(math.radians(args.lat))
        person = Person(sock, f"Walker {i + 1:04d}", lat, lng)
        person.inbox = rest
        person.send({"type": "view", "bbox": NOWHERE})
        person.send({"type": "hello", "name": person.name})
        person.walk()
        person.flush()
        selector.register(sock, selectors.EVENT_READ, person)
        crowd.append(person)
        if time.monotonic() > deadline:
            return 1
        # Those already there read what they are sent (the server closes a
        # client that stops reading).
        for key, _ in selector.select(timeout=0):
            key.data.read()
            key.data.flush()  # a pong
    start = time.monotonic()
    for i, person in enumerate(crowd):  # spread over the second, as people are
        person.next_move = start + i / len(crowd)
    selector.register(sys.stdin, selectors.EVENT_READ, None)  # after the crowd: data None
    print("ready", flush=True)
    while time.monotonic() < deadline:
        now = time.monotonic()
        for person in crowd:
            if person.next_move <= now:
                person.walk()
                person.next_move += 1.0
            if not person.flush():
                print(f"{person.name}: closed by the server", file=sys.stderr, flush=True)
                return 1
        for key, _ in selector.select(timeout=0.02):
            if key.data is None:  # stdin
                if not sys.stdin.buffer.read1(4096):  # the test ended
                    return 0
                continue
            if not key.data.read():
                print(f"{key.data.name}: closed by the server", file=sys.stderr, flush=True)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
