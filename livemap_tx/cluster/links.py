"""
The link between the nodes of a cluster: what the backplane needs from a
message bus, and the bus in memory (one process, for tests). The Redis link
is in redis_link.py.

Channels, as the backplane uses them:

- the cluster's channel: every node listens (presence, goodbyes, new private
  maps);
- each node's own channel (answers meant for it alone);
- one channel per map: only the nodes that serve the map listen (its pins'
  deltas, devices' fixes, requests for its state). A node pays only for the
  maps it serves.
"""

from __future__ import annotations

import math
import os
import secrets
import socket
from typing import Any, Optional, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from .device_store import MemoryDeviceKeys
from ..privacy import map_digest

DEFAULT_CLUSTER = "livemap"


class MapUnavailable(Exception):
    """A map this node cannot serve now (its Redis server is down, or the node refuses)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def score(expires_ms: float) -> str:
    """A map's expiry as Redis writes a sorted-set score ("inf": never)."""
    return "inf" if math.isinf(expires_ms) else str(int(expires_ms))


def new_node_id() -> str:
    """Readable in logs and Redis keys, unique even when a pid is reused."""
    host = socket.gethostname().split(".")[0] or "node"
    host = "".join(c if c.isalnum() or c == "-" else "-" for c in host)[:32]
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


class LinkReceiver(Protocol):
    """
    What a link calls back (the backplane): each server of the link comes
    up and goes down by itself (`server` is its name, as `server_name` says).
    """

    def server_up(self, server: str) -> None: ...

    def server_down(self, server: str, reason: str) -> None: ...

    def message_received(self, message: bytes) -> None: ...


class Link(Protocol):
    """
    A bus between the nodes of one cluster, on one or several servers. A
    map's channel is on one server; messages from one sender on one server
    arrive in the order sent; a message published while its server is down
    is dropped (the backplane resynchronises the maps of a server when it
    comes back). After a reconnection the link listens to every map it was
    watching again. The cluster's channel and each node's own channel are
    on every server.
    """

    node: str
    # At least one server is up.
    linked: bool

    @property
    def store_linked(self) -> bool:
        """The server of the stores (private maps, devices) is up."""
    # Names the list of servers maps are spread over: every node of a
    # cluster must have the same.
    fingerprint: str

    def start(self, receiver: LinkReceiver) -> None:
        """Connect, and keep reconnecting until `stop`."""

    def stop(self) -> defer.Deferred:
        """Disconnect for good (after writing what was published)."""

    def publish(self, message: bytes, to: Optional[str] = None,
                map_name: Optional[str] = None) -> bool:
        """
        Send on the cluster's channel (`to` None, the sender included; on
        every server up) or to one node: through `map_name`'s server if
        given, so that it keeps its order with that map's messages.
        """

    def server_name(self, map_name: Optional[str] = None) -> str:
        """The server of a map (None: of the stores), for logs and health (no secrets)."""

    def map_linked(self, map_name: str) -> bool:
        """Whether the server of `map_name` is up."""

    def down_servers(self) -> list[str]:
        """The names of the servers that are down now."""

    def fingerprints(self) -> defer.Deferred:
        """
        The servers' names that every present node announced (a Deferred of
        {node: (fingerprint, description)}), read from every server up.
        """

    def publish_map(self, map_name: str, message: bytes) -> bool:
        """Send to every node that watches `map_name` (the sender too, if it does)."""

    def watch_map(self, map_name: str) -> defer.Deferred:
        """Listen to a map's channel. Fires once listening; fails while not linked."""

    def ask_map(self, map_name: str, message: bytes) -> defer.Deferred:
        """
        Send to every node that watches `map_name`, as `publish_map`; fires
        with how many nodes it reached (the sender too, if it listens), the
        nodes that will answer.
        """

    def unwatch_map(self, map_name: str) -> None:
        """Stop listening to a map's channel."""

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

    def replicate(self) -> defer.Deferred:
        """Fires once the stores' writes so far are on a replica too (if there are replicas)."""


# In memory: one process, for tests

ALL = "all"


def node_channel(node: str) -> str:
    return f"to:{node}"


def map_channel(map_name: str) -> str:
    return f"map:{map_digest(map_name)}"


