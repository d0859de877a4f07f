"""
The link between nodes through Redis (txredisapi, on the reactor), spread
over one or several Redis servers.

A map's channel lives on one server, chosen by a stable hash of its name
(sharding.py), so the pub/sub traffic of many maps is spread over the
servers; one server (the "home", the first in the agreed order) also keeps
the private maps and the devices. Every node must be given the same set of
servers, in any order: the link's `fingerprint` names the set, every node
announces its own with its presence on every server, and nodes compare
(node_membership.py).

Each server comes up and goes down by itself: while one is down, only the
maps on it (and, for the home, the stores) are unavailable. The cluster's
channel and each node's own channel are on every server, so nodes keep
hearing each other through the servers that are up (the cluster's
messages go on the home, or on every server up while it is down); a
message to one node
about a map goes through that map's server, in order with its deltas.

Per server (redis_server_link.py): one connection for commands and
publishing, one that subscribes; a server is up while both are. Channels
and keys, with C the cluster and D a server's database (pub/sub is not per
database, so D is in channel names):

- `livemap:v2:C:D:all`, `livemap:v2:C:D:to:NODE` (every server);
- `livemap:v2:C:D:map:SHA1(MAP)` (the map's server);
- `livemap:v2:C:node:NODE` (presence, expiring; every server),
  `livemap:v2:C:maps` (private maps), and the device keys of
  device_store.py (home).
"""

from __future__ import annotations

import os
import socket
from dataclasses import replace
from typing import Any, Optional

import orjson
import txredisapi
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from .device_store import RedisDeviceKeys
from .links import LinkReceiver, map_digest, score
from .redis_server_link import (
    PROTOCOL_VERSION,
    RedisAddress,
    RedisServerLink,
    _RedisConnection,
    parse_redis_url,
    parse_redis_urls,
)
from .sharding import in_agreed_order, servers_fingerprint, shard_of
# Private maps written back per command after a reconnection.
RESTORE_CHUNK = 1000
# Map names whose server is remembered (hashing is per message otherwise).
PLACED_CACHE = 65536
# How long a write the cluster must not lose waits for a replica (WAIT).
REPLICA_WAIT_MS = 2000


