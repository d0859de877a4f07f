"""
The link between nodes through Redis (txredisapi, on the reactor), spread
over one or several Redis servers.

A map's channel lives on one server, chosen by a stable hash of its name,
so the pub/sub traffic of many maps is spread over the servers; the first
server (the "home") also carries the cluster's channel, each node's own
channel, the presence keys, the private maps and the devices (a little
traffic, kept in one place). Every node must be given the same list of
servers in the same order: the link's `fingerprint` names it, and nodes
compare theirs (membership.py). Which server a map is on: sharding.py.

Per server (redis_server_link.py): one connection for commands and
publishing, one that subscribes; the link is up only while all of them are. Channels and keys, with C the cluster and D
a server's database (pub/sub is not per database, so D is in channel names):

- `livemap:v2:C:D:all`, `livemap:v2:C:D:to:NODE` (home);
- `livemap:v2:C:D:map:SHA1(MAP)` (the map's server);
- `livemap:v2:C:node:NODE` (presence, expiring), `livemap:v2:C:maps`
  (private maps), and the device keys of device_store.py (home).
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
from .sharding import servers_fingerprint, shard_of
# Private maps written back per command after a reconnection.
RESTORE_CHUNK = 1000


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
        self.fingerprint = servers_fingerprint([server.address.place for server in self.servers])
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
