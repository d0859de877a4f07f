"""
The backplane: one map across processes and machines.

Every node (a livemap process) holds every pin of every map: its own, and
the other nodes' as remote pins (`Hub.apply_remote`). Nodes talk through a
`Link`, a small message bus with two implementations: `MemoryLink` (one
process, for tests) and `RedisLink` (Redis pub/sub on txredisapi).

What travels (JSON objects, one per bus message; `n` is the sender's node id):

- `delta`: `{"t": "delta", "n", "m": MAP, "p": [[VERSION, PIN], ...], "g": [ID, ...]}`,
  one per map tick with this node's changed pins and departures
  (`Hub.publisher`), so the bus sees at most one message per map tick.
- `full`: `{"t": "full", "n", "k": CHUNK, "end": BOOL, "maps": {MAP: [[VERSION, PIN], ...]}}`,
  every pin of the sender, in chunks; the chunks up to `end` *replace*
  everything a receiver holds of that sender (pins it no longer has go).
- `hello`: `{"t": "hello", "n"}`: "I have just (re)joined; send me your
  state". Broadcast on every (re)connection, or sent to one node whose state
  a receiver found itself missing; answered by a `full` sent to the asker.
- `beat`: `{"t": "beat", "n"}`: "I am alive", when the node published
  nothing else for a while.
- `bye`: `{"t": "bye", "n"}`: the node is stopping; its pins go at once.
- `map`: `{"t": "map", "n", "m": NAME, "x": EXPIRES_MS or null}`: the sender
  created a private map (already in the link's store of maps); the others
  know it at once, and keep serving it while Redis is away.

A receiver drops every pin of a node it has heard nothing from for
`node_ttl` seconds, so a node that dies (or is cut off) leaves no ghost pins.
Per-pin order holds because one node publishes on one connection and a pin
has one owner; `version` lets a stale state never win. When a link comes
back, the node broadcasts its `full` state and a `hello`, so every node
converges without any client reconnecting.

Private maps are not messages but a store: the link keeps each map's
expiry (`add_map`, `find_map`), which outlives any node; the backplane is
the `MapStore` of the node's `MapDirectory`. After a reconnection every node
writes back the maps it knows (`restore_maps`), so a Redis that restarted
empty gets them again.
"""

from __future__ import annotations

import math
import os
import random
import secrets
import socket
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional, Protocol
from urllib.parse import unquote, urlsplit

import orjson
import txredisapi
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.application import service
from twisted.application.internet import ClientService
from twisted.internet import defer, endpoints, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .device_store import MemoryDeviceKeys, RedisDeviceKeys, fix_value
from .hub import DEVICES, Hub, Pin
from .maps import MapDirectory

if TYPE_CHECKING:
    from .devices import Devices

# Bumped when the messages change shape: nodes of different versions never
# share a channel.
PROTOCOL_VERSION = 1
# Pins per `full` message: keeps each bus message (and each parse on the
# receiving reactor) small.
FULL_CHUNK = 1000
DEFAULT_NODE_TTL = 6.0
DEFAULT_CLUSTER = "livemap"
# Private maps written back per command after a reconnection.
RESTORE_CHUNK = 1000


def score(expires_ms: float) -> str:
    """A map's expiry as Redis writes a sorted-set score ("inf": never)."""
    return "inf" if math.isinf(expires_ms) else str(int(expires_ms))


def new_node_id() -> str:
    """Readable in logs and Redis keys, unique even when a pid is reused."""
    host = socket.gethostname().split(".")[0] or "node"
    host = "".join(c if c.isalnum() or c == "-" else "-" for c in host)[:32]
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


# The link: what a backplane needs from a message bus


class LinkReceiver(Protocol):
    """What a link calls back (the backplane)."""

    def link_up(self) -> None: ...

    def link_down(self, reason: str) -> None: ...

    def message_received(self, message: bytes) -> None: ...


class Link(Protocol):
    """
    A bus between the nodes of one cluster. Messages from one sender arrive
    in the order sent; a message published while not `linked` is dropped
    (the backplane resynchronises when the link comes back).
    """

    node: str
    linked: bool

    def start(self, receiver: LinkReceiver) -> None:
        """Connect, and keep reconnecting until `stop`."""

    def stop(self) -> defer.Deferred:
        """Disconnect for good (after writing what was published)."""

    def publish(self, message: bytes, to: Optional[str] = None) -> bool:
        """Send to every node (`to` None, the sender included) or one node."""

    def announce(self, ttl: float) -> None:
        """Say this node is present for the next `ttl` seconds."""

    def withdraw(self) -> None:
        """Say this node is gone."""

    def present(self) -> defer.Deferred:
        """The ids of the nodes present now (a Deferred of a set)."""

    def describe(self) -> str:
        """Where the link goes, for logs (no secrets)."""

    def add_map(self, name: str, expires_ms: float, *, cap: int,
                forget_before_ms: float) -> defer.Deferred:
        """
        Atomically: forget the maps that expired before `forget_before_ms`,
        then add map `name` expiring at `expires_ms` (epoch milliseconds,
        `math.inf`: never) unless `cap` maps are left. Fires "added", "full"
        or "taken" (a map of that name exists); fails while not linked.
        """

    def find_map(self, name: str) -> defer.Deferred:
        """Fires with the map's expiry (epoch ms, `math.inf`: never) or None."""

    def restore_maps(self, maps: list[tuple[str, float]]) -> defer.Deferred:
        """Add these (name, expires_ms) unless present (after Redis lost them)."""

    def device_keys(self) -> Any:
        """The store of devices on this link (device_store.py)."""


# In memory: one process, for tests