class RedisLink:
    """A `Link` through one or several Redis servers (the first in agreed order is the home)."""

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
        by_place = {address.place: address for address in addresses}
        self.places = in_agreed_order(list(by_place))
        self.servers = [RedisServerLink(self, by_place[place], home=index == 0)
                        for index, place in enumerate(self.places)]
        self.home = self.servers[0]
        self.fingerprint = servers_fingerprint(self.places)
        # The servers that are up (both connections ready and subscribed).
        self.up: set[RedisServerLink] = set()
        self._placed: dict[str, RedisServerLink] = {}
        prefix = f"livemap:v{PROTOCOL_VERSION}:{cluster}"
        self.key_prefix = f"{prefix}:node:"
        self.maps_key = f"{prefix}:maps"
        self.store_prefix = prefix
        for server in self.servers:
            server.channels.update({server.channel("all"), server.channel(f"to:{node}")})
        self.watched: set[str] = set()
        self._stopping = False
        self._refusal: dict[str, str] = {}
        self._keepalive = task.LoopingCall(self._ping)
        self._keepalive.clock = reactor

    def describe(self) -> str:
        return ", ".join(str(server.address) for server in self.servers)

    def server_of(self, map_name: str) -> RedisServerLink:
        server = self._placed.get(map_name)
        if server is None:
            if len(self._placed) >= PLACED_CACHE:
                self._placed.clear()
            server = self._placed[map_name] = self.servers[shard_of(map_name, self.places)]
        return server

    @property
    def store_linked(self) -> bool:
        return self.home in self.up

    def server_name(self, map_name: Optional[str] = None) -> str:
        return str((self.home if map_name is None else self.server_of(map_name)).address)

    def map_linked(self, map_name: str) -> bool:
        return self.server_of(map_name) in self.up

    def down_servers(self) -> list[str]:
        return [str(server.address) for server in self.servers if server not in self.up]

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
        self.up.clear()
        if self._keepalive.running:
            self._keepalive.stop()
        return defer.gatherResults([server.stop() for server in self.servers],
                                   consumeErrors=True).addCallback(lambda _: None)

    def publish(self, message: bytes, to: Optional[str] = None,
                map_name: Optional[str] = None) -> bool:
        if to is None:
            # On the home while it is up (every node listens on every
            # server, so once is enough), else on every server that is up.
            targets = [self.home] if self.home in self.up else [
                server for server in self.servers if server in self.up]
            sent = [server.command("publish", server.channel("all"), message)
                    for server in targets]
            return any(sent)
        if map_name is not None:
            server = self.server_of(map_name)
        else:
            server = self.home if self.home in self.up else next(
                (server for server in self.servers if server in self.up), self.home)
        if server not in self.up:
            return False
        return server.command("publish", server.channel(f"to:{to}"), message)

    def publish_map(self, map_name: str, message: bytes) -> bool:
        server, channel = self._map_channel(map_name)
        if server not in self.up:
            return False
        return server.command("publish", channel, message)

    def watch_map(self, map_name: str) -> defer.Deferred:
        self.watched.add(map_name)
        server, channel = self._map_channel(map_name)
        if server not in self.up:
            server.channels.add(channel)
            return defer.fail(ConnectionError(f"{server.address} is down"))
        return server.listen(channel).addCallback(lambda _: None)

    def ask_map(self, map_name: str, message: bytes) -> defer.Deferred:
        server, channel = self._map_channel(map_name)
        if server not in self.up:
            return defer.fail(ConnectionError(f"{server.address} is down"))
        # PUBLISH answers how many subscribers got the message; on the
        # connection of every other command, so in order with the deltas.
        return server.query("PUBLISH", channel, message).addCallback(int)

    def unwatch_map(self, map_name: str) -> None:
        self.watched.discard(map_name)
        server, channel = self._map_channel(map_name)
        server.unlisten(channel)

    def announce(self, ttl: float) -> None:
        # On every server: a node given another set of servers shares at
        # least one of them with the others, and is seen there.
        value = orjson.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                              "servers": self.fingerprint, "redis": self.describe()})
        for server in self.servers:
            if server in self.up:
                server.command("set", self.key_prefix + self.node, value,
                               pexpire=max(1, int(ttl * 1000)))

    def withdraw(self) -> None:
        for server in self.servers:
            if server in self.up:
                server.command("delete", self.key_prefix + self.node)

    def present(self) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._present())

    async def _present(self) -> set[str]:
        return set(await self._fingerprints(self.home))

    def fingerprints(self) -> defer.Deferred:
        async def every_server() -> dict[str, tuple[str, str]]:
            found: dict[str, tuple[str, str]] = {}
            for server in self.servers:
                if server in self.up:
                    found.update(await self._fingerprints(server))
            return found
        return defer.Deferred.fromCoroutine(every_server())

    async def _fingerprints(self, server: RedisServerLink) -> dict[str, tuple[str, str]]:
        """The presence keys on one server: node -> (fingerprint, its servers)."""
        found: dict[str, tuple[str, str]] = {}
        cursor = 0
        pattern = self.key_prefix + "*"
        while True:
            cursor, keys = await server.query("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
            cursor = int(cursor)
            values = await server.query("MGET", *keys) if keys else []
            for key, value in zip(keys, values):
                node = key.decode("utf-8", "replace")[len(self.key_prefix):]
                try:
                    decoded = orjson.loads(value)
                    found[node] = (str(decoded["servers"]), str(decoded.get("redis", "")))
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    found[node] = ("", "")
            if cursor == 0:
                return found

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
        """A command on the home server, or a failure if it is down (never raises)."""
        if self.home not in self.up:
            return defer.fail(ConnectionError(f"{self.home.address} is down"))
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
        if self.home not in self.up:
            return defer.fail(ConnectionError(f"{self.home.address} is down"))
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

    def replicate(self) -> defer.Deferred:
        """
        Fires once the home's replicas (if it has any) hold every write made
        so far on it (WAIT 1): what a 201 promises survives a failover.
        """
        if not self.home.replicas:
            return defer.succeed(None)

        def waited(count: Any) -> None:
            if int(count) < 1:
                raise ConnectionError("no replica of the Redis master took the write in time")
        return self._query("WAIT", 1, REPLICA_WAIT_MS).addCallback(waited)

    def _check_role(self, server: RedisServerLink) -> None:
        """How many replicas a server has (ROLE: `master`, offset, replicas)."""
        def role(reply: Any) -> None:
            if isinstance(reply, list) and reply and reply[0] in (b"master", "master"):
                server.replicas = len(reply[2]) if len(reply) > 2 else 0
            else:
                server.replicas = 0
        server.query("ROLE").addCallbacks(role, lambda failure: None)

    def _maybe_up(self) -> None:
        for server in self.servers:
            if server not in self.up and server.ready and not self._stopping:
                self._check_role(server)
                self.up.add(server)
                self.linked = True
                assert self.receiver is not None
                self.receiver.server_up(str(server.address))

    def _connection_lost(self, connection: _RedisConnection, why: Failure) -> None:
        # Either connection's loss takes its server down: the other stays
        # up, and when this one is back, one resync of the server's maps
        # covers whatever was missed.
        server = connection.server
        if connection is server.subscriber:
            server.subscribed = False
        if server in self.up and not self._stopping:
            self.up.discard(server)
            self.linked = bool(self.up)
            assert self.receiver is not None
            self.receiver.server_down(str(server.address), f"{connection.name} connection: "
                                      f"{why.getErrorMessage()}")

    def _message(self, message: Any) -> None:
        if self.receiver is not None and isinstance(message, bytes):
            self.receiver.message_received(message)

    def _ping(self) -> None:
        # A Redis that hangs (or a half-open TCP connection) answers no PING:
        # the reply timeout then aborts the connection and we reconnect.
        for server in self.servers:
            if server in self.up:
                self._check_role(server)
            for connection in (server.commands, server.subscriber):
                protocol = connection.protocol
                if protocol is not None:
                    try:
                        protocol.ping().addErrback(self._failed, "PING")
                    except txredisapi.ConnectionError:
                        pass


__all__ = ["PROTOCOL_VERSION", "RedisAddress", "RedisLink", "RedisServerLink",
           "parse_redis_url", "parse_redis_urls", "shard_of"]
