"""
The link between nodes through Redis (txredisapi, on the reactor), spread
over one or several Redis servers.

A map's channel lives on one server, chosen by a stable hash of its name,
so the pub/sub traffic of many maps is spread over the servers; the first
server (the "home") also carries the cluster's channel, each node's own
channel, the presence keys, the private maps and the devices (a little
traffic, kept in one place). Every node must be given the same list of
servers in the same order: the link's `fingerprint` names it, and nodes
compare theirs (backplane.py).

Per server: one connection for commands and publishing, one that
subscribes; each reconnects with capped, jittered back-off, and the link is
up only while all of them are. Channels and keys, with C the cluster and D
a server's database (pub/sub is not per database, so D is in channel names):

- `livemap:v2:C:D:all`, `livemap:v2:C:D:to:NODE` (home);
- `livemap:v2:C:D:map:SHA1(MAP)` (the map's server);
- `livemap:v2:C:node:NODE` (presence, expiring), `livemap:v2:C:maps`
  (private maps), and the device keys of device_store.py (home).
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Optional
from urllib.parse import unquote, urlsplit

import orjson
import txredisapi
from twisted.application.internet import ClientService
from twisted.internet import defer, endpoints, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .device_store import RedisDeviceKeys
from .links import LinkReceiver, map_digest, score

# Bumped when messages or channels change shape: nodes of different
# versions never share a channel.
PROTOCOL_VERSION = 2
# Private maps written back per command after a reconnection.
RESTORE_CHUNK = 1000
# Commands Redis answers with one reply per channel or pattern named.
_PER_CHANNEL_COMMANDS = frozenset({"SUBSCRIBE", "UNSUBSCRIBE", "PSUBSCRIBE", "PUNSUBSCRIBE"})


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

    @property
    def place(self) -> str:
        """Where it is, the same for every node that names it (no secrets)."""
        return f"{self.host.lower()}:{self.port}/{self.db}"


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


def parse_redis_urls(value: str) -> list[RedisAddress]:
    """One URL, or several separated by commas (maps are spread over them)."""
    urls = [url.strip() for url in value.split(",") if url.strip()]
    if not urls:
        raise ValueError("no Redis URL")
    addresses = [parse_redis_url(url) for url in urls]
    places = [address.place for address in addresses]
    if len(set(places)) != len(places):
        raise ValueError("the same Redis server is named twice")
    return addresses


def shard_of(map_name: str, count: int) -> int:
    """Which of `count` servers carries a map's channel: stable, and the same on every node."""
    digest = hashlib.sha256(map_name.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % count


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
        self.connection.server.link._refused(self.connection.server, why)


class _CommandProtocol(txredisapi.RedisProtocol):
    def connectionLost(self, why: Failure) -> None:  # noqa: N802
        super().connectionLost(why)
        self.factory.connection._lost(self, why)


class _SubscriberProtocol(txredisapi.SubscriberProtocol):
    """
    Replies are matched to commands by count. txredisapi hands every
    (un)subscribe acknowledgement to the oldest waiting command, so the
    second acknowledgement of a SUBSCRIBE of two channels fired the next
    SUBSCRIBE's Deferred before Redis had read it: a node then asked for a
    map's pins before it listened to the map, and its first welcome there
    could miss pins.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Per command sent, in order: [replies it gets, replies seen].
        self._owed: deque[list[int]] = deque()

    def execute_command(self, *args: Any, **kwargs: Any) -> defer.Deferred:
        result = super().execute_command(*args, **kwargs)
        name = args[0].upper() if isinstance(args[0], str) else args[0]
        # One acknowledgement per channel, each a reply of its own.
        replies = max(1, len(args) - 1) if name in _PER_CHANNEL_COMMANDS else 1
        self._owed.append([replies, 0])
        return result

    def replyReceived(self, reply: Any) -> None:  # noqa: N802 (txredisapi's name)
        if isinstance(reply, list):
            if len(reply) >= 3 and reply[-3] == b"message":
                self.messageReceived(None, *reply[-2:])
                return
            if len(reply) >= 4 and reply[-4] == b"pmessage":
                self.messageReceived(*reply[-3:])
                return
        if not self._owed:
            if isinstance(reply, Exception):
                self.replyQueue.put(reply)  # connectionLost fails what still waits
            return
        owed = self._owed[0]
        owed[1] += 1
        if isinstance(reply, Exception) or owed[1] >= owed[0]:
            self._owed.popleft()  # an error is the command's only reply
        if owed[1] == 1:
            # Redis subscribes every channel of the command before it
            # acknowledges the first one.
            self.replyQueue.put(reply[-3:] if isinstance(reply, list) else reply)

    def messageReceived(self, pattern: Any, channel: bytes, message: bytes) -> None:  # noqa: N802
        self.factory.connection.server.link._message(message)

    def connectionLost(self, why: Failure) -> None:  # noqa: N802
        super().connectionLost(why)
        self.factory.connection._lost(self, why)


class _RedisConnection:
    """One Redis connection kept open: reconnects with capped exponential back-off."""

    def __init__(self, server: RedisServerLink, name: str, protocol: type,
                 endpoint: Any, dbid: Optional[int]) -> None:
        self.server = server
        self.name = name
        self.protocol: Any = None
        self._unready = 0
        factory = _RedisFactory(self, server.address, dbid, server.link.reply_timeout)
        factory.protocol = protocol
        self.service = _QuietClientService(endpoint, factory, retryPolicy=self._delay,
                                           clock=server.link.clock,
                                           prepareConnection=self._prepare)

    def _delay(self, attempt: int) -> float:
        # A connection that is accepted and then refused (AUTH) counts as a
        # failure too, or the retries would not back off.
        attempt = max(attempt, self._unready)
        delay = min(self.server.link.max_backoff, 0.25 * 2 ** min(attempt - 1, 16))
        return delay * random.uniform(0.8, 1.2)

    def _prepare(self, protocol: Any) -> None:
        self._unready += 1

    def _ready(self, protocol: Any) -> None:
        self._unready = 0
        if protocol.connected:
            self.protocol = protocol
            self.server._connection_ready(self)

    def _lost(self, protocol: Any, why: Failure) -> None:
        if protocol is self.protocol:
            self.protocol = None
            self.server.link._connection_lost(self, why)


class RedisServerLink:
    """One Redis server of the link: its two connections and its channels."""

    def __init__(self, link: RedisLink, address: RedisAddress, home: bool) -> None:
        self.link = link
        self.address = address
        self.home = home
        self.channel_prefix = f"livemap:v{PROTOCOL_VERSION}:{link.cluster}:{address.db}"
        # Channels this server's subscriber connection must be on.
        self.channels: set[bytes] = set()
        self.subscribed = False
        endpoint = self._endpoint()
        self.commands = _RedisConnection(self, "commands", _CommandProtocol, endpoint,
                                         address.db or None)
        self.subscriber = _RedisConnection(self, "subscriber", _SubscriberProtocol,
                                           endpoint, None)

    def _endpoint(self) -> Any:
        address = self.address
        endpoint: Any = endpoints.HostnameEndpoint(self.link.reactor, address.host, address.port,
                                                   timeout=self.link.reply_timeout)
        if address.tls:
            from twisted.internet.ssl import optionsForClientTLS
            endpoint = endpoints.wrapClientTLS(optionsForClientTLS(address.host), endpoint)
        return endpoint

    def channel(self, suffix: str) -> bytes:
        return f"{self.channel_prefix}:{suffix}".encode()

    @property
    def ready(self) -> bool:
        return (self.commands.protocol is not None and self.subscriber.protocol is not None
                and self.subscribed)

    def start(self) -> None:
        self.commands.service.startService()
        self.subscriber.service.startService()

    def stop(self) -> defer.Deferred:
        return defer.gatherResults([self.commands.service.stopService(),
                                    self.subscriber.service.stopService()],
                                   consumeErrors=True)

    def command(self, name: str, *args: Any, **kwargs: Any) -> bool:
        """Send one command if connected; never raises (this runs inside hub ticks)."""
        protocol = self.commands.protocol
        if protocol is None:
            return False
        try:
            sent = getattr(protocol, name)(*args, **kwargs)
        except txredisapi.ConnectionError:
            return False
        sent.addErrback(self.link._failed, name.upper())
        return True

    def query(self, *args: Any) -> defer.Deferred:
        """One command's reply, or a failure if not connected (never raises)."""
        protocol = self.commands.protocol
        if protocol is None:
            return defer.fail(ConnectionError("not connected to Redis"))
        try:
            return protocol.execute_command(*args)
        except Exception:
            return defer.fail()

    def listen(self, channel: bytes) -> defer.Deferred:
        """Subscribe now (if connected) and after every reconnection."""
        self.channels.add(channel)
        protocol = self.subscriber.protocol
        if protocol is None or not self.subscribed:
            return defer.fail(ConnectionError("not connected to Redis"))
        return protocol.subscribe([channel])

    def unlisten(self, channel: bytes) -> None:
        self.channels.discard(channel)
        protocol = self.subscriber.protocol
        if protocol is not None and self.subscribed:
            protocol.unsubscribe([channel]).addErrback(self.link._failed, "UNSUBSCRIBE")

    def _connection_ready(self, connection: _RedisConnection) -> None:
        self.link._refusal.pop(self.address.place, None)
        if self.link._stopping:
            return
        if connection is self.subscriber:
            protocol = connection.protocol
            self.subscribed = False

            def subscribed(_: Any) -> None:
                self.subscribed = True
                self.link._maybe_up()

            def refused(failure: Failure) -> None:
                self.link._failed(failure, "SUBSCRIBE")
                protocol.transport.abortConnection()
            if self.channels:
                protocol.subscribe(sorted(self.channels)).addCallbacks(subscribed, refused)
            else:
                subscribed(None)  # a map server with no map watched yet
        else:
            self.link._maybe_up()


class RedisLink:
    """A `Link` through one or several Redis servers (the first is the home)."""

    log = Logger()

    def __init__(self, urls: str, cluster: str, node: str, reactor: Any, *,
                 password: Optional[str] = None, reply_timeout: float = 5.0,
                 max_backoff: float = 5.0, keepalive: float = 2.0) -> None:
        addresses = parse_redis_urls(urls)
        if password is not None:
            addresses = [address if address.password is not None
                         else replace(address, password=password) for address in addresses]
        self.node = node
        self.cluster = cluster
        self.clock: IReactorTime = reactor
        self.reactor = reactor
        self.reply_timeout = reply_timeout
        self.max_backoff = max_backoff
        self.keepalive = keepalive
        self.linked = False
        self.receiver: Optional[LinkReceiver] = None
        self.servers = [RedisServerLink(self, address, home=index == 0)
                        for index, address in enumerate(addresses)]
        self.home = self.servers[0]
        self.fingerprint = hashlib.sha256(
            "|".join(server.address.place for server in self.servers).encode()).hexdigest()[:16]
        prefix = f"livemap:v{PROTOCOL_VERSION}:{cluster}"
        self.key_prefix = f"{prefix}:node:"
        self.maps_key = f"{prefix}:maps"
        self.store_prefix = prefix
        self.all_channel = self.home.channel("all")
        self.own_channel = self._node_channel(node)
        self.home.channels.update({self.all_channel, self.own_channel})
        self.watched: set[str] = set()
        self._stopping = False
        self._refusal: dict[str, str] = {}
        self._keepalive = task.LoopingCall(self._ping)
        self._keepalive.clock = reactor

    def describe(self) -> str:
        return ", ".join(str(server.address) for server in self.servers)

    def _node_channel(self, node: str) -> bytes:
        return self.home.channel(f"to:{node}")

    def server_of(self, map_name: str) -> RedisServerLink:
        return self.servers[shard_of(map_name, len(self.servers))]

    def _map_channel(self, map_name: str) -> tuple[RedisServerLink, bytes]:
        server = self.server_of(map_name)
        return server, server.channel(f"map:{map_digest(map_name)}")

    # Link

    def start(self, receiver: LinkReceiver) -> None:
        self.receiver = receiver
        for server in self.servers:
            server.start()
        self._keepalive.start(self.keepalive, now=False)

    def stop(self) -> defer.Deferred:
        self._stopping = True
        self.linked = False
        if self._keepalive.running:
            self._keepalive.stop()
        return defer.gatherResults([server.stop() for server in self.servers],
                                   consumeErrors=True).addCallback(lambda _: None)

    def publish(self, message: bytes, to: Optional[str] = None) -> bool:
        if not self.linked:
            return False
        channel = self.all_channel if to is None else self._node_channel(to)
        return self.home.command("publish", channel, message)

    def publish_map(self, map_name: str, message: bytes) -> bool:
        if not self.linked:
            return False
        server, channel = self._map_channel(map_name)
        return server.command("publish", channel, message)

    def watch_map(self, map_name: str) -> defer.Deferred:
        self.watched.add(map_name)
        server, channel = self._map_channel(map_name)
        if not self.linked:
            server.channels.add(channel)
            return defer.fail(ConnectionError("not linked to Redis"))

        return server.listen(channel).addCallback(lambda _: None)

    def ask_map(self, map_name: str, message: bytes) -> defer.Deferred:
        if not self.linked:
            return defer.fail(ConnectionError("not linked to Redis"))
        server, channel = self._map_channel(map_name)
        # PUBLISH answers how many subscribers got the message; on the
        # connection of every other command, so in order with the deltas.
        return server.query("PUBLISH", channel, message).addCallback(int)

    def unwatch_map(self, map_name: str) -> None:
        self.watched.discard(map_name)
        server, channel = self._map_channel(map_name)
        server.unlisten(channel)

    def announce(self, ttl: float) -> None:
        value = orjson.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                              "servers": self.fingerprint})
        self.home.command("set", self.key_prefix + self.node, value,
                          pexpire=max(1, int(ttl * 1000)))

    def withdraw(self) -> None:
        self.home.command("delete", self.key_prefix + self.node)

    def present(self) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._present())

    async def _present(self) -> set[str]:
        nodes: set[str] = set()
        cursor = 0
        pattern = self.key_prefix + "*"
        while True:
            cursor, keys = await self.home.query("SCAN", cursor, "MATCH", pattern,
                                                 "COUNT", 1000)
            cursor = int(cursor)
            for key in keys:
                nodes.add(key.decode("utf-8", "replace")[len(self.key_prefix):])
            if cursor == 0:
                return nodes

    # Private maps: one sorted set on the home server, so that a Lua script
    # can count, prune and add atomically (the cluster-wide cap), a lookup
    # is one ZSCORE and restoring is one ZADD per thousand maps.

    _ADD_MAP = b"""
        redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1])
        if redis.call('ZSCORE', KEYS[1], ARGV[4]) then return 'taken' end
        if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 'full' end
        redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
        return 'added'
    """

    def _query(self, *args: Any) -> defer.Deferred:
        """A command on the home server, or a failure if not linked (never raises)."""
        if not self.linked:
            return defer.fail(ConnectionError("not connected to Redis"))
        return self.home.query(*args)

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

    def _refused(self, server: RedisServerLink, why: str) -> None:
        if self._refusal.get(server.address.place) != why:
            self._refusal[server.address.place] = why
            self.log.error("Redis {address} refused the connection: {why}",
                           address=str(server.address), why=why)

    def _maybe_up(self) -> None:
        if (not self.linked and not self._stopping
                and all(server.ready for server in self.servers)):
            self.linked = True
            assert self.receiver is not None
            self.receiver.link_up()

    def _connection_lost(self, connection: _RedisConnection, why: Failure) -> None:
        # Any connection's loss unlinks: the others stay up, and when this
        # one is back, one resync covers whatever was missed.
        if connection is connection.server.subscriber:
            connection.server.subscribed = False
        if self.linked and not self._stopping:
            self.linked = False
            assert self.receiver is not None
            self.receiver.link_down(f"{connection.server.address} {connection.name} "
                                    f"connection: {why.getErrorMessage()}")

    def _message(self, message: Any) -> None:
        if self.linked and self.receiver is not None and isinstance(message, bytes):
            self.receiver.message_received(message)

    def _ping(self) -> None:
        # A Redis that hangs (or a half-open TCP connection) answers no PING:
        # the reply timeout then aborts the connection and we reconnect.
        for server in self.servers:
            for connection in (server.commands, server.subscriber):
                protocol = connection.protocol
                if protocol is not None:
                    try:
                        protocol.ping().addErrback(self._failed, "PING")
                    except txredisapi.ConnectionError:
                        pass


__all__ = ["PROTOCOL_VERSION", "RedisAddress", "RedisLink", "RedisServerLink",
           "parse_redis_url", "parse_redis_urls", "shard_of"]