class MemoryBus:
    """
    A Redis stand-in for one process: broadcast and per-node delivery in
    order, presence with expiry, the private maps, and an off switch
    (`stop`/`start`) that behaves like a Redis restart without persistence.
    """

    def __init__(self, clock: IReactorTime, *, retry: float = 0.05) -> None:
        self.clock = clock
        self.retry = retry
        self.up = True
        self.links: dict[str, MemoryLink] = {}
        self.expires: dict[str, float] = {}
        # Private maps: name -> expiry (epoch ms, inf: never), as the sorted set.
        self.maps: dict[str, float] = {}
        # Devices (device_store.MemoryDeviceKeys): token hash -> (record,
        # forget at ms), token hash -> (version, latest fix), the epoch.
        self.devices: dict[str, tuple[bytes, float]] = {}
        self.device_fixes: dict[str, tuple[int, bytes]] = {}
        self.device_epoch: Optional[str] = None
        self.published = 0

    def stop(self) -> None:
        self.up = False
        self.expires.clear()
        self.maps.clear()
        self.devices.clear()
        self.device_fixes.clear()
        self.device_epoch = None
        for link in list(self.links.values()):
            link._lost("bus stopped")

    def start(self) -> None:
        self.up = True
        for link in list(self.links.values()):
            link._reconnect_later()

    def deliver(self, message: bytes, to: Optional[str]) -> None:
        self.published += 1
        targets = self.links.values() if to is None else [self.links[to]] if to in self.links else []
        for link in list(targets):
            link._queue(message)


class MemoryLink:
    """A `Link` on a `MemoryBus`."""

    def __init__(self, bus: MemoryBus, node: str) -> None:
        self.bus = bus
        self.node = node
        self.linked = False
        self.receiver: Optional[LinkReceiver] = None
        self._inbox: list[bytes] = []
        self._drain_call: Any = None
        self._connect_call: Any = None

    def describe(self) -> str:
        return "memory"

    def start(self, receiver: LinkReceiver) -> None:
        self.receiver = receiver
        self.bus.links[self.node] = self
        self._connect_call = self.bus.clock.callLater(0, self._connect)

    def stop(self) -> defer.Deferred:
        self.bus.links.pop(self.node, None)
        for call in (self._connect_call, self._drain_call):
            if call is not None and call.active():
                call.cancel()
        self.linked = False
        self._inbox = []
        return defer.succeed(None)

    def publish(self, message: bytes, to: Optional[str] = None) -> bool:
        if not self.linked:
            return False
        self.bus.deliver(message, to)
        return True

    def announce(self, ttl: float) -> None:
        if self.linked:
            self.bus.expires[self.node] = self.bus.clock.seconds() + ttl

    def withdraw(self) -> None:
        if self.linked:
            self.bus.expires.pop(self.node, None)

    def present(self) -> defer.Deferred:
        if not self.linked:
            return defer.fail(ConnectionError("not linked"))
        now = self.bus.clock.seconds()
        for node, expiry in list(self.bus.expires.items()):
            if expiry <= now:
                del self.bus.expires[node]
        return defer.succeed(set(self.bus.expires))

    def add_map(self, name: str, expires_ms: float, *, cap: int,
                forget_before_ms: float) -> defer.Deferred:
        if not self.linked:
            return defer.fail(ConnectionError("not linked"))
        maps = self.bus.maps
        for old in [old for old, at in maps.items() if at < forget_before_ms]:
            del maps[old]
        if name in maps:
            outcome = "taken"
        elif len(maps) >= cap:
            outcome = "full"
        else:
            maps[name] = expires_ms
            outcome = "added"
        return self._reply(lambda: outcome)

    def find_map(self, name: str) -> defer.Deferred:
        return self._reply(lambda: self.bus.maps.get(name))

    def device_keys(self) -> MemoryDeviceKeys:
        return MemoryDeviceKeys(self)

    def restore_maps(self, maps: list[tuple[str, float]]) -> defer.Deferred:
        if self.linked:
            for name, expires_ms in maps:
                self.bus.maps.setdefault(name, expires_ms)
        return self._reply(lambda: None)

    def _reply(self, answer: Any) -> defer.Deferred:
        # In a later turn, as from a socket; a failure if not linked now.
        if not self.linked:
            return defer.fail(ConnectionError("not linked"))
        replied: defer.Deferred = defer.Deferred()
        self.bus.clock.callLater(0, lambda: replied.callback(answer()))
        return replied

    def _connect(self) -> None:
        self._connect_call = None
        if self.bus.up and self.node in self.bus.links and not self.linked:
            self.linked = True
            assert self.receiver is not None
            self.receiver.link_up()

    def _reconnect_later(self) -> None:
        if self._connect_call is None or not self._connect_call.active():
            self._connect_call = self.bus.clock.callLater(self.bus.retry, self._connect)

    def _lost(self, reason: str) -> None:
        self._inbox = []
        if self.linked:
            self.linked = False
            assert self.receiver is not None
            self.receiver.link_down(reason)

    def _queue(self, message: bytes) -> None:
        # One FIFO per receiver, drained in a later turn: like a socket,
        # never re-entering the sender's call stack.
        if not self.linked:
            return
        self._inbox.append(message)
        if self._drain_call is None:
            self._drain_call = self.bus.clock.callLater(0, self._drain)

    def _drain(self) -> None:
        self._drain_call = None
        inbox, self._inbox = self._inbox, []
        for message in inbox:
            if not self.linked or self.receiver is None:
                return
            self.receiver.message_received(message)


# Redis, on txredisapi


@dataclass(frozen=True)
class RedisAddress:
    host: str
    port: int
    db: int
    tls: bool
    username: Optional[str]
    password: Optional[str]

    def __str__(self) -> str:
        """The URL without its secrets, for logs."""
        auth = "***@" if self.password is not None else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'rediss' if self.tls else 'redis'}://{auth}{host}:{self.port}/{self.db}"