class MemoryBus:
    """
    A Redis stand-in for one process: channels with subscribers, delivery in
    order per receiver, presence with expiry, the private maps and the
    devices, and an off switch (`stop`/`start`) that behaves like a Redis
    restart without persistence.
    """

    def __init__(self, clock: IReactorTime, *, retry: float = 0.05) -> None:
        self.clock = clock
        self.retry = retry
        self.up = True
        self.links: dict[str, MemoryLink] = {}
        self.channels: dict[str, set[str]] = {}
        self.expires: dict[str, float] = {}
        # Private maps: name -> expiry (epoch ms, inf: never), as the sorted set.
        self.maps: dict[str, float] = {}
        # Devices (device_store.MemoryDeviceKeys): token hash -> (record,
        # forget at ms), token hash -> (map, version, latest fix), the epoch.
        self.devices: dict[str, tuple[bytes, float]] = {}
        self.device_fixes: dict[str, tuple[str, int, bytes]] = {}
        self.device_epoch: Optional[str] = None
        # Deleted devices written back by the nodes: token hash -> until (ms).
        self.device_gone: dict[str, float] = {}
        self.published = 0

    def stop(self) -> None:
        self.up = False
        self.expires.clear()
        self.maps.clear()
        self.devices.clear()
        self.device_fixes.clear()
        self.device_epoch = None
        self.device_gone.clear()
        self.channels.clear()
        for link in list(self.links.values()):
            link._lost("bus stopped")

    def start(self) -> None:
        self.up = True
        for link in list(self.links.values()):
            link._reconnect_later()

    def subscribe(self, node: str, channel: str) -> None:
        self.channels.setdefault(channel, set()).add(node)

    def unsubscribe(self, node: str, channel: str) -> None:
        listeners = self.channels.get(channel)
        if listeners is not None:
            listeners.discard(node)
            if not listeners:
                del self.channels[channel]

    def deliver(self, channel: str, message: bytes, sender: str) -> None:
        self.published += 1
        for node in sorted(self.channels.get(channel, ())):
            link = self.links.get(node)
            if link is not None:
                link._queue(message, sender)


class MemoryLink:
    """A `Link` on a `MemoryBus`."""

    def __init__(self, bus: MemoryBus, node: str, fingerprint: str = "memory") -> None:
        self.bus = bus
        self.node = node
        self.fingerprint = fingerprint
        self.linked = False
        self.store_linked = False
        self.receiver: Optional[LinkReceiver] = None
        self.watched: set[str] = set()
        self._inbox: list[bytes] = []
        self._drain_call: Any = None
        self._connect_call: Any = None

    def describe(self) -> str:
        return "memory"

    def server_name(self, map_name: Optional[str] = None) -> str:
        return "memory"

    def map_linked(self, map_name: str) -> bool:
        return self.linked

    def down_servers(self) -> list[str]:
        return [] if self.linked else ["memory"]

    def fingerprints(self) -> defer.Deferred:
        if not self.linked:
            return defer.fail(ConnectionError("not linked"))
        now = self.bus.clock.seconds()
        return self._reply(lambda: {
            node: (link.fingerprint, link.describe()) for node, link in self.bus.links.items()
            if link.linked and self.bus.expires.get(node, -math.inf) > now})

    def start(self, receiver: LinkReceiver) -> None:
        self.receiver = receiver
        self.bus.links[self.node] = self
        self._connect_call = self.bus.clock.callLater(0, self._connect)

    def stop(self) -> defer.Deferred:
        self.bus.links.pop(self.node, None)
        for channel in list(self.bus.channels):
            self.bus.unsubscribe(self.node, channel)
        for call in (self._connect_call, self._drain_call):
            if call is not None and call.active():
                call.cancel()
        self.linked = self.store_linked = False
        self._inbox = []
        return defer.succeed(None)

    def publish(self, message: bytes, to: Optional[str] = None,
                map_name: Optional[str] = None) -> bool:
        if not self.linked:
            return False
        self.bus.deliver(ALL if to is None else node_channel(to), message, self.node)
        return True

    def publish_map(self, map_name: str, message: bytes) -> bool:
        if not self.linked:
            return False
        self.bus.deliver(map_channel(map_name), message, self.node)
        return True

    def watch_map(self, map_name: str) -> defer.Deferred:
        self.watched.add(map_name)
        if not self.linked:
            return defer.fail(ConnectionError("not linked"))
        self.bus.subscribe(self.node, map_channel(map_name))
        return self._reply(lambda: None)

    def ask_map(self, map_name: str, message: bytes) -> defer.Deferred:
        if not self.linked:
            return defer.fail(ConnectionError("not linked"))
        channel = map_channel(map_name)
        # Counted as it is delivered, answered later, as Redis's PUBLISH.
        reached = len(self.bus.channels.get(channel, ()))
        self.bus.deliver(channel, message, self.node)
        return self._reply(lambda: reached)

    def unwatch_map(self, map_name: str) -> None:
        self.watched.discard(map_name)
        self.bus.unsubscribe(self.node, map_channel(map_name))

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

    def replicate(self) -> defer.Deferred:
        return defer.succeed(None)

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
            self.linked = self.store_linked = True
            self.bus.subscribe(self.node, ALL)
            self.bus.subscribe(self.node, node_channel(self.node))
            for map_name in self.watched:
                self.bus.subscribe(self.node, map_channel(map_name))
            assert self.receiver is not None
            self.receiver.server_up("memory")

    def _reconnect_later(self) -> None:
        if self._connect_call is None or not self._connect_call.active():
            self._connect_call = self.bus.clock.callLater(self.bus.retry, self._connect)

    def _lost(self, reason: str) -> None:
        self._inbox = []
        if self.linked:
            self.linked = self.store_linked = False
            assert self.receiver is not None
            self.receiver.server_down("memory", reason)

    def _queue(self, message: bytes, sender: str) -> None:
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
