"""
The backplane: one map across processes and machines, each node paying only
for the maps it serves.

A node holds the pins of the maps it *watches*: those with a client on this
node, plus those a request needs for a moment (a first welcome, the pins
API, a phone app's report). Watching a map means listening to its channel
(links.py): there arrive the deltas of the other nodes serving it, its
devices' fixes, and requests for its state. A map that nobody here needs
any more for a few seconds is unwatched, and its remote pins dropped.

What travels (JSON objects, one per bus message; `n` is the sender's node id):

On the cluster's channel (on every server that is up):
- `hello`: `{"t": "hello", "n", "f": SERVERS, "s": DESCRIBED}`: "I
  (re)joined". `f` names the sender's set of Redis servers (`s` lists
  them): nodes with different sets would put maps on different servers, so
  they refuse to serve and say so (node_membership.py).
- `beat`: `{"t": "beat", "n", "f", "s"}`: "I am alive", when the node published
  nothing else on this channel for a while.
- `bye`: `{"t": "bye", "n"}`: the node is stopping; its pins go at once.
- `map`: `{"t": "map", "n", "m": NAME, "x": EXPIRES_MS or null}`: the sender
  created a private map (already in the link's store of maps).
- `devgone`: `{"t": "devgone", "n", "m": MAP, "i": [PIN ID], "k": [TOKEN HASH]}`:
  a device deleted (already gone from the store): every node refuses it,
  whether or not it serves the map (held, like `dev`, while the map's
  devices load).

On a map's channel:
- `delta`: `{"t": "delta", "n", "m": MAP, "p": [[VERSION, PIN], ...], "g": [ID, ...]}`,
  one per map tick with the sender's changed pins and departures.
- `mhello`: `{"t": "mhello", "n", "m": MAP}`: "I now serve MAP: send me your
  pins of it"; every node watching the map answers with an `mfull`.
- `ask`: `{"t": "ask", "n", "ms": [MAP, ...]}`, to one node new to the
  sender (or heard again after it was dropped): an `mhello` for each map.
- `mfull`: `{"t": "mfull", "n", "m": MAP, "k": CHUNK, "end": BOOL, "r": [NODE, ...],
  "p": [[VERSION, PIN], ...]}`, every pin of the sender on that map, in
  chunks; the chunks up to `end` *replace* what a receiver holds of the
  sender on that map. Sent to the asker's own channel on the map's server
  (so that the sender's later deltas never overtake it), or on the map's
  channel (when several asked, and to everyone after (re)linking); `r`
  names the askers it answers (none: the sender started serving the map).
- `dev`: a device's newest fix (phones/devices.py).

A node starts watching a map by listening to its channel, asking the
nodes that listen for their pins (the link says how many the request
reached) and loading the map's devices from the store; the map is in sync
once every one of them answered it (or after `map_sync_timeout`). Requests that need the
map's pins wait for that (`watch`), so a first welcome is whole.

A receiver drops every pin of a node it has heard nothing from for
`node_ttl` seconds, so a node that dies (or is cut off) leaves no ghost pins.
Per-pin order holds because one node publishes on one connection and a pin
has one owner; `version` lets a stale state never win. When a link comes
back, the node syncs every map it watches again, so every node converges
without any client reconnecting.

Private maps and devices are not messages but stores: the link keeps each
map's expiry (`add_map`, `find_map`) and each device (device_store.py),
which outlive any node; the backplane is the `MapStore` of the node's
`MapDirectory` and the `DeviceStore` of its `Devices`. After a
reconnection every node writes back the maps it knows, and, if the store
lost its data (a new epoch), the devices it knows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional, Sequence

import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from .cluster_stores import ClusterStores
from ..hub import Hub, Pin
from .links import (
    DEFAULT_CLUSTER,
    Link,
    LinkReceiver,
    MemoryBus,
    MemoryLink,
    new_node_id,
)
from .map_watching import DEVICE_LEASE, LINGER, REQUEST_LEASE, MapWatch, MapWatching
from ..maps import MapDirectory
from .node_membership import DEFAULT_NODE_TTL, Membership
from .redis_link import PROTOCOL_VERSION, RedisAddress, RedisLink, parse_redis_url

if TYPE_CHECKING:
    from ..phones.devices import Devices

# Pins per `mfull` message: keeps each bus message (and each parse on the
# receiving reactor) small.
FULL_CHUNK = 1000


@dataclass
class BackplaneStats:
    published: int = 0
    dropped: int = 0
    received: int = 0
    resyncs: int = 0
    full_states_sent: int = 0
    nodes_expired: int = 0
    bad_messages: int = 0
    map_syncs: int = 0
    maps_unwatched: int = 0


def _state_entries(pins: Iterable[Pin]) -> bytes:
    return b",".join(b"[%d,%s]" % (pin.version, pin.json()) for pin in pins)


class Backplane(MapWatching, Membership, ClusterStores, service.Service):
    """
    Shares this node's pins of the maps it serves with the other nodes that
    serve them, and applies theirs to the hub. A twisted Service: start it,
    and the hub's ticks are published; stop it, and the other nodes drop
    this node's pins at once. It is also the cluster's store of private maps
    (`share_maps`) and devices (`share_devices`). Its parts: map_watching.py
    (the maps it serves), node_membership.py (the other nodes), cluster_stores.py
    (private maps and devices); here, the messages between nodes.
    """

    log = Logger()
    directory: Optional[MapDirectory] = None
    devices: Optional[Devices] = None
    device_keys: Any = None

    def __init__(self, hub: Hub, link: Link, clock: IReactorTime, *,
                 node_ttl: float = DEFAULT_NODE_TTL, sync_timeout: Optional[float] = None,
                 map_sync_timeout: Optional[float] = None, reply_delay: float = 0.05,
                 full_chunk: int = FULL_CHUNK, linger: float = LINGER) -> None:
        self.hub = hub
        self.link = link
        self.clock = clock
        self.node = link.node
        self.node_ttl = node_ttl
        # A beat goes when nothing else went on the cluster's channel for a
        # beat interval, so every other node hears from a live one at least
        # every half TTL.
        self.beat_interval = node_ttl / 4
        self.sync_timeout = min(3.0, node_ttl) if sync_timeout is None else sync_timeout
        self.map_sync_timeout = (min(1.0, self.sync_timeout) if map_sync_timeout is None
                                 else map_sync_timeout)
        self.reply_delay = reply_delay
        self.full_chunk = full_chunk
        self.linger = linger
        self.stats = BackplaneStats()
        # When each other node was last heard from (this node's clock).
        self.last_seen: dict[str, float] = {}
        # The maps this node watches.
        self.watches: dict[str, MapWatch] = {}
        # (node, map) whose whole state this node holds since it last synced.
        self.have: set[tuple[str, str]] = set()
        # (node, map) whose `mfull` is arriving: what it has named so far.
        self.replacing: dict[tuple[str, str], set[str]] = {}
        # (node, map) asked for their state that have not sent it yet.
        self.asked: set[tuple[str, str]] = set()
        # Why this node refuses to serve (another node has another set of
        # Redis servers), and the nodes that disagree, with when last seen.
        self.mismatch: Optional[str] = None
        self.disagreeing: dict[str, tuple[float, str]] = {}
        self.last_publish = -math.inf
        self.linked_since: Optional[float] = None
        self.down_since: Optional[float] = clock.seconds()
        self.ever_linked = False
        # The link's servers that are down, and since when.
        self.servers_down: dict[str, float] = {
            server: clock.seconds() for server in link.down_servers()}
        self._store_checked = False
        self._servers_seen: set[str] = set()
        # Maps -> nodes (None: everyone) that asked for this node's pins.
        self._reply_to: dict[str, set[str]] = {}
        self._reply_call: Any = None
        self._synced: Optional[str] = None
        self._sync_waiters: list[defer.Deferred] = []
        self._sync_call: Any = None
        # The device store's epoch as this node last saw it.
        self._device_epoch: Optional[str] = None
        self._beat = task.LoopingCall(self._guarded, self._heartbeat)
        self._beat.clock = clock
        self._sweep = task.LoopingCall(self._guarded, self.sweep)
        self._sweep.clock = clock
        self._hello = orjson.dumps({"t": "hello", "n": self.node, "f": link.fingerprint,
                                    "s": link.describe()})
        self._beat_message = orjson.dumps({"t": "beat", "n": self.node,
                                           "f": link.fingerprint, "s": link.describe()})

    # Service

    def startService(self) -> None:  # noqa: N802 (Twisted's name)
        super().startService()
        self.hub.publisher = self.publish_tick
        self.hub.watcher = self
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
            self._publish(orjson.dumps({"t": "bye", "n": self.node}))
            self.link.withdraw()
        return self.abandon()

    def abandon(self) -> defer.Deferred:
        """Stop without a goodbye, as a crash would: the others time this node out."""
        if self.hub.publisher == self.publish_tick:
            self.hub.publisher = None
        if self.hub.watcher is self:
            self.hub.watcher = None
        for loop in (self._beat, self._sweep):
            if loop.running:
                loop.stop()
        for call in (self._reply_call, self._sync_call):
            if call is not None and call.active():
                call.cancel()
        for watch in list(self.watches.values()):
            for call in (watch.timer, watch.linger):
                if call is not None and call.active():
                    call.cancel()
            self._map_synced(watch, watch.generation, "stopped")
        self._finish_sync("stopped")
        return self.link.stop()

    def when_synced(self) -> defer.Deferred:
        """
        Fires once this node is linked (and knows the device store's epoch),
        or after `sync_timeout`, Redis or not: the gate of its first client.
        """
        if self._synced is not None:
            return defer.succeed(self._synced)
        waiter: defer.Deferred = defer.Deferred()
        self._sync_waiters.append(waiter)
        return waiter

    # LinkReceiver

    def server_up(self, server: str) -> None:
        """A server of the link is up: resync the maps on it (all of them if it keeps the stores)."""
        now = self.clock.seconds()
        since = self.servers_down.pop(server, now)
        if server in self._servers_seen:
            self.log.info("node {node}: link to {server} is back after {seconds:.1f} s; "
                          "resyncing", node=self.node, server=server, seconds=now - since)
        else:
            self.log.info("node {node}: linked to {server}", node=self.node, server=server)
        self._servers_seen.add(server)
        self.ever_linked = True
        if self.linked_since is None:
            self.linked_since, self.down_since = now, None
        self.stats.resyncs += 1
        on_server = {name for name in self.watches if self.link.server_name(name) == server}
        self.asked = {pair for pair in self.asked if pair[1] not in on_server}
        self.have = {pair for pair in self.have if pair[1] not in on_server}
        for pair in [pair for pair in self.replacing if pair[1] in on_server]:
            del self.replacing[pair]
        self.link.announce(self.node_ttl)
        self._publish(self._hello)
        self._check_agreement()
        if server != self.link.server_name():
            for name in on_server:
                self._start_sync(self.watches[name])
            self._maybe_finish_sync()
            return
        self._restore_maps()
        if self.devices is not None:
            defer.Deferred.fromCoroutine(self._check_device_epoch()).addBoth(
                self._epoch_checked)
        else:
            self._epoch_checked(None)

    def _epoch_checked(self, result: Any) -> None:
        if isinstance(result, Failure):
            self.log.warn("could not check the device store: {error}",
                          error=result.getErrorMessage())
        # Every map this node serves (on a server that is up) is synced
        # again: what was published while cut off was lost, and the store
        # may be new.
        for watch in list(self.watches.values()):
            if self.link.map_linked(watch.name):
                self._start_sync(watch)
        self._store_checked = True
        self._maybe_finish_sync()

    def _maybe_finish_sync(self) -> None:
        if self._store_checked and not self.link.down_servers():
            self._finish_sync("linked")

    def server_down(self, server: str, reason: str) -> None:
        now = self.clock.seconds()
        self.servers_down[server] = now
        if not self.link.linked:
            self.linked_since, self.down_since = None, now
            self.log.warn("node {node}: lost the link to {server} ({reason}); serving this "
                          "node's clients, reconnecting", node=self.node, server=server,
                          reason=reason)
            return
        stores = (" and the private maps and devices" if server == self.link.server_name()
                  else "")
        self.log.warn("node {node}: lost the link to {server} ({reason}): the maps on it"
                      "{stores} are unavailable until it is back; reconnecting",
                      node=self.node, server=server, reason=reason, stores=stores)

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
        if kind == "bye":
            # Said on every server: the first one counts.
            if known:
                self._forget(origin, "said goodbye")
            return
        self.last_seen[origin] = self.clock.seconds()
        try:
            if not known and self.watches:
                # A node new to us, or heard again after we dropped it (a
                # long stall): whatever it holds of the maps we serve, we
                # do not have. Ask, in one message.
                self._ask_all(origin)
            if kind == "devgone":
                map_name = decoded["m"]
                if not isinstance(map_name, str):
                    raise ValueError("bad map")
                if self.devices is not None:
                    # Whichever channel it came on: held while the map's
                    # devices load, so that the store's answer cannot undo it.
                    self.device_message(map_name, kind, decoded)
            elif kind in ("delta", "mfull", "mhello", "dev"):
                map_name = decoded["m"]
                if not isinstance(map_name, str):
                    raise ValueError("bad map")
                if map_name not in self.watches:
                    return  # a late message of a map this node no longer serves
                if kind == "delta":
                    pair = (origin, map_name)
                    if pair not in self.have:
                        self._ask(origin, map_name)
                    self.hub.apply_remote(map_name, origin, self._states(decoded["p"]),
                                          decoded["g"])
                elif kind == "mfull":
                    self._apply_full(origin, map_name, decoded)
                elif kind == "mhello":
                    self._reply(origin, map_name)
                elif self.devices is not None:
                    self.device_message(map_name, kind, decoded)
            elif kind in ("hello", "beat"):
                self._check_servers(origin, decoded.get("f"), decoded.get("s"))
            elif kind == "ask":
                for map_name in decoded["ms"]:
                    if isinstance(map_name, str) and map_name in self.watches:
                        self._reply(origin, map_name)
            elif kind == "map":
                self._learn_map(decoded)
            else:
                self._bad(message)
        except (KeyError, TypeError, ValueError, AttributeError):
            self._bad(message)
        except Exception:
            # Never into the Redis protocol's parser: it would lose its place.
            self.stats.bad_messages += 1
            self.log.failure("could not apply a message of node {origin}", origin=origin)


    def publish_tick(self, map_name: str, pins: list[Pin], gone: list[str]) -> None:
        """`Hub.publisher`: this node's changes of one map tick, as one message."""
        if not self.link.map_linked(map_name):
            self.stats.dropped += 1
            return
        self._count(self.link.publish_map(map_name, b'{"t":"delta","n":%s,"m":%s,"p":[%s],"g":%s}' % (
            orjson.dumps(self.node), orjson.dumps(map_name), _state_entries(pins),
            orjson.dumps(gone))))

    def _publish(self, message: bytes, to: Optional[str] = None,
                 map_name: Optional[str] = None) -> None:
        published = self.link.publish(message, to, map_name)
        self._count(published)
        if published and to is None:
            # Only what every node hears stands in for a beat: deltas go to
            # the nodes serving one map, and a node busy on maps nobody else
            # serves must still be heard by the others.
            self.last_publish = self.clock.seconds()

    def _count(self, published: bool) -> None:
        if published:
            self.stats.published += 1
        else:
            self.stats.dropped += 1

    def map_full_messages(self, map_name: str, answering: Sequence[str] = ()) -> list[bytes]:
        """
        This node's pins of one map, in chunks of at most `full_chunk` pins;
        `answering`: the nodes whose request this answers (`r`).
        """
        map_state = self.hub.maps.get(map_name)
        local = [] if map_state is None else [
            pin for pin in map_state.pins.values() if pin.origin is None]
        chunks = [local[start:start + self.full_chunk]
                  for start in range(0, len(local), self.full_chunk)] or [[]]
        head = b'{"t":"mfull","n":%s,"m":%s' % (orjson.dumps(self.node), orjson.dumps(map_name))
        if answering:
            head += b',"r":%s' % orjson.dumps(list(answering))
        return [b'%s,"k":%d,"end":%s,"p":[%s]}' % (
            head, index, b"true" if index == len(chunks) - 1 else b"false",
            _state_entries(chunk)) for index, chunk in enumerate(chunks)]

    def _send_map_full(self, map_name: str, to: Optional[str],
                       answering: Sequence[str] = ()) -> None:
        # All chunks in one turn, on one connection (the map's server, also
        # when sent to one node): no delta of ours comes between them, and
        # none that follows overtakes them.
        for message in self.map_full_messages(map_name, answering):
            if to is None:
                self._count(self.link.publish_map(map_name, message))
            else:
                self._publish(message, to, map_name)
        self.stats.full_states_sent += 1

    def _reply(self, origin: str, map_name: str) -> None:
        # Answers are gathered for a moment: when Redis comes back every node
        # asks for every map it serves at about the same time.
        self._reply_to.setdefault(map_name, set()).add(origin)
        if self._reply_call is None or not self._reply_call.active():
            self._reply_call = self.clock.callLater(self.reply_delay, self._send_replies)

    def _send_replies(self) -> None:
        replies, self._reply_to = self._reply_to, {}
        for map_name, targets in replies.items():
            if map_name not in self.watches or not self.link.map_linked(map_name):
                continue
            if len(targets) > 2:
                self._send_map_full(map_name, None, sorted(targets))
            else:
                for target in targets:
                    self._send_map_full(map_name, target, [target])

    def _ask_all(self, origin: str) -> None:
        """Ask a node for its pins of every map this node serves (it answers for those it serves)."""
        wanted = [name for name in self.watches
                  if (origin, name) not in self.asked and self.link.map_linked(name)]
        if wanted:
            self.asked.update((origin, name) for name in wanted)
            self._publish(orjson.dumps({"t": "ask", "n": self.node, "ms": wanted}), origin)

    def _ask(self, origin: str, map_name: str) -> None:
        """We hold only part of a node's pins of a map (we missed its `mfull`): ask for it."""
        pair = (origin, map_name)
        if pair not in self.asked and self.link.map_linked(map_name):
            self.asked.add(pair)
            self._publish(orjson.dumps({"t": "mhello", "n": self.node, "m": map_name}), origin,
                          map_name)

    def _guarded(self, job: Any) -> None:
        # A LoopingCall stops for good at its first exception: log and go on.
        try:
            job()
        except Exception:
            self.log.failure("backplane {job} failed", job=getattr(job, "__name__", job))

    # Applying

    @staticmethod
    def _states(entries: list) -> list[dict]:
        states = []
        for version, state in entries:
            state["version"] = int(version)
            states.append(state)
        return states

    def _apply_full(self, origin: str, map_name: str, message: dict) -> None:
        pair = (origin, map_name)
        if message["k"] == 0:
            self.replacing[pair] = set()
        states = self._states(message["p"])
        seen = self.replacing.get(pair)
        if seen is not None:
            seen.update(state["id"] for state in states)
        self.hub.apply_remote(map_name, origin, states, ())
        if message["end"]:
            self.asked.discard(pair)
            self.have.add(pair)
            seen = self.replacing.pop(pair, None)
            map_state = self.hub.maps.get(map_name)
            if seen is not None and map_state is not None:
                stale = [pin_id for pin_id, pin in map_state.pins.items()
                         if pin.origin == origin and pin_id not in seen]
                if stale:
                    self.hub.apply_remote(map_name, origin, (), stale)
            watch = self.watches.get(map_name)
            if watch is not None and not watch.synced and self.node in message.get("r", ()):
                # An answer to our request (not a node's own state, sent as
                # it starts serving the map: it was not among those asked).
                watch.answered.add(origin)
                self._check_synced(watch)

    def _bad(self, message: bytes) -> None:
        self.stats.bad_messages += 1
        if self.stats.bad_messages == 1 or self.stats.bad_messages % 1000 == 0:
            # Not its content: it may name a private map.
            self.log.warn("ignored a malformed backplane message of {size} bytes "
                          "({count} so far)", count=self.stats.bad_messages, size=len(message))

    # The first sync

    def _finish_sync(self, how: str) -> None:
        if self._synced is not None:
            return
        self._synced = how
        if self._sync_call is not None and self._sync_call.active():
            self._sync_call.cancel()
        if how != "stopped":
            self.log.info("node {node}: ready ({how})", node=self.node, how=how)
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
                                "1 while linked to the other nodes (at least one Redis "
                                "server up), else 0.",
                                value=1 if backplane.link.linked else 0)
        yield GaugeMetricFamily("livemap_backplane_servers_down",
                                "Redis servers of the link that are down now (their maps "
                                "answer 503).", value=len(backplane.link.down_servers()))
        yield GaugeMetricFamily("livemap_backplane_refusing",
                                "1 while this node refuses to serve (another node has "
                                "another set of Redis servers), else 0.",
                                value=1 if backplane.mismatch is not None else 0)
        yield GaugeMetricFamily("livemap_backplane_nodes",
                                "Other nodes heard from within the node TTL.",
                                value=backplane.nodes())
        yield GaugeMetricFamily("livemap_backplane_maps_watched",
                                "Maps this node serves and listens to.",
                                value=len(backplane.watches))
        for name, text, value in (
            ("messages_published", "Messages published to the other nodes.", stats.published),
            ("messages_dropped", "Messages not published because the link was down "
             "(the next resync supersedes them).", stats.dropped),
            ("messages_received", "Messages received from other nodes.", stats.received),
            ("resyncs", "Times this node (re)linked and synced its maps again.", stats.resyncs),
            ("map_syncs", "Times a map's pins were fetched from the nodes serving it.",
             stats.map_syncs),
            ("maps_unwatched", "Maps left once nothing here needed them.",
             stats.maps_unwatched),
            ("full_states_sent", "This node's pins of a map sent to others.",
             stats.full_states_sent),
            ("nodes_expired", "Nodes dropped for silence (died or cut off).",
             stats.nodes_expired),
            ("bad_messages", "Malformed messages ignored.", stats.bad_messages),
        ):
            yield CounterMetricFamily(f"livemap_backplane_{name}", text, value=value)


def make_backplane(hub: Hub, reactor: Any, urls: str, *, cluster: str = DEFAULT_CLUSTER,
                   node_ttl: float = DEFAULT_NODE_TTL, password: Optional[str] = None,
                   node: Optional[str] = None) -> Backplane:
    """A backplane on the Redis server(s) of `urls` (what `--redis` gives)."""
    link = RedisLink(urls, cluster, node or new_node_id(), reactor, password=password,
                     max_backoff=max(0.5, min(5.0, node_ttl / 2)),
                     keepalive=max(0.5, node_ttl / 4))
    return Backplane(hub, link, reactor, node_ttl=node_ttl)


__all__ = ["Backplane", "BackplaneCollector", "BackplaneStats", "DEFAULT_NODE_TTL",
           "DEVICE_LEASE", "LINGER", "Link", "LinkReceiver", "MapWatch", "MemoryBus",
           "MemoryLink", "PROTOCOL_VERSION", "REQUEST_LEASE",
           "RedisAddress", "RedisLink", "make_backplane", "new_node_id", "parse_redis_url"]