def parse_redis_url(url: str) -> RedisAddress:
    """`redis://[[user]:password@]host[:port][/db]`, or `rediss://` for TLS."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"not a redis:// or rediss:// URL: {url!r}")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError(f"bad port in {url!r}") from None
    if not parts.hostname:
        raise ValueError(f"no host in {url!r}")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"the database must be a number, not {path!r}")
    return RedisAddress(
        host=parts.hostname, port=port, db=int(path or 0), tls=parts.scheme == "rediss",
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None)


@implementer(ILogObserver)
def _discard(event: dict) -> None:
    pass


class _QuietClientService(ClientService):
    """ClientService logs every retry; the link logs a loss once instead."""

    _log = Logger(observer=_discard)


class _RedisFactory(txredisapi.RedisFactory):
    """Builds the protocols of one of the link's connections (no pool: one each)."""

    def __init__(self, connection: _RedisConnection, address: RedisAddress,
                 dbid: Optional[int], reply_timeout: float) -> None:
        super().__init__(None, dbid, 1, isLazy=True, charset=None, password=address.password,
                         replyTimeout=reply_timeout, convertNumbers=False,
                         username=address.username)
        self.connection = connection
        self.deferred = None  # nobody waits on a pool

    def buildProtocol(self, addr: Any) -> Any:  # noqa: N802 (Twisted's name)
        protocol = super().buildProtocol(addr)
        protocol.whenConnected().addCallback(self.connection._ready)
        return protocol

    def addConnection(self, conn: Any) -> None:  # noqa: N802 (txredisapi's name)
        """No pool: the link holds its protocol itself."""

    def connectionError(self, why: str) -> None:  # noqa: N802 (txredisapi's name)
        # AUTH or SELECT failed: the connection is closed and retried later.
        self.connection.link._refused(why)


class _CommandProtocol(txredisapi.RedisProtocol):
    def connectionLost(self, why: Failure) -> None:  # noqa: N802
        super().connectionLost(why)
        self.factory.connection._lost(self, why)


class _SubscriberProtocol(txredisapi.SubscriberProtocol):
    def messageReceived(self, pattern: Any, channel: bytes, message: bytes) -> None:  # noqa: N802
        self.factory.connection.link._message(message)

    def connectionLost(self, why: Failure) -> None:  # noqa: N802
        super().connectionLost(why)
        self.factory.connection._lost(self, why)


class _RedisConnection:
    """One Redis connection kept open: reconnects with capped exponential back-off."""

    def __init__(self, link: RedisLink, name: str, protocol: type,
                 endpoint: Any, dbid: Optional[int]) -> None:
        self.link = link
        self.name = name
        self.protocol: Any = None
        self._unready = 0
        factory = _RedisFactory(self, link.address, dbid, link.reply_timeout)
        factory.protocol = protocol
        self.service = _QuietClientService(endpoint, factory, retryPolicy=self._delay,
                                           clock=link.clock, prepareConnection=self._prepare)

    def _delay(self, attempt: int) -> float:
        # A connection that is accepted and then refused (AUTH) counts as a
        # failure too, or the retries would not back off.
        attempt = max(attempt, self._unready)
        delay = min(self.link.max_backoff, 0.25 * 2 ** min(attempt - 1, 16))
        return delay * random.uniform(0.8, 1.2)

    def _prepare(self, protocol: Any) -> None:
        self._unready += 1

    def _ready(self, protocol: Any) -> None:
        self._unready = 0
        if protocol.connected:
            self.protocol = protocol
            self.link._connection_ready(self)

    def _lost(self, protocol: Any, why: Failure) -> None:
        if protocol is self.protocol:
            self.protocol = None
            self.link._connection_lost(self, why)


class RedisLink:
    """
    A `Link` through Redis: one connection publishes and sets presence keys,
    another subscribes. Channels and keys (pub/sub is not per database, so
    the database number is in the channel names):

    - `livemap:v1:{cluster}:{db}:all`: broadcast channel;
    - `livemap:v1:{cluster}:{db}:to:{node}`: one node's channel;
    - `livemap:v1:{cluster}:node:{node}`: presence key, expiring after the
      node TTL unless refreshed (in database `db`);
    - `livemap:v1:{cluster}:maps`: the private maps, a sorted set of names
      scored by expiry in epoch milliseconds (`inf`: never), in database `db`.
    """

    log = Logger()

    def __init__(self, url: str, cluster: str, node: str, reactor: Any, *,
                 password: Optional[str] = None, reply_timeout: float = 5.0,
                 max_backoff: float = 5.0, keepalive: float = 2.0) -> None:
        self.address = parse_redis_url(url)
        if self.address.password is None and password is not None:
            self.address = replace(self.address, password=password)
        self.node = node
        self.clock: IReactorTime = reactor
        self.reactor = reactor
        self.reply_timeout = reply_timeout
        self.max_backoff = max_backoff
        self.keepalive = keepalive
        prefix = f"livemap:v{PROTOCOL_VERSION}:{cluster}"
        self.channel_prefix = f"{prefix}:{self.address.db}"
        self.broadcast_channel = f"{self.channel_prefix}:all".encode()
        self.own_channel = self._channel(node)
        self.key_prefix = f"{prefix}:node:"
        self.maps_key = f"{prefix}:maps"
        self.store_prefix = prefix
        self.linked = False
        self.receiver: Optional[LinkReceiver] = None
        self._stopping = False
        self._refusal: Optional[str] = None
        self._keepalive = task.LoopingCall(self._ping)
        self._keepalive.clock = reactor
        endpoint = self._endpoint()
        self.commands = _RedisConnection(self, "commands", _CommandProtocol, endpoint,
                                         self.address.db or None)
        self.subscriber = _RedisConnection(self, "subscriber", _SubscriberProtocol,
                                           endpoint, None)

    def describe(self) -> str:
        return str(self.address)

    def _channel(self, node: str) -> bytes:
        return f"{self.channel_prefix}:to:{node}".encode()

    def _endpoint(self) -> Any:
        address = self.address
        endpoint: Any = endpoints.HostnameEndpoint(self.reactor, address.host, address.port,
                                                   timeout=self.reply_timeout)
        if address.tls:
            from twisted.internet.ssl import optionsForClientTLS
            endpoint = endpoints.wrapClientTLS(optionsForClientTLS(address.host), endpoint)
        return endpoint

    # Link

    def start(self, receiver: LinkReceiver) -> None:
        self.receiver = receiver
        self.commands.service.startService()
        self.subscriber.service.startService()
        self._keepalive.start(self.keepalive, now=False)

    def stop(self) -> defer.Deferred:
        self._stopping = True
        self.linked = False
        if self._keepalive.running:
            self._keepalive.stop()
        return defer.gatherResults([self.commands.service.stopService(),
                                    self.subscriber.service.stopService()],
                                   consumeErrors=True).addCallback(lambda _: None)

    def _command(self, connection: _RedisConnection, name: str, *args: Any,
                 **kwargs: Any) -> bool:
        """Send one command if connected; never raises (this runs inside hub ticks)."""
        protocol = connection.protocol
        if protocol is None:
            return False
        try:
            sent = getattr(protocol, name)(*args, **kwargs)
        except txredisapi.ConnectionError:
            return False
        sent.addErrback(self._failed, name.upper())
        return True

    def publish(self, message: bytes, to: Optional[str] = None) -> bool:
        if not self.linked:
            return False
        channel = self.broadcast_channel if to is None else self._channel(to)
        return self._command(self.commands, "publish", channel, message)

    def announce(self, ttl: float) -> None:
        value = orjson.dumps({"host": socket.gethostname(), "pid": os.getpid()})
        self._command(self.commands, "set", self.key_prefix + self.node, value,
                      pexpire=max(1, int(ttl * 1000)))

    def withdraw(self) -> None:
        self._command(self.commands, "delete", self.key_prefix + self.node)

    def present(self) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._present())

    async def _present(self) -> set[str]:
        protocol = self.commands.protocol
        if protocol is None:
            raise ConnectionError("not connected to Redis")
        nodes: set[str] = set()
        cursor = 0
        pattern = self.key_prefix + "*"
        while True:
            cursor, keys = await protocol.scan(cursor, pattern, 1000)
            cursor = int(cursor)
            for key in keys:
                nodes.add(key.decode("utf-8", "replace")[len(self.key_prefix):])
            if cursor == 0:
                return nodes

    # Private maps: one sorted set, so that a Lua script can count, prune
    # and add atomically (the cluster-wide cap), a lookup is one ZSCORE and
    # restoring is one ZADD per thousand maps.

    _ADD_MAP = b"""
        redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1])
        if redis.call('ZSCORE', KEYS[1], ARGV[4]) then return 'taken' end
        if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 'full' end
        redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
        return 'added'
    """

    def _query(self, *args: Any) -> defer.Deferred:
        """One command's reply, or a failure if not linked (never raises)."""
        protocol = self.commands.protocol
        if not self.linked or protocol is None:
            return defer.fail(ConnectionError("not connected to Redis"))
        try:
            return protocol.execute_command(*args)
        except Exception:
            return defer.fail()

    def add_map(self, name: str, expires_ms: float, *, cap: int,
                forget_before_ms: float) -> defer.Deferred:
        return self._query("EVAL", self._ADD_MAP, 1, self.maps_key, score(forget_before_ms),
                           str(cap), score(expires_ms), name).addCallback(
            lambda outcome: outcome.decode() if isinstance(outcome, bytes) else outcome)

    def find_map(self, name: str) -> defer.Deferred:
        return self._query("ZSCORE", self.maps_key, name).addCallback(
            lambda found: None if found is None else float(found))

    def device_keys(self) -> RedisDeviceKeys:
        return RedisDeviceKeys(self, self.store_prefix)

    def restore_maps(self, maps: list[tuple[str, float]]) -> defer.Deferred:
        if not self.linked:
            return defer.fail(ConnectionError("not connected to Redis"))
        sent = []
        for start in range(0, len(maps), RESTORE_CHUNK):
            pairs: list[str] = []
            for name, expires_ms in maps[start:start + RESTORE_CHUNK]:
                pairs += [score(expires_ms), name]
            sent.append(self._query("ZADD", self.maps_key, "NX", *pairs))
        return defer.gatherResults(sent, consumeErrors=True).addCallbacks(
            lambda _: None, lambda failure: failure.value.subFailure)

    # Connections

    def _failed(self, failure: Failure, command: str) -> None:
        # The connection's loss is what matters, and it is logged once there.
        if self.linked:
            self.log.debug("redis {command} failed: {error}", command=command,
                           error=failure.getErrorMessage())

    def _refused(self, why: str) -> None:
        if why != self._refusal:
            self._refusal = why
            self.log.error("Redis {address} refused the connection: {why}",
                           address=str(self.address), why=why)

    def _connection_ready(self, connection: _RedisConnection) -> None:
        self._refusal = None
        if self._stopping:
            return
        if connection is self.subscriber:
            protocol = connection.protocol
            def refused(failure: Failure) -> None:
                self._failed(failure, "SUBSCRIBE")
                protocol.transport.abortConnection()
            d = protocol.subscribe([self.broadcast_channel, self.own_channel])
            d.addCallbacks(lambda _: self._maybe_up(), refused)
        else:
            self._maybe_up()

    def _maybe_up(self) -> None:
        if (not self.linked and not self._stopping and self.commands.protocol is not None
                and self.subscriber.protocol is not None):
            self.linked = True
            assert self.receiver is not None
            self.receiver.link_up()

    def _connection_lost(self, connection: _RedisConnection, why: Failure) -> None:
        # Either connection's loss unlinks: the other one stays up, and when
        # this one is back, one resync covers whatever was missed.
        if self.linked and not self._stopping:
            self.linked = False
            assert self.receiver is not None
            self.receiver.link_down(f"{connection.name} connection: {why.getErrorMessage()}")

    def _message(self, message: Any) -> None:
        if self.linked and self.receiver is not None and isinstance(message, bytes):
            self.receiver.message_received(message)

    def _ping(self) -> None:
        # A Redis that hangs (or a half-open TCP connection) answers no PING:
        # the reply timeout then aborts the connection and we reconnect.
        for connection in (self.commands, self.subscriber):
            self._command(connection, "ping")


# The backplane: the hub's side of the link


@dataclass
class BackplaneStats:
    published: int = 0
    dropped: int = 0
    received: int = 0
    resyncs: int = 0
    full_states_sent: int = 0
    nodes_expired: int = 0
    bad_messages: int = 0


def _state_entries(pins: Iterable[Pin]) -> bytes:
    return b",".join(b"[%d,%s]" % (pin.version, pin.json()) for pin in pins)


class Backplane(service.Service):
    """
    Shares this node's pins with the other nodes of its cluster and applies
    theirs to the hub. A twisted Service: start it, and the hub's ticks are
    published; stop it, and the other nodes drop this node's pins at once.
    With `share_maps`, it is also the cluster's store of private maps.
    """

    log = Logger()
    directory: Optional[MapDirectory] = None
    devices: Optional[Devices] = None
    device_keys: Any = None

    def __init__(self, hub: Hub, link: Link, clock: IReactorTime, *,
                 node_ttl: float = DEFAULT_NODE_TTL, sync_timeout: Optional[float] = None,
                 reply_delay: float = 0.05, full_chunk: int = FULL_CHUNK) -> None:
        self.hub = hub
        self.link = link
        self.clock = clock
        self.node = link.node
        self.node_ttl = node_ttl
        # A beat goes when nothing else went for a beat interval, so the
        # others hear from a live node at least every half TTL.
        self.beat_interval = node_ttl / 4
        self.sync_timeout = min(3.0, node_ttl) if sync_timeout is None else sync_timeout
        self.reply_delay = reply_delay
        self.full_chunk = full_chunk
        self.stats = BackplaneStats()
        # When each other node was last heard from (this node's clock).
        self.last_seen: dict[str, float] = {}
        # Nodes whose `full` state is arriving: what it has named so far.
        self.replacing: dict[str, set[tuple[str, str]]] = {}
        # Nodes asked for their state that have not sent it yet.
        self.asked: set[str] = set()
        self.last_publish = -math.inf
        self.linked_since: Optional[float] = None
        self.down_since: Optional[float] = clock.seconds()
        self.ever_linked = False
        self._reply_to: set[Optional[str]] = set()
        self._reply_call: Any = None
        self._synced: Optional[str] = None
        self._sync_waiters: list[defer.Deferred] = []
        self._sync_pending: Optional[set[str]] = None
        # Nodes whose whole state arrived since the link last came up.
        self._full_from: set[str] = set()
        self._sync_call: Any = None
        # How the other nodes' states came in, while the devices' are loading.
        self._nodes_synced: Optional[str] = None
        self._devices_loaded = False
        # The device store's epoch as this node last saw it.
        self._device_epoch: Optional[str] = None
        self._beat = task.LoopingCall(self._guarded, self._heartbeat)
        self._beat.clock = clock
        self._sweep = task.LoopingCall(self._guarded, self.sweep)
        self._sweep.clock = clock
        self._hello = self._encode({"t": "hello", "n": self.node})
        self._beat_message = self._encode({"t": "beat", "n": self.node})

    # Service

    def startService(self) -> None:  # noqa: N802 (Twisted's name)
        super().startService()
        self.hub.publisher = self.publish_tick
        self._sync_call = self.clock.callLater(self.sync_timeout, self._finish_sync,
                                               "timed out")
        self.link.start(self)
        self._beat.start(self.beat_interval, now=False)
        self._sweep.start(max(0.05, self.node_ttl / 6), now=False)
        self.log.info("node {node} joining cluster through {link}", node=self.node,
                      link=self.link.describe())

    def stopService(self) -> defer.Deferred:  # noqa: N802
        super().stopService()
        if self.link.linked:
            self._publish(self._encode({"t": "bye", "n": self.node}))
            self.link.withdraw()
        return self.abandon()

    def abandon(self) -> defer.Deferred:
        """Stop without a goodbye, as a crash would: the others time this node out."""
        if self.hub.publisher == self.publish_tick:
            self.hub.publisher = None
        for loop in (self._beat, self._sweep):
            if loop.running:
                loop.stop()
        for call in (self._reply_call, self._sync_call):
            if call is not None and call.active():
                call.cancel()
        self._finish_sync("stopped")
        return self.link.stop()

    def when_synced(self) -> defer.Deferred:
        """
        Fires once this node holds the other nodes' pins after starting (or
        after `sync_timeout`, Redis or not), so a first welcome is whole.
        """
        if self._synced is not None:
            return defer.succeed(self._synced)
        waiter: defer.Deferred = defer.Deferred()
        self._sync_waiters.append(waiter)
        return waiter

    # The private maps: this backplane is the directory's MapStore

    def share_maps(self, directory: MapDirectory) -> None:
        """Keep `directory`'s private maps in the link's store, for every node."""
        self.directory = directory
        directory.store = self

    def add_map(self, name: str, expires: Optional[float], *, cap: int,
                forget_before: float) -> defer.Deferred:
        """`MapStore.add_map`: in the link's store, then told to every node."""
        if not self.link.linked:
            return defer.fail(ConnectionError(f"not linked to {self.link.describe()}"))
        expires_ms = math.inf if expires is None else round(expires * 1000)

        def added(outcome: str) -> str:
            if outcome == "added":
                self._publish(b'{"t":"map","n":%s,"m":%s,"x":%s}' % (
                    orjson.dumps(self.node), orjson.dumps(name),
                    b"null" if expires is None else b"%d" % expires_ms))
            return outcome
        return self.link.add_map(name, expires_ms, cap=cap,
                                 forget_before_ms=round(forget_before * 1000)).addCallback(added)

    def find_map(self, name: str) -> defer.Deferred:
        """`MapStore.find_map`: the expiry in the clock's seconds, or None."""
        if not self.link.linked:
            return defer.fail(ConnectionError(f"not linked to {self.link.describe()}"))
        return self.link.find_map(name).addCallback(
            lambda expires_ms: None if expires_ms is None else expires_ms / 1000)

    def _restore_maps(self) -> None:
        # Redis may have restarted empty: write back what this node knows
        # (ZADD NX: nothing that is there is changed).
        if self.directory is None:
            return
        maps = [(name, math.inf if expires is None else round(expires * 1000))
                for name, expires in self.directory.entries()]
        if maps:
            self.link.restore_maps(maps).addErrback(
                lambda failure: self.log.warn("could not restore {count} private maps: {error}",
                                              count=len(maps), error=failure.getErrorMessage()))

    def _learn_map(self, message: dict) -> None:
        name, expires_ms = message["m"], message["x"]
        if not isinstance(name, str) or not (
                expires_ms is None or (isinstance(expires_ms, (int, float))
                                       and not isinstance(expires_ms, bool))):
            raise ValueError("bad map message")
        if self.directory is not None:
            self.directory.learn(name, None if expires_ms is None else expires_ms / 1000)

    # The devices: this backplane is the DeviceStore of the node's Devices

    def share_devices(self, devices: Devices) -> None:
        """Keep `devices` in the link's store, for every node (device_store.py)."""
        self.devices = devices
        self.device_keys = self.link.device_keys()
        devices.store = self

    def add_device(self, token_hash: str, record: dict, expires_ms: float, *,
                   cap: int, now_ms: float) -> defer.Deferred:
        if not self.link.linked:
            return defer.fail(ConnectionError(f"not linked to {self.link.describe()}"))
        return self.device_keys.add_device(token_hash, orjson.dumps(record), expires_ms,
                                           cap=cap, now_ms=now_ms)

    def find_device(self, token_hash: str, now_ms: float) -> defer.Deferred:
        if not self.link.linked:
            return defer.fail(ConnectionError(f"not linked to {self.link.describe()}"))
        return self.device_keys.find_device(token_hash, now_ms).addCallback(
            lambda found: None if found is None else orjson.loads(found))

    def remove_device(self, token_hash: str, map_name: str, pin_id: str) -> defer.Deferred:
        if not self.link.linked:
            return defer.fail(ConnectionError(f"not linked to {self.link.describe()}"))

        def removed(existed: bool) -> bool:
            self._publish(b'{"t":"devgone","n":%s,"m":%s,"i":%s,"k":%s}' % (
                orjson.dumps(self.node), orjson.dumps(map_name), orjson.dumps([pin_id]),
                orjson.dumps([token_hash])))
            return existed
        return self.device_keys.remove_device(token_hash).addCallback(removed)

    def save_fix(self, token_hash: str, map_name: str, version: int, entry: bytes,
                 now_ms: float, expires_ms: float) -> defer.Deferred:
        if not self.link.linked:
            return defer.fail(ConnectionError(f"not linked to {self.link.describe()}"))
        name = orjson.dumps(map_name)

        def saved(outcome: str) -> str:
            if outcome == "saved":
                self._publish(b'{"t":"dev","n":%s,"m":%s,"p":[%s]}' % (
                    orjson.dumps(self.node), name, entry))
            return outcome
        return self.device_keys.save_fix(token_hash, version, fix_value(name, entry),
                                         now_ms, expires_ms).addCallback(saved)

    async def _sync_devices(self) -> None:
        """
        After (re)linking: if the store lost its data (a new epoch), write
        back what this node knows; then its fixes replace this node's
        device pins.
        """
        assert self.devices is not None
        now_ms = self.clock.seconds() * 1000
        epoch = await self.device_keys.epoch(secrets.token_hex(8))
        if self._device_epoch is not None and epoch != self._device_epoch:
            await self._restore_devices()
        self._device_epoch = epoch
        values = await self.device_keys.load_fixes(now_ms)
        entries = []
        for value in values:
            try:
                decoded = orjson.loads(value)
                [state] = self._states([decoded["e"]])
                entries.append((decoded["m"], state))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                self.stats.bad_messages += 1
        self.devices.replace_all(entries)
        self._devices_loaded = True
        if self._nodes_synced is not None:
            self._finish_sync(self._nodes_synced)

    async def _restore_devices(self) -> None:
        assert self.devices is not None
        records = self.devices.known_records()
        self.log.info("node {node}: the device store is new; writing back {count} devices",
                      node=self.node, count=len(records))
        await self.device_keys.restore(
            (key, orjson.dumps(record), until) for key, record, until in records)
        by_id = {record["i"]: (key, until) for key, record, until in records}
        now_ms = self.clock.seconds() * 1000
        for map_state in list(self.hub.maps.values()):
            for pin in list(map_state.pins.values()):
                found = by_id.get(pin.id)
                if pin.origin == DEVICES and found is not None:
                    entry = b"[%d,%s]" % (pin.version, pin.json())
                    await self.device_keys.save_fix(
                        found[0], pin.version, fix_value(orjson.dumps(map_state.name), entry),
                        now_ms, found[1])

    # Health and metrics

    def health_problem(self) -> Optional[str]:
        """None while linked; else what /healthz should say (still 200)."""
        if self.link.linked:
            return None
        assert self.down_since is not None
        since = self.clock.seconds() - self.down_since
        what = "connecting to" if not self.ever_linked else "cut off from"
        return (f"{what} {self.link.describe()} for {since:.0f} s: serving this node's "
                f"clients only, reconnecting")

    def nodes(self) -> int:
        return len(self.last_seen)

    # LinkReceiver

    def link_up(self) -> None:
        now = self.clock.seconds()
        if self.ever_linked:
            self.log.info("node {node}: link to {link} is back after {seconds:.1f} s; resyncing",
                          node=self.node, link=self.link.describe(),
                          seconds=now - (self.down_since or now))
        else:
            self.log.info("node {node}: linked to {link}", node=self.node,
                          link=self.link.describe())
        self.ever_linked = True
        self.linked_since, self.down_since = now, None
        self.stats.resyncs += 1
        self.asked.clear()
        self.replacing.clear()
        self._full_from.clear()
        self.link.announce(self.node_ttl)
        # Everyone sends us their state; we send everyone ours (what we
        # published while cut off was lost).
        self._publish(self._hello)
        self._send_full(None)
        self._restore_maps()
        if self.devices is not None:
            defer.Deferred.fromCoroutine(self._sync_devices()).addErrback(
                lambda failure: self.log.warn("could not load the devices' pins: {error}",
                                              error=failure.getErrorMessage()))
        if self._synced is None and self._sync_pending is None:
            self.link.present().addCallbacks(self._wait_for_nodes,
                                             lambda failure: self._first_sync_done("no peers"))

    def link_down(self, reason: str) -> None:
        self.linked_since, self.down_since = None, self.clock.seconds()
        self.log.warn("node {node}: lost the link to {link} ({reason}); serving this node's "
                      "clients, reconnecting", node=self.node, link=self.link.describe(),
                      reason=reason)

    def message_received(self, message: bytes) -> None:
        try:
            decoded = orjson.loads(message)
            kind, origin = decoded["t"], decoded["n"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self._bad(message)
            return
        if origin == self.node:
            return
        self.stats.received += 1
        known = origin in self.last_seen
        self.last_seen[origin] = self.clock.seconds()
        try:
            if kind == "delta":
                if not known:
                    self._ask(origin)
                self._apply(origin, decoded["m"], decoded["p"], decoded["g"])
            elif kind == "full":
                self._apply_full(origin, decoded)
            elif kind == "hello":
                self._reply(origin)
            elif kind == "beat":
                if not known:
                    self._ask(origin)
            elif kind == "bye":
                self._forget(origin, "said goodbye")
            elif kind == "map":
                self._learn_map(decoded)
            elif kind == "dev":
                if self.devices is not None:
                    self.devices.apply(decoded["m"], self._states(decoded["p"]))
            elif kind == "devgone":
                if self.devices is not None:
                    self.devices.remote_gone(decoded["m"], list(decoded["i"]), list(decoded["k"]))
            else:
                self._bad(message)
        except (KeyError, TypeError, ValueError, AttributeError):
            self._bad(message)
        except Exception:
            # Never into the Redis protocol's parser: it would lose its place.
            self.stats.bad_messages += 1
            self.log.failure("could not apply a message of node {origin}", origin=origin)

    # Publishing

    def publish_tick(self, map_name: str, pins: list[Pin], gone: list[str]) -> None:
        """`Hub.publisher`: this node's changes of one map tick, as one message."""
        if not self.link.linked:
            self.stats.dropped += 1
            return
        self._publish(b'{"t":"delta","n":%s,"m":%s,"p":[%s],"g":%s}' % (
            orjson.dumps(self.node), orjson.dumps(map_name), _state_entries(pins),
            orjson.dumps(gone)))

    def _publish(self, message: bytes, to: Optional[str] = None) -> None:
        if self.link.publish(message, to):
            self.stats.published += 1
            self.last_publish = self.clock.seconds()
        else:
            self.stats.dropped += 1

    def _encode(self, message: dict) -> bytes:
        return orjson.dumps(message)

    def full_messages(self) -> list[bytes]:
        """This node's whole state, in chunks of at most `full_chunk` pins."""
        chunks: list[dict[str, list[Pin]]] = [{}]
        count = 0
        for map_name, pin in self.hub.local_pins():
            if count == self.full_chunk:
                chunks.append({})
                count = 0
            chunks[-1].setdefault(map_name, []).append(pin)
            count += 1
        node = orjson.dumps(self.node)
        messages = []
        for index, chunk in enumerate(chunks):
            maps = b",".join(b"%s:[%s]" % (orjson.dumps(name), _state_entries(pins))
                             for name, pins in chunk.items())
            end = b"true" if index == len(chunks) - 1 else b"false"
            messages.append(b'{"t":"full","n":%s,"k":%d,"end":%s,"maps":{%s}}' % (
                node, index, end, maps))
        return messages

    def _send_full(self, to: Optional[str]) -> None:
        # All chunks in one turn, on one connection: no delta of ours comes
        # between them.
        for message in self.full_messages():
            self._publish(message, to)
        self.stats.full_states_sent += 1

    def _reply(self, origin: str) -> None:
        # Answers are gathered for a moment: when Redis comes back every node
        # says hello at about the same time.
        self._reply_to.add(origin)
        if self._reply_call is None or not self._reply_call.active():
            self._reply_call = self.clock.callLater(self.reply_delay, self._send_replies)

    def _send_replies(self) -> None:
        targets, self._reply_to = self._reply_to, set()
        if not self.link.linked:
            return
        if len(targets) > 2:
            self._send_full(None)
        else:
            for target in targets:
                self._send_full(target)

    def _ask(self, origin: str) -> None:
        """We hold only part of a node's state (we missed its `full`): ask for it."""
        if origin not in self.asked and self.link.linked:
            self.asked.add(origin)
            self._publish(self._hello, origin)

    def _guarded(self, job: Any) -> None:
        # A LoopingCall stops for good at its first exception: log and go on.
        try:
            job()
        except Exception:
            self.log.failure("backplane {job} failed", job=getattr(job, "__name__", job))

    def _heartbeat(self) -> None:
        if not self.link.linked:
            return
        self.link.announce(self.node_ttl)
        if self.clock.seconds() - self.last_publish >= self.beat_interval:
            self._publish(self._beat_message)

    # Applying

    def _apply(self, origin: str, map_name: str, entries: list, gone: Iterable[str]) -> None:
        states = self._states(entries)
        seen = self.replacing.get(origin)
        if seen is not None:
            seen.update((map_name, state["id"]) for state in states)
        self.hub.apply_remote(map_name, origin, states, gone)

    @staticmethod
    def _states(entries: list) -> list[dict]:
        states = []
        for version, state in entries:
            state["version"] = int(version)
            states.append(state)
        return states

    def _apply_full(self, origin: str, message: dict) -> None:
        if message["k"] == 0:
            self.replacing[origin] = set()
        for map_name, entries in message["maps"].items():
            self._apply(origin, map_name, entries, ())
        if message["end"]:
            self.asked.discard(origin)
            self._full_from.add(origin)
            seen = self.replacing.pop(origin, None)
            if seen is not None:
                self._drop_unseen(origin, seen)
            if self._sync_pending is not None:
                self._sync_pending.discard(origin)
                if not self._sync_pending:
                    self._first_sync_done("complete")

    def _drop_unseen(self, origin: str, seen: set[tuple[str, str]]) -> None:
        for map_state in list(self.hub.maps.values()):
            stale = [pin_id for pin_id, pin in map_state.pins.items()
                     if pin.origin == origin and (map_state.name, pin_id) not in seen]
            if stale:
                self.hub.apply_remote(map_state.name, origin, (), stale)

    def sweep(self) -> None:
        """Drop the pins of nodes not heard from within the node TTL."""
        bound = self.clock.seconds() - self.node_ttl
        for origin, seen in list(self.last_seen.items()):
            if seen < bound:
                self.stats.nodes_expired += 1
                self._forget(origin, f"silent for {self.node_ttl:g} s")

    def _forget(self, origin: str, why: str) -> None:
        self.last_seen.pop(origin, None)
        self.replacing.pop(origin, None)
        self.asked.discard(origin)
        dropped = self.hub.drop_origin(origin)
        self.log.info("node {origin} {why}: dropped its {count} pins", origin=origin, why=why,
                      count=dropped)

    def _bad(self, message: bytes) -> None:
        self.stats.bad_messages += 1
        if self.stats.bad_messages == 1 or self.stats.bad_messages % 1000 == 0:
            # Not its content: it may name a private map.
            self.log.warn("ignored a malformed backplane message of {size} bytes "
                          "({count} so far)", count=self.stats.bad_messages, size=len(message))

    # The first sync

    def _wait_for_nodes(self, nodes: set[str]) -> None:
        pending = set(nodes) - {self.node} - self._full_from
        if self._synced is not None:
            return
        if not pending:
            self._first_sync_done("no other node")
        else:
            self._sync_pending = pending

    def _first_sync_done(self, how: str) -> None:
        """The other nodes' states are in (or will not come): done once the devices' are too."""
        if self._synced is not None or self._nodes_synced is not None:
            return
        self._nodes_synced = how
        if self._devices_loaded or self.devices is None:
            self._finish_sync(how)

    def _finish_sync(self, how: str) -> None:
        if self._synced is not None:
            return
        self._synced = how
        self._sync_pending = None
        if self._sync_call is not None and self._sync_call.active():
            self._sync_call.cancel()
        if how != "stopped":
            self.log.info("node {node}: first sync {how} ({count} pins of {nodes} other nodes)",
                          node=self.node, how=how, nodes=len(self.last_seen),
                          count=sum(1 for m in self.hub.maps.values()
                                    for p in m.pins.values() if p.origin is not None))
        waiters, self._sync_waiters = self._sync_waiters, []
        for waiter in waiters:
            waiter.callback(how)


class BackplaneCollector(Collector):
    """The backplane's counters for /metrics, read at scrape time."""

    def __init__(self, backplane: Backplane) -> None:
        self.backplane = backplane

    def collect(self) -> Iterator[Metric]:
        backplane, stats = self.backplane, self.backplane.stats
        yield GaugeMetricFamily("livemap_backplane_connected",
                                "1 while linked to the other nodes (Redis), else 0.",
                                value=1 if backplane.link.linked else 0)
        yield GaugeMetricFamily("livemap_backplane_nodes",
                                "Other nodes heard from within the node TTL.",
                                value=backplane.nodes())
        for name, text, value in (
            ("messages_published", "Messages published to the other nodes.", stats.published),
            ("messages_dropped", "Messages not published because the link was down "
             "(the next resync supersedes them).", stats.dropped),
            ("messages_received", "Messages received from other nodes.", stats.received),
            ("resyncs", "Times this node (re)linked and exchanged full states.", stats.resyncs),
            ("full_states_sent", "Full states of this node sent.", stats.full_states_sent),
            ("nodes_expired", "Nodes dropped for silence (died or cut off).",
             stats.nodes_expired),
            ("bad_messages", "Malformed messages ignored.", stats.bad_messages),
        ):
            yield CounterMetricFamily(f"livemap_backplane_{name}", text, value=value)


def make_backplane(hub: Hub, reactor: Any, url: str, *, cluster: str = DEFAULT_CLUSTER,
                   node_ttl: float = DEFAULT_NODE_TTL, password: Optional[str] = None,
                   node: Optional[str] = None) -> Backplane:
    """A backplane on Redis at `url` (what `--redis` gives)."""
    link = RedisLink(url, cluster, node or new_node_id(), reactor, password=password,
                     max_backoff=max(0.5, min(5.0, node_ttl / 2)),
                     keepalive=max(0.5, node_ttl / 4))
    return Backplane(hub, link, reactor, node_ttl=node_ttl)


__all__ = ["Backplane", "BackplaneCollector", "BackplaneStats", "Link", "LinkReceiver",
           "MemoryBus", "MemoryLink", "RedisAddress", "RedisLink", "make_backplane",
           "new_node_id", "parse_redis_url"]
